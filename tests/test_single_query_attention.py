"""Decode-step attention in bf16 on the CPU: the float32 single-query path that replaces SDPA there.

Bounds: the path computes in float32 from bf16 inputs (exact upcasts) and rounds once to bf16, so its error against a
float64 reference is half a bf16 ulp (2^-9 relative; we allow 2^-8) plus the float32 error before that rounding, bounded
whatever the summation order (any CPU kernel): each score is a sum of D products, off by at most D * 2^-24 * sum|q k|
(times the scale; the soft-cap's tanh has slope <= 1), which moves each softmax weight by at most twice that relatively,
so the output by 2 * max|v| * that; the weighted sum over Lk keys adds at most Lk * 2^-24 * max|v|.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gemma3n.text_model import attention
from gemma3n.text_model.attention import attend, single_query_attention, uses_single_query_attention

BF16_BOUND_REL = 2.0**-8


def _inputs(batch: int, keys: int, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """q [B, 8, 1, 32], k/v [B, 2, keys, 32] and a boolean mask [B, 1, 1, keys] with a key always visible."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, 8, 1, 32, generator=g).to(dtype)
    k = torch.randn(batch, 2, keys, 32, generator=g).to(dtype)
    v = torch.randn(batch, 2, keys, 32, generator=g).to(dtype)
    mask = torch.rand(batch, 1, 1, keys, generator=g) > 0.4
    mask[..., -1] = True
    return q, k, v, mask


def _reference(q, k, v, mask, scale: float, softcap: float | None) -> torch.Tensor:
    """float64 grouped-query attention with optional soft-capping, [B, H, 1, D]."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, dim=1)
    v64 = v.double().repeat_interleave(group, dim=1)
    scores = q.double() @ k64.transpose(-1, -2) * scale
    if softcap is not None:
        scores = (scores / softcap).tanh() * softcap
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v64


def _float32_slack(q, k, v, scale: float) -> float:
    """The float32 error bound of the module docstring, for these inputs."""
    group = q.shape[1] // k.shape[1]
    dim, keys = q.shape[-1], k.shape[-2]
    abs_scores = q.double().abs() @ k.double().abs().repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    score_error = dim * 2.0**-24 * abs_scores.max().item()
    max_v = v.double().abs().max().item()
    return 2 * max_v * score_error + keys * 2.0**-24 * max_v


def _assert_within_bf16_rounding(out: torch.Tensor, ref: torch.Tensor, slack: float) -> None:
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape
    err = (out.double() - ref).abs()
    bound = BF16_BOUND_REL * ref.abs() + slack
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} exceeds the bf16 rounding bound"


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("batch,keys", [(1, 256), (3, 300)])
def test_single_query_attention_is_float32_rounded_once(batch, keys, softcap):
    q, k, v, mask = _inputs(batch, keys)
    ref, slack = _reference(q, k, v, mask, 0.3, softcap), _float32_slack(q, k, v, 0.3)
    _assert_within_bf16_rounding(single_query_attention(q, k, v, mask, 0.3, softcap), ref, slack)
    _assert_within_bf16_rounding(attend(q, k, v, mask, 0.3, softcap), ref, slack)


def test_compiled_single_query_attention_reads_the_cache_in_bf16_and_keeps_the_bound():
    q, k, v, mask = _inputs(2, 272)
    compiled = torch.compile(single_query_attention, dynamic=False, fullgraph=True)
    slack = _float32_slack(q, k, v, 1.0)
    for softcap in (None, 5.0):
        ref = _reference(q, k, v, mask, 1.0, softcap)
        _assert_within_bf16_rounding(compiled(q, k, v, mask, 1.0, softcap), ref, slack)


def test_sdpa_is_kept_for_float32_prefill_and_non_cpu_decode(monkeypatch):
    q, k, v, mask = _inputs(2, 64)
    assert uses_single_query_attention(q)
    assert not uses_single_query_attention(q.float())
    assert not uses_single_query_attention(torch.cat([q, q], dim=2))  # two queries: prefill / extend
    assert not uses_single_query_attention(q.to("meta"))

    def no_sdpa(*args, **kwargs):
        raise AssertionError("SDPA was called for a bf16 CPU decode step")

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", no_sdpa)
    attend(q, k, v, mask, 1.0, None)  # bf16, one query: the float32 path, no SDPA
    monkeypatch.undo()
    # float32 decode is SDPA itself, bit for bit (the reference's kernel)
    q32, k32, v32 = q.float(), k.float(), v.float()
    expected = F.scaled_dot_product_attention(q32, k32, v32, attn_mask=mask, scale=1.0, enable_gqa=True)
    assert torch.equal(attend(q32, k32, v32, mask, 1.0, None), expected)


def test_bf16_decode_attention_is_no_worse_than_sdpa():
    """Against float64, the float32 path's worst error is at most SDPA's own bf16 error (plus one rounding step)."""
    q, k, v, mask = _inputs(4, 256, seed=3)
    ref = _reference(q, k, v, mask, 1.0, None)
    ours = (attend(q, k, v, mask, 1.0, None).double() - ref).abs().max().item()
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)
    theirs = (sdpa.double() - ref).abs().max().item()
    assert ours <= theirs + BF16_BOUND_REL * ref.abs().max().item()
