"""bf16 weights packed once for oneDNN (gemma3n/text_model/packed_weights.py and linear.pack_weight).

Bound for a packed product against float64: one bf16 rounding of the output (2^-8 relative) plus float32 summation
over ``in`` products of bf16 values (exact in float32), at most ``in * 2^-24`` of the sum of |terms|, however oneDNN
orders the sum. Packed and plain products may differ by both bounds together.
"""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import gemma3n
from gemma3n.text_model import linear, packed_weights
from gemma3n.text_model.linear import pack_weight, packed_copy, packed_product, unpack_weight
from gemma3n.text_model.packed_weights import (
    PACK_PAYS_AFTER_STEPS,
    decoder_of,
    is_packed,
    pack_decoder,
    pack_if_pays,
    pack_pays,
)


def within_product_bound(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """``got`` = x @ weight.T within one bf16 rounding and float32 summation error."""
    exact = x.double() @ weight.double().T
    magnitude = x.double().abs() @ weight.double().abs().T
    bound = 2**-8 * exact.abs() + x.shape[-1] * 2**-24 * magnitude + 1e-30
    return bool(((got.double() - exact).abs() <= bound).all())


@pytest.fixture
def weight() -> torch.Tensor:
    return torch.randn(384, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)


@pytest.mark.parametrize("shape", [(1, 256), (3, 256), (4, 256), (2, 7, 256), (129, 256)])
def test_packed_product_matches_the_float64_product(weight, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.inference_mode():
        assert pack_weight(weight) and packed_copy(weight) is not None
        got = packed_product(x, weight)
        plain = F.linear(x, weight)
    unpack_weight(weight)
    assert got.shape == (*shape[:-1], 384) and got.dtype == torch.bfloat16
    assert within_product_bound(got, x, weight)
    assert within_product_bound(plain, x, weight)  # the reference product keeps the same bound


def test_a_transposed_input_is_read_as_its_values(weight):
    # oneDNN's packed product reads a non-contiguous input's memory as if it were contiguous: it must be copied
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16).T
    assert not x.is_contiguous()
    with torch.inference_mode():
        pack_weight(weight)
        got = packed_product(x, weight)
    unpack_weight(weight)
    assert within_product_bound(got, x, weight)


def test_without_a_copy_the_product_is_f_linear_and_copies_die_with_their_weight(weight):
    weight = weight.clone()  # the only reference (pytest keeps the fixture's)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(packed_product(x, weight), F.linear(x, weight))  # never packed
        assert not pack_weight(weight.float()) and not pack_weight(weight[None])  # bf16 matrices only
        assert pack_weight(weight)
    address = weight.data_ptr()
    assert address in linear._packed_copies
    del weight
    gc.collect()
    assert address not in linear._packed_copies  # no stale copy for a later tensor at the same address


@pytest.fixture
def bf16_lm(tiny_lm, monkeypatch):
    """The tiny model in bf16, with every weight counted as large enough to pack (tiny weights are all small)."""
    monkeypatch.setattr(packed_weights, "MIN_PACKED_ELEMENTS", 0)
    monkeypatch.setattr(packed_weights, "HEAD_BLOCK_ROWS", 128)  # the 300-row tied head in 3 blocks, as E2B's in 8
    monkeypatch.delenv(packed_weights.PACKED_WEIGHTS_ENV, raising=False)
    return gemma3n.load(tiny_lm[1], dtype=torch.bfloat16)


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 280, (2, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids, dtype=torch.bool)
    ids[1, :3], mask[1, :3] = 0, False  # left padding
    return ids, mask


def test_a_packed_model_gives_the_same_logits_and_tokens(bf16_lm):
    ids, mask = _left_padded_batch()
    with torch.inference_mode():
        dense_logits = bf16_lm(ids, attention_mask=mask).logits
        decoder = decoder_of(bf16_lm)
        packed = pack_decoder(decoder)
        layers = decoder.config.num_hidden_layers
        assert [len(block) for block in decoder.packed_head] == [128, 128, 44]  # the head's row blocks
        assert packed >= 7 * layers + 3 and is_packed(bf16_lm)  # q k v o gate up down per layer, 3 head blocks
        assert pack_decoder(decoder) == packed  # packing again keeps the copies
        packed_logits = bf16_lm(ids, attention_mask=mask).logits
        assert pack_decoder(decoder, enable=False) == 0 and not is_packed(bf16_lm) and not decoder.packed_head
        again = bf16_lm(ids, attention_mask=mask).logits
    assert torch.equal(again, dense_logits)  # unpacking restores the plain path exactly
    # the same products up to summation order: the logits agree to a few bf16 roundings of the layers' outputs
    rel = ((packed_logits.float() - dense_logits.float()).norm() / dense_logits.float().norm()).item()
    assert rel < 2e-2, rel


def _teacher_forced_logits(model, ids, mask, step, steps: int = 3) -> torch.Tensor:
    """Prefill, then ``steps`` decode steps on fixed tokens through ``step``: the float32 logits [steps + 1, B, V]."""
    from gemma3n.generation import cache_length_for, prefill
    from gemma3n.text_model import KVCache

    B, T = ids.shape
    positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)
    cache = KVCache(model.config.text, B, cache_length_for(model, T, steps, True), dtype=model.dtype, device="cpu")
    logits = [prefill(model, ids, mask, positions, cache)]
    tokens = torch.randint(3, 280, (steps, B, 1), generator=torch.Generator().manual_seed(5))
    next_pos = positions[:, -1:] + 1
    for i in range(steps):
        cache.prepare_decode(T + i)
        logits.append(step(model, tokens[i], next_pos + i, cache, torch.tensor(T + i)))
    return torch.stack(logits)


def test_compiled_batched_steps_call_the_packed_product(bf16_lm):
    from gemma3n.generation import compiled_decode_step, decode_step

    ids, mask = _left_padded_batch()
    with torch.inference_mode():
        eager = _teacher_forced_logits(bf16_lm, ids, mask, decode_step)
        pack_decoder(decoder_of(bf16_lm))
        calls = []
        original = linear._packed_product
        try:
            linear._packed_product = lambda x, w: calls.append(x.shape) or original(x, w)
            compiled = _teacher_forced_logits(bf16_lm, ids, mask, compiled_decode_step(bf16_lm))
        finally:
            linear._packed_product = original
    assert any(shape[0] == 2 for shape in calls)  # two-row decode products went through the packed copies
    # the same model up to summation order and inductor's float32 intermediates: a few bf16 roundings apart
    rel = ((compiled - eager).norm() / eager.norm()).item()
    assert rel < 2e-2, rel


def test_the_policy(bf16_lm, tiny_lm, monkeypatch):
    monkeypatch.setattr(packed_weights, "packing_speedup", lambda rows: 1.5)
    several, one = PACK_PAYS_AFTER_STEPS[2], PACK_PAYS_AFTER_STEPS[1]
    assert pack_pays(bf16_lm, rows=4, steps=several, compiled=True)
    assert not pack_pays(bf16_lm, rows=4, steps=several - 1, compiled=False)  # too short to pay
    assert pack_pays(bf16_lm, rows=1, steps=one, compiled=False)  # eager one-row steps save less per step
    assert not pack_pays(bf16_lm, rows=1, steps=one - 1, compiled=False)
    assert not pack_pays(bf16_lm, rows=1, steps=10**6, compiled=True)  # the fused one-row step reads dense weights
    monkeypatch.setattr(packed_weights, "packing_speedup", lambda rows: 1.05)
    assert not pack_pays(bf16_lm, rows=4, steps=10**6, compiled=False)  # not faster on this CPU
    monkeypatch.setenv(packed_weights.PACKED_WEIGHTS_ENV, "1")
    assert pack_pays(bf16_lm, rows=1, steps=1, compiled=True)
    monkeypatch.setenv(packed_weights.PACKED_WEIGHTS_ENV, "yes")
    with pytest.raises(ValueError, match="GEMMA3N_PACKED_WEIGHTS='yes'"):
        pack_pays(bf16_lm, rows=4, steps=1, compiled=False)
    monkeypatch.delenv(packed_weights.PACKED_WEIGHTS_ENV)
    fp32 = gemma3n.load(tiny_lm[1])  # float32: the parity reference keeps F.linear
    assert not pack_pays(fp32, rows=4, steps=10**6, compiled=False)


def test_generate_packs_a_batched_job_that_pays(bf16_lm, monkeypatch):
    monkeypatch.setattr(packed_weights, "packing_speedup", lambda rows: 1.5)
    ids, mask = _left_padded_batch()
    with torch.inference_mode():
        bf16_lm.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, compile=False)
        assert not is_packed(bf16_lm)  # 2 steps do not pay for packing
        bf16_lm.generate(
            ids, attention_mask=mask, max_new_tokens=PACK_PAYS_AFTER_STEPS[2], do_sample=False, compile=False
        )
    assert is_packed(bf16_lm)
    assert pack_if_pays(bf16_lm, rows=4, steps=1, compiled=False)  # stays packed


@pytest.fixture
def cheap_packing(monkeypatch):
    """Every tiny-random weight packable, packing measured 1.5x faster, and 4 planned steps of 2 rows enough."""
    monkeypatch.setattr(packed_weights, "MIN_PACKED_ELEMENTS", 0)
    monkeypatch.setattr(packed_weights, "packing_speedup", lambda rows: 1.5)
    monkeypatch.setattr(packed_weights, "PACK_PAYS_AFTER_STEPS", {1: 1000, 2: 4})
    monkeypatch.delenv(packed_weights.PACKED_WEIGHTS_ENV, raising=False)


def _png_files(directory, count: int) -> None:
    from PIL import Image

    for i in range(count):
        Image.new("RGB", (32 + 8 * i, 32), (40 * i, 90, 200)).save(directory / f"{i}.png")


def test_a_cli_job_packs_when_its_planned_steps_pay(cheap_packing, tmp_path, monkeypatch):
    from gemma3n import cli

    _png_files(tmp_path, 3)
    loaded = []
    original = cli.load_pipeline
    monkeypatch.setattr(cli, "load_pipeline", lambda *a, **k: loaded.append(original(*a, **k)) or loaded[-1])
    base = ["caption", str(tmp_path), "--model", "tiny-random", "--dtype", "bfloat16", "--max-new-tokens", "2"]
    # 3 files at batch 2: 2 batches x 2 steps = 4 planned steps of 2 rows; one batch's call alone plans only 2
    assert cli.main([*base, "--no-compile", "--batch-size", "2", "--output", str(tmp_path / "b2.jsonl")]) == 0
    assert is_packed(loaded[-1].model)
    assert cli.main([*base, "--no-compile", "--batch-size", "1", "--output", str(tmp_path / "b1.jsonl")]) == 0
    assert not is_packed(loaded[-1].model)  # 6 one-row steps do not pay
    assert (tmp_path / "b1.jsonl").read_text().count("\n") == (tmp_path / "b2.jsonl").read_text().count("\n") == 3


def test_a_pipeline_call_packs_for_its_whole_list(cheap_packing):
    from PIL import Image

    pipe = gemma3n.pipeline(
        "image-to-text", model="tiny-random", device="cpu", dtype="bfloat16", max_new_tokens=2, batch_size=2
    )
    images = [Image.new("RGB", (32, 32), (i * 60, 10, 10)) for i in range(3)]
    pipe(images[:2], compile=False)  # one batch: 2 planned steps
    assert not is_packed(pipe.model)
    pipe(images, compile=False)  # two batches: 4 planned steps
    assert is_packed(pipe.model)
