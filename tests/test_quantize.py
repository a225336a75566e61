"""Weight-only int8 / int4 (gemma3n.quantize) on CPU.

Bounds, from how the weights are quantized:
- int8, per output channel: ``q = round(w / s)`` with ``s`` = bf16/fp32-rounded ``max|w| / 127``. Rounding ``s`` moves
  it by at most 2^-9 relative, so ``|w| / s <= 127.25`` never reaches the clamp and ``|w - q s| <= s / 2`` exactly.
- int4, per group: ``q = clamp(round((w - z) / s + 8), 0, 15)`` against the rounded scale ``s`` and zero ``z``. Inside
  the clamp the error is at most ``s / 2``; at the top end rounding ``s`` and ``z`` (2^-9 relative each in bf16,
  2^-24 in fp32) adds at most ``(|z| + 8 s) u``; a bf16 kernel output adds ``|w| 2^-8``.
- The quantized model computes the float model with the dequantized weights: fp32 logits agree to 1e-5 relative
  (only the summation order of the products differs, as in the parity tests against transformers).
- Quality: a random tiny decoder amplifies weight noise far more than a trained one, so the cosine bounds against
  fp32 are held on a small trained model in tests/test_quantized_quality.py, not here.
"""

from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch
from conftest import int4_kernel_input_step, rel_err, save_reference_lm, text_config, use_dequantized_weights
from torch import nn

import gemma3n
from gemma3n import quantize as quant
from gemma3n.mapped_pages import release_mapped_pages
from gemma3n.quantize import Int4Linear, Int8Linear

FP32_TOL = 1e-5
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-9}


def _weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with a few awkward ones: all zero, constant, one outlier, shifted away from zero."""
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05
    w[0] = 0.0
    w[1] = 0.3
    w[2, 5] = 2.0
    w[3] += 1.0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int8_error_at_most_half_a_step_and_forward_uses_it(dtype):
    w = _weight(40, 96).to(dtype)
    original = w.clone()
    layer = Int8Linear.from_weight(w)
    assert torch.equal(w, original)  # the source (a memory map at load) is only read
    effective = layer.dequantized()  # [out, in] float32
    step = layer.scales.float()[:, None]
    assert ((effective - w.float()).abs() <= step / 2 * (1 + 1e-5)).all()
    assert torch.equal(effective[0], torch.zeros(96))  # an all-zero row stays zero
    _check_both_paths(layer, 96, 40, effective, dtype)


@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_int4_error_at_most_half_a_group_step_and_forward_uses_it(dtype, group_size):
    out_f, in_f = 40, 128  # 40 rows: padded to 64 for the kernel, sliced back
    w = _weight(out_f, in_f).to(dtype)
    layer = Int4Linear.from_weight(w, group_size=group_size)
    effective = layer.dequantized()  # [out, in] float32
    scale, zero = layer.scales_and_zeros.float()[:, :out_f].unbind(-1)  # [groups, out] each
    scale = scale.T.repeat_interleave(group_size, dim=1)
    zero = zero.T.repeat_interleave(group_size, dim=1)
    u = UNIT_ROUNDOFF[dtype]
    bound = scale / 2 + (zero.abs() + 8 * scale) * 2 * u + effective.abs() * (2 * u if dtype == torch.bfloat16 else 0)
    assert ((effective - w.float()).abs() <= bound + 1e-12).all()
    assert torch.equal(effective[0], torch.zeros(in_f))
    assert torch.allclose(effective[1], w[1].float(), rtol=2 * u * 9)  # a constant group is kept
    _check_both_paths(layer, in_f, out_f, effective, dtype)


def _check_both_paths(layer: nn.Module, in_f: int, out_f: int, effective: torch.Tensor, dtype: torch.dtype) -> None:
    """The kernel (few rows) and the dequantize-then-matmul path (prefill) both multiply by ``effective``. bf16: the
    output rounding plus bf16 accumulation steps (2^-7), and for int4 the row kernel's rounding of x to 8 bits per
    group (at most the group's largest |x| / 254 per value, summed against |w| in the worst case)."""
    generator = torch.Generator().manual_seed(in_f + out_f)
    for rows in (quant.DEQUANTIZE_FROM_ROWS - 1, quant.DEQUANTIZE_FROM_ROWS):
        x = torch.randn(1, rows, in_f, generator=generator).to(dtype)
        exact = x.double() @ effective.double().T
        tol = FP32_TOL if dtype == torch.float32 else 2**-7
        if dtype == torch.bfloat16 and isinstance(layer, Int4Linear):
            step = int4_kernel_input_step(x.view(rows, in_f), layer.group_size)
            tol += ((step @ effective.double().abs().T).norm() / exact.norm()).item()
        got = layer(x)
        assert got.shape == (1, rows, out_f) and rel_err(got, exact) <= tol


@pytest.mark.parametrize("rows", [64, 192])
def test_int4_packing_is_torch_layout(rows):
    q = torch.randint(0, 16, (rows, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    packed = quant._pack_int4_rows(q)
    assert torch.equal(packed, torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
    assert torch.equal(quant._unpack_int4_rows(packed), q)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prefill_path_dequantizes_block_by_block(mode, monkeypatch):
    w = _weight(300, 64)  # 300 rows: 5 blocks of 64 (the last one partial)
    layer = Int8Linear.from_weight(w) if mode == "int8" else Int4Linear.from_weight(w, group_size=32)
    x = torch.randn(quant.DEQUANTIZE_FROM_ROWS, 64)
    whole = layer(x)
    monkeypatch.setattr(quant, "_DEQUANTIZE_BLOCK_ELEMENTS", 64 * 64)
    assert torch.equal(layer(x), whole)
    assert rel_err(whole, x.double() @ layer.dequantized().double().T) <= FP32_TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_prefill_dequantizes_into_one_reused_buffer(mode, dtype):
    """The prefill path writes each weight block into one per-thread buffer (no fresh allocation per call) and gives
    the same values, bit for bit, as a matmul on the freshly dequantized weight."""
    w = _weight(200, 64)
    layer = Int8Linear.from_weight(w, dtype=dtype) if mode == "int8" else Int4Linear.from_weight(w, 32, dtype=dtype)
    rows = max(quant.DEQUANTIZE_FROM_ROWS, quant.ROW_KERNEL_PREFILL_ROWS[mode])  # bf16: fewer go to the row kernels
    x = torch.randn(rows, 64, dtype=dtype)
    quant._scratch.buffers = {}
    with torch.inference_mode():  # a buffer made during generation must also serve calls outside inference mode
        in_inference = layer(x)
    first = layer(x)
    assert torch.equal(first, in_inference)
    buffer = quant._scratch.buffers[(dtype, x.device)]
    assert torch.equal(layer(x), first) and quant._scratch.buffers[(dtype, x.device)] is buffer
    assert torch.equal(first, torch.nn.functional.linear(x, layer.dequantized(dtype)))
    out = torch.full((256, 64), float("nan"), dtype=dtype)
    assert torch.equal(layer.dequantized(dtype, 64, 200, out=out), layer.dequantized(dtype)[64:])


def test_int4_rejects_a_width_not_divisible_by_the_group():
    with pytest.raises(ValueError, match="group_size=64"):
        Int4Linear.from_weight(torch.randn(16, 96), group_size=64)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("quant_lm")
    save_reference_lm(directory, text_config(vocab_size_per_layer_input=300))
    return directory


def _dequantized_float_model(float_model: nn.Module, quantized: nn.Module) -> nn.Module:
    """The float model with every quantized weight replaced by its dequantized value (LM head as a plain Linear)."""
    text_q = quantized.language_model
    done = {name: m for name, m in text_q.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    count = use_dequantized_weights(float_model.language_model, done)
    assert text_q.lm_head is not None and count > 20  # attention, MLP, AltUp, per-layer projections and the head
    return float_model


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    # 17 tokens: longer than the sliding window (5); row 1 left-padded by 6
    ids = torch.randint(3, 300, (2, 17), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    return ids, mask


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_is_the_float_model_with_dequantized_weights(tiny_checkpoint, mode, monkeypatch):
    monkeypatch.setattr(quant, "DEFAULT_INT4_GROUP_SIZE", 32)  # the tiny widths (64, 96, 128) all take group 32
    quantized = gemma3n.load(tiny_checkpoint, dtype=torch.float32, quantize=mode)
    reference = _dequantized_float_model(gemma3n.load(tiny_checkpoint, dtype=torch.float32), quantized)
    float_model = gemma3n.load(tiny_checkpoint, dtype=torch.float32)
    router = quantized.language_model.layers[0].altup.modality_router
    assert isinstance(router, nn.Linear)  # 4 outputs: kept exact
    ids, mask = _left_padded_batch()
    real = mask.bool()
    with torch.inference_mode():
        got = quantized(ids, attention_mask=mask).logits
        want = reference(ids, attention_mask=mask).logits
        exact = float_model(ids, attention_mask=mask).logits
    assert rel_err(got[real], want[real]) <= FP32_TOL
    # and quantization changed something, int4 more than int8 (per-weight step: ~1/127 vs ~1/15 of the range)
    error = rel_err(got[real], exact[real])
    assert error > 1e-4 if mode == "int8" else error > 1e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_with_quantize_matches_teacher_forcing_and_compile(tiny_checkpoint, mode):
    """Greedy decoding of a left-padded batch with a quantized model picks, at every step that is not a near-tie, the
    argmax of one full forward pass over the generated sequence; the compiled decode step and prefill give the same
    tokens."""
    model = gemma3n.load(tiny_checkpoint, dtype=torch.float32, quantize=mode)
    ids, mask = _left_padded_batch()
    settings = dict(max_new_tokens=8, do_sample=False, eos_token_id=[-1], pad_token_id=0)
    eager = model.generate(ids, attention_mask=mask, **settings)
    full_mask = torch.cat([mask, torch.ones(2, 8, dtype=mask.dtype)], dim=1)
    with torch.inference_mode():
        logits = model(eager, attention_mask=full_mask).logits
    top = logits[:, ids.shape[1] - 1 : -1].topk(2, dim=-1).values
    decided = (top[..., 0] - top[..., 1]) > 1e-4  # steps whose argmax is not a near-tie
    assert decided.float().mean() > 0.5
    picked = logits[:, ids.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(eager[:, ids.shape[1] :][decided], picked[decided])
    if mode == "int4":  # one compiled run (inductor on the int4 kernel's op; the int8 op is traced the same way)
        compiled = model.generate(ids, attention_mask=mask, compile=True, **settings)
        assert torch.equal(compiled, eager)
        # the prefill ran compiled too, around the quantized layers' prefill product (a custom op)
        assert all(layer.compiled_prefill for layer in model.language_model.layers)


def test_quantize_arguments_are_checked(tiny_checkpoint):
    with pytest.raises(ValueError, match="quantize='int3'"):
        gemma3n.load(tiny_checkpoint, quantize="int3")
    with pytest.raises(ValueError, match="runs on the CPU or on CUDA; got device=meta"):
        gemma3n.load(tiny_checkpoint, quantize="int8", device="meta")
    model = gemma3n.load(tiny_checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match="quantize= applies when loading"):
        gemma3n.pipeline("text-generation", model=model, quantize="int8")


def test_load_and_pipeline_quantize_only_the_text_decoder():
    from gemma3n.pipelines import resolve_checkpoint

    model = gemma3n.load(resolve_checkpoint("tiny-random"), quantize="int4")
    quantized = (Int4Linear, Int8Linear)
    assert isinstance(model.language_model.lm_head, Int4Linear)
    assert any(isinstance(m, quantized) for m in model.language_model.layers.modules())
    for tower in (model.vision_tower, model.audio_tower, model.embed_vision, model.embed_audio):
        assert not any(isinstance(m, quantized) for m in tower.modules())
    pipe = gemma3n.pipeline("text-generation", model="tiny-random", device="cpu", quantize="int8", max_new_tokens=3)
    assert isinstance(pipe.model.language_model.lm_head, Int8Linear)
    assert isinstance(pipe("Hello")[0]["generated_text"], str)


def test_cli_passes_quantize_to_load(monkeypatch):
    from gemma3n import cli

    seen = {}

    def fake_load(path, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr("gemma3n.model.load", fake_load)
    args = cli.build_parser().parse_args(["generate", "--model", "tiny-random", "--quantize", "int4", "hi"])
    with pytest.raises(cli.CliError, match="stop here"):
        cli.load_pipeline("text-generation", args, text_only=True)
    assert seen["quantize"] == "int4"


def test_release_mapped_pages_only_touches_file_mappings(tmp_path):
    anonymous = torch.arange(1 << 16, dtype=torch.float32)
    assert not release_mapped_pages(anonymous)
    assert torch.equal(anonymous, torch.arange(1 << 16, dtype=torch.float32))  # not zeroed
    file = tmp_path / "data.bin"
    values = np.arange(1 << 18, dtype=np.float32)
    values.tofile(file)
    mapped = torch.from_numpy(np.memmap(file, dtype=np.float32, mode="c"))
    assert torch.equal(mapped, torch.from_numpy(values))  # pages now resident
    assert release_mapped_pages(mapped[mmap.PAGESIZE : 3 * mmap.PAGESIZE])
    assert torch.equal(mapped, torch.from_numpy(values))  # still readable: re-read from the file


def test_float32_activations_on_cpu_get_a_speed_warning(tiny_checkpoint):
    with pytest.warns(UserWarning, match="float32 activations"):
        gemma3n.load(tiny_checkpoint, dtype=torch.float32, quantize="int8")
