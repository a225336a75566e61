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

import gemma3n
from gemma3n.text_model import layers
from gemma3n.text_model.sparse_decode import MAX_ACTIVE_FRACTION, sparse_gated_down


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
    x = torch.randn(3, hidden, generator=gen)
    up = torch.randn(width, hidden, generator=gen)
    down = torch.randn(hidden, width, generator=gen)
    activation = _sparse_activation(3, width, seed=2)
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


@pytest.fixture(scope="module")
def sparse_checkpoint(tmp_path_factory):
    """Tiny reference checkpoint with activation sparsity 0.95 on layers 0 and 2 (as E2B's first layers)."""
    directory = tmp_path_factory.mktemp("sparse_lm")
    pattern = [0.95, 0.0, 0.95, 0.0, 0.0, 0.0]
    save_reference_lm(directory, text_config(activation_sparsity_pattern=pattern, intermediate_size=256))
    return directory


def test_cpu_load_turns_sparse_decode_on_for_sparse_float_layers_only(sparse_checkpoint):
    model = gemma3n.load(sparse_checkpoint, dtype=torch.float32)
    on = [layer.mlp.down_weight_t is not None for layer in model.language_model.layers]
    assert on == [True, False, True, False, False, False]
    mlp = model.language_model.layers[0].mlp
    assert torch.equal(mlp.down_weight_t, mlp.down_proj.weight.t())
    assert model.language_model.enable_sparse_decode(False) == 0
    assert all(layer.mlp.down_weight_t is None for layer in model.language_model.layers)

    quantized = gemma3n.load(sparse_checkpoint, dtype=torch.float32, quantize="int8")
    assert quantized.language_model.enable_sparse_decode() == 0  # quantized layers keep their own kernels


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


def test_sparse_decode_steps_match_dense_steps(sparse_checkpoint, monkeypatch):
    """A left-padded batch: the sparse path runs in every decode step of both sparse layers (not in prefill), and
    each step's logits match dense decoding within 1e-5 relative; prefill logits are the same bit for bit."""
    model = gemma3n.load(sparse_checkpoint, dtype=torch.float32)
    calls = []

    def counted(*args):
        calls.append(tuple(args[0].shape))
        return sparse_gated_down(*args)

    monkeypatch.setattr(layers, "sparse_gated_down", counted)
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
