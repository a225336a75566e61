"""The vision tower's folded multi-query attention against timm's own ``MultiQueryAttention2d``."""

from __future__ import annotations

import copy

import pytest
import torch
from timm.layers import MultiQueryAttention2d
from torch import nn
from vision_helpers import rel_err

from gemma3n.encoders import vision_attention
from gemma3n.encoders.vision_attention import FoldedMultiQueryAttention2d, fold_multi_query_attention

# fp32: the same per-row softmax and weighted sum as timm's fused attention, with other kernel blocking at most
# (rounding ~1e-7 per op over a few dozen ops per row); 1e-5 relative leaves two orders of magnitude.
FP32_REL_TOL = 1e-5


def _attention(query_strides: int, kv_stride: int) -> MultiQueryAttention2d:
    torch.manual_seed(0)
    attention = MultiQueryAttention2d(
        dim=48,
        num_heads=3,
        key_dim=16,
        value_dim=8,
        query_strides=query_strides,
        kv_stride=kv_stride,
        padding="same" if kv_stride > 1 else "",
    )
    with torch.no_grad():  # random norms too (their weights start at 1)
        for p in attention.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return attention.eval()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("query_strides", "kv_stride"), [(1, 1), (1, 2), (2, 2)])
def test_folded_attention_matches_timm(query_strides, kv_stride, channels_last, monkeypatch):
    timm_attention = _attention(query_strides, kv_stride)
    folded = FoldedMultiQueryAttention2d.fold(copy.deepcopy(timm_attention))
    assert set(folded.state_dict()) == set(timm_attention.state_dict())  # same names: checkpoints load as they are
    x = torch.randn(2, 48, 10, 14, generator=torch.Generator().manual_seed(1))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    shapes = []
    sdpa = vision_attention.F.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        shapes.append((tuple(q.shape), tuple(k.shape)))
        return sdpa(q, k, v, **kwargs)

    with torch.no_grad():
        expected = timm_attention(x)
        monkeypatch.setattr(vision_attention.F, "scaled_dot_product_attention", spy)
        got = folded(x)
    h, w = 10 // query_strides, 14 // query_strides
    m = (10 // kv_stride) * (14 // kv_stride)
    assert shapes == [((2, 1, h * w * 3, 16), (2, 1, m, 16))]  # all heads' rows in one attention, one KV head
    assert got.shape == expected.shape == (2, 48, 10, 14)
    assert rel_err(got, expected) <= FP32_REL_TOL


def test_mask_and_training_dropout_take_timm_forward():
    timm_attention = _attention(1, 2)
    folded = FoldedMultiQueryAttention2d.fold(copy.deepcopy(timm_attention))
    x = torch.randn(1, 48, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.randn(1, 3, 8 * 8, 4 * 4)  # a float mask added to the [B, heads, h*w, m*m] logits
    with torch.no_grad():
        assert torch.equal(folded(x, mask), timm_attention(x, mask))
    folded.attn_drop.p = 0.5
    folded.train()
    torch.manual_seed(3)
    with torch.no_grad():
        dropped = folded(x)
    timm_attention.attn_drop.p = 0.5
    timm_attention.train()
    torch.manual_seed(3)
    with torch.no_grad():
        assert torch.equal(dropped, timm_attention(x))


def test_fold_replaces_only_plain_timm_attention():
    model = nn.Sequential(_attention(1, 2), nn.Sequential(_attention(1, 1)), nn.Conv2d(48, 48, 1))
    assert fold_multi_query_attention(model) == 2
    assert [type(m) for m in model.modules()].count(FoldedMultiQueryAttention2d) == 2
    assert fold_multi_query_attention(model) == 0  # already folded
    with pytest.raises(TypeError, match="MultiQueryAttention2d"):
        FoldedMultiQueryAttention2d.fold(model[2])
