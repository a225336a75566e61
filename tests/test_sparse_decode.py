"""Sparse decode steps: the MLP layers with activation sparsity read only their active channels on a CPU.

Tolerances: the sparse product skips terms that are exact zeros, so it differs from the dense one only in float32
summation order: fp32 decode logits within 1e-5 relative of the dense path (same bound as incremental vs full
decoding in test_text_model.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, save_reference_lm, text_config
from torch import nn

import gemma3n
from gemma3n.quantize import Int8Linear
from gemma3n.text_model.sparse_decode import (
    MAX_ACTIVE_FRACTION,
    SparseDecodeProduct,
    sparse_decode_product,
    sparse_gated_down,
    sparse_gated_down_int8,
)


def _sparse_activation(rows: int, width: int, seed: int) -> torch.Tensor:
    """A gate activation with about 5% non-zero channels per row (exact zeros elsewhere), as the sparse gate gives."""
    gate = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))
    return F.gelu(F.relu(gate - 1.645), approximate="tanh")


def test_sparse_product_never_reads_inactive_channels():
    """Rows of up_proj and down_proj^T for channels no row uses are poisoned with NaN: the result stays finite and
    equals the dense product on clean weights within 1e-5 relative (fp32; only the order of the ~35 non-zero terms of
    each output differs, which any kernel keeps within a few float32 roundings of the terms' magnitude)."""
    hidden, width = 32, 256
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, hidden, generator=gen)
    up = torch.randn(width, hidden, generator=gen)
    down = torch.randn(hidden, width, generator=gen)
    activation = _sparse_activation(2, width, seed=2)
    active = activation.ne(0).any(0)
    assert 0 < active.sum() < MAX_ACTIVE_FRACTION * width
    dense = F.linear(activation * F.linear(x, up), down)

    poisoned_up, poisoned_down_t = up.clone(), down.t().contiguous()
    poisoned_up[~active] = float("nan")
    poisoned_down_t[~active] = float("nan")
    sparse = sparse_gated_down(activation, x, poisoned_up, down, poisoned_down_t)
    assert torch.isfinite(sparse).all()
    assert rel_err(sparse, dense) <= 1e-5


def test_mostly_active_batch_takes_the_dense_product():
    """Past MAX_ACTIVE_FRACTION active channels the dense product reads less: the transposed copy is not used."""
    hidden, width = 16, 64
    gen = torch.Generator().manual_seed(3)
    x, up, down = torch.randn(4, hidden, generator=gen), torch.randn(width, hidden), torch.randn(hidden, width)
    activation = torch.rand(4, width, generator=gen) + 0.1  # every channel active
    unused = torch.full((width, hidden), float("nan"))
    out = sparse_gated_down(activation, x, up, down, unused)
    assert torch.equal(out, F.linear(activation * F.linear(x, up), down))


def _int8_pair(hidden: int, width: int, seed: int) -> tuple[nn.Module, nn.Module]:
    """int8 up [width, hidden] and down [hidden, width] layers."""
    gen = torch.Generator().manual_seed(seed)
    up, down = torch.randn(width, hidden, generator=gen), torch.randn(hidden, width, generator=gen)
    return Int8Linear.from_weight(up), Int8Linear.from_weight(down)


def test_int8_sparse_product_reads_only_active_channels():
    """int8 weights: the dense down weight is zeroed and the scales of inactive up rows are NaN, so any read of them
    would show; the result stays finite and equals the float product of the dequantized weights within 1e-5 relative
    (fp32: the same terms, summed in another order)."""
    hidden, width = 64, 256
    up, down = _int8_pair(hidden, width, seed=5)
    x = torch.randn(2, hidden, generator=torch.Generator().manual_seed(6))
    activation = _sparse_activation(2, width, seed=7)
    active = activation.ne(0).any(0)
    assert 0 < active.sum() < MAX_ACTIVE_FRACTION * width
    want = F.linear(activation * F.linear(x, up.dequantized()), down.dequantized())

    up_q, up_scales, down_q, down_scales, down_q_t = sparse_decode_product(up, down).weights
    up_scales = up_scales.clone()
    up_scales[~active] = float("nan")
    got = sparse_gated_down_int8(activation, x, up_q, up_scales, torch.zeros_like(down_q), down_scales, down_q_t)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= 1e-5


def test_int8_mostly_active_batch_takes_the_dense_kernel():
    """Past MAX_ACTIVE_FRACTION active channels: the layers' own int8 kernel, bit for bit."""
    up, down = (layer.to(torch.bfloat16) for layer in _int8_pair(64, 128, seed=8))
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(9)).bfloat16()
    activation = (torch.rand(4, 128, generator=torch.Generator().manual_seed(10)) + 0.1).bfloat16()
    got = sparse_decode_product(up, down)(activation, x)
    assert torch.equal(got, down(activation * up(x)))


@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory):
    """Tiny reference checkpoint with activation sparsity 0.95 on layers 0 and 2 (as E2B's first layers)."""
    directory = tmp_path_factory.mktemp("sparse_lm")
    pattern = [0.95, 0.0, 0.95, 0.0, 0.0, 0.0]
    save_reference_lm(directory, text_config(activation_sparsity_pattern=pattern, intermediate_size=256))
    return directory


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_cpu_load_turns_sparse_decode_on_for_sparse_float_and_int8_layers(sparse_checkpoint, mode):
    model = gemma3n.load(sparse_checkpoint, dtype=torch.float32, quantize=mode)
    on = [layer.mlp.sparse_decode is not None for layer in model.language_model.layers]
    assert on == ([False] * 6 if mode == "int4" else [True, False, True, False, False, False])
    if mode == "int4":  # group-wise int4 keeps its dense kernel
        return
    mlp = model.language_model.layers[0].mlp
    op, weights = mlp.sparse_decode.op, mlp.sparse_decode.weights
    if mode is None:  # the transposed copy of down_proj
        assert op is sparse_gated_down and torch.equal(weights[2], mlp.down_proj.weight.t())
    else:
        assert op is sparse_gated_down_int8 and torch.equal(weights[4], mlp.down_proj.qweight.t())
    assert model.language_model.enable_sparse_decode(False) == 0
    assert all(layer.mlp.sparse_decode is None for layer in model.language_model.layers)


def _decode_logits(model, ids, mask, steps: int) -> list[torch.Tensor]:
    """Prefill logits, then the logits of ``steps`` greedy decode steps (float32, [B, V] each)."""
    from gemma3n.generation import decode_step, prefill
    from gemma3n.text_model import KVCache

    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    cache = KVCache(model.config.text, ids.shape[0], ids.shape[1] + steps, dtype=torch.float32, device="cpu")
    with torch.inference_mode():
        logits = [prefill(model, ids, mask.bool(), positions, cache)]
        position = positions[:, -1:]
        for step in range(steps):
            position = position + 1
            token = logits[-1].argmax(-1, keepdim=True)
            logits.append(decode_step(model, token, position, cache, torch.tensor(ids.shape[1] + step)))
    return logits


@pytest.mark.parametrize("mode", [None, "int8"])
def test_sparse_decode_steps_match_dense_steps(sparse_checkpoint, mode, monkeypatch):
    """A left-padded batch: the sparse path runs in every decode step of both sparse layers (not in prefill), and
    each step's logits match dense decoding within 1e-5 relative (float weights, or the same int8 weights);
    prefill logits are the same bit for bit."""
    model = gemma3n.load(sparse_checkpoint, dtype=torch.float32, quantize=mode)
    calls = []
    product = SparseDecodeProduct.__call__

    def counted(self, activation, rows):
        calls.append(tuple(activation.shape))
        return product(self, activation, rows)

    monkeypatch.setattr(SparseDecodeProduct, "__call__", counted)
    ids = torch.randint(3, 280, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    sparse = _decode_logits(model, ids, mask, steps=5)
    assert calls == [(2, 256)] * (2 * 5)  # 5 decode steps x 2 sparse layers, one [B, intermediate] call each

    model.language_model.enable_sparse_decode(False)
    dense = _decode_logits(model, ids, mask, steps=5)
    assert len(calls) == 10
    assert torch.equal(sparse[0], dense[0])
    for step, (got, want) in enumerate(zip(sparse[1:], dense[1:], strict=True)):
        assert rel_err(got, want) <= 1e-5, f"step {step + 1}: {rel_err(got, want):.2e}"
