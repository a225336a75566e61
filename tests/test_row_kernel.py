"""The CPU row kernel: 1-4 bf16 rows against a dense bf16 weight (gemma3n/row_kernels.py and
csrc/few_row_products.cpp).

Bound against float64, as for any bf16 product (see test_packed_weights.py): one bf16 rounding of each output (2^-8
relative) plus float32 summation error, at most ``in * 2^-24`` of the sum of |terms| (VDPBF16PS forms each product of
two bf16 values exactly in float32). The kernel is built wherever the CPU has AVX512-BF16; elsewhere the tests check
that products keep the other kernels and that the reason is given.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import int4_kernel_input_step
from test_packed_weights import _left_padded_batch, _teacher_forced_logits, within_product_bound

import gemma3n
from gemma3n import quantize, quantized_kernels, row_kernels
from gemma3n.row_kernels import (
    cpu_has_int4_row_kernel_instructions,
    cpu_has_row_kernel_instructions,
    row_kernel_product,
    row_kernel_status,
    uses_int4_row_kernel,
    uses_int8_row_kernel,
    uses_row_kernel,
)
from gemma3n.text_model import linear

needs_kernel = pytest.mark.skipif(
    not cpu_has_row_kernel_instructions(), reason="no AVX512-BF16 and VNNI: the next test checks the fallback"
)


def test_the_kernel_is_built_exactly_where_the_cpu_has_the_instructions():
    status = row_kernel_status()
    if cpu_has_row_kernel_instructions():
        assert status == "on", f"the row kernel did not build on a CPU with AVX512-BF16: {status}"
    else:
        assert status == "off: the CPU lacks AVX512-BF16 or AVX512-VNNI"
        x, weight = torch.randn(1, 64).bfloat16(), torch.randn(1 << 20, 64).bfloat16()
        assert not uses_row_kernel(x, weight)
        assert within_product_bound(linear.linear_product(x, weight), x, weight)  # the other kernels serve
    int4 = quantize.Int4Linear.from_weight(torch.randn(64, 64).bfloat16())
    x = torch.randn(1, 64).bfloat16()
    assert uses_int4_row_kernel(x, int4.packed, int4.scales_and_zeros, 64) == cpu_has_int4_row_kernel_instructions()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("inputs", [2048, 64, 96, 33, 8200])  # whole and partial groups of 32 values
def test_products_match_the_float64_product(rows, inputs):
    generator = torch.Generator().manual_seed(rows * 10_000 + inputs)
    weight = torch.randn(1000, inputs, generator=generator).bfloat16()
    x = torch.randn(rows, inputs, generator=generator).bfloat16()
    got = row_kernel_product(x, weight)
    assert got.shape == (rows, 1000) and got.dtype == torch.bfloat16
    assert within_product_bound(got, x, weight)
    assert within_product_bound(F.linear(x, weight), x, weight)  # the reference product keeps the same bound


@needs_kernel
def test_leading_dimensions_views_and_the_products_that_do_not_qualify():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(640, 256, generator=generator).bfloat16()
    x = torch.randn(2, 1, 512, generator=generator).bfloat16()[..., ::2]  # [2, 1, 256], not contiguous
    got = row_kernel_product(x, weight)
    assert got.shape == (2, 1, 640)
    assert torch.equal(got.reshape(2, 640), row_kernel_product(x.reshape(2, 256).contiguous(), weight))
    assert uses_row_kernel(x, weight)
    assert not uses_row_kernel(torch.zeros(5, 256).bfloat16(), weight)  # more than 4 rows: prefill keeps oneDNN
    assert not uses_row_kernel(x.float(), weight.float())  # float32 keeps the reference's kernels
    assert not uses_row_kernel(x, weight.t())  # a transposed (non-contiguous) weight
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        torch.ops.gemma3n_cpu.bf16_few_row_product(torch.zeros(5, 256).bfloat16(), weight)


@needs_kernel
def test_linear_layers_use_it_for_large_weights_only(monkeypatch):
    calls = []
    monkeypatch.setattr(linear, "row_kernel_product", lambda x, w: calls.append(w.shape) or row_kernel_product(x, w))
    small = torch.randn(64, 64).bfloat16()
    large = torch.randn(linear.SMALL_WEIGHT_ELEMENTS // 64 + 1, 64).bfloat16()
    x = torch.randn(1, 64).bfloat16()
    assert torch.equal(linear.linear_product(x, small), F.linear(x, small))
    assert within_product_bound(linear.linear_product(x, large), x, large)
    assert calls == [large.shape]


@needs_kernel
def test_a_model_decodes_the_same_through_the_kernel_eager_and_compiled(tiny_lm, monkeypatch):
    """Every few-row product of the tiny bf16 model through the kernel (its weights all count as large): the same
    logits as with the kernel off, up to summation order; the compiled step's graph calls the kernel too."""
    from gemma3n.generation import compiled_decode_step, decode_step

    assert row_kernels.prepare_row_kernel()
    model = gemma3n.load(tiny_lm[1], dtype=torch.bfloat16)
    ids, mask = _left_padded_batch()
    with torch.inference_mode():
        monkeypatch.setattr(row_kernels, "_loaded", False)  # off: oneDNN and the fused reductions
        plain = _teacher_forced_logits(model, ids, mask, decode_step)
        monkeypatch.setattr(row_kernels, "_loaded", True)
        monkeypatch.setattr(linear, "SMALL_WEIGHT_ELEMENTS", 0)
        traced = []
        counted = lambda x, w: traced.append(x.shape) or row_kernel_product(x, w)  # noqa: E731
        monkeypatch.setattr(linear, "row_kernel_product", counted)
        eager = _teacher_forced_logits(model, ids, mask, decode_step)
        eager_calls = len(traced)
        compiled = _teacher_forced_logits(model, ids, mask, compiled_decode_step(model))
    assert eager_calls > 0 and len(traced) > eager_calls  # the compiled step traced the kernel's op
    for got in (eager, compiled):  # a few bf16 roundings of the layers' outputs apart, as for packed weights
        rel = ((got - plain).norm() / plain.norm()).item()
        assert rel < 2e-2, rel


def _status_in_a_fresh_process(env_value: str) -> subprocess.CompletedProcess:
    code = "from gemma3n.row_kernels import row_kernel_status; print(row_kernel_status())"
    env = {**os.environ, row_kernels.ROW_KERNEL_ENV: env_value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_the_setting_turns_it_off_and_a_bad_value_is_named():
    off = _status_in_a_fresh_process("0")
    assert off.returncode == 0 and off.stdout.strip() == "off: GEMMA3N_ROW_KERNEL=0", off.stderr
    bad = _status_in_a_fresh_process("yes")
    assert bad.returncode != 0 and "GEMMA3N_ROW_KERNEL='yes'" in bad.stderr


def test_without_a_compiler_products_fall_back_with_one_line_of_reason(tmp_path):
    """A machine where the build fails (here: no C++ compiler on PATH) keeps the other kernels and says why once."""
    code = (
        "import torch\n"
        "from gemma3n import row_kernels\nfrom gemma3n.text_model import linear\n"
        "row_kernels.cpu_has_row_kernel_instructions = lambda: True\n"  # as on a machine that has the instructions
        "x, w = torch.randn(1, 64).bfloat16(), torch.randn(1 << 14, 64).bfloat16()\n"
        "assert torch.equal(linear.linear_product(x, w), torch.nn.functional.linear(x, w))\n"
        "print(row_kernels.row_kernel_status())\n"
    )
    env = {
        **os.environ,
        "PATH": str(tmp_path),  # no c++, no ninja
        "CXX": "/nonexistent/c++",
        "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"),  # nothing cached from earlier builds
        linear.FEW_ROW_KERNEL_ENV: "linear",  # F.linear, not the weight-major product, after the row kernel
    }
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().startswith("off: building it failed"), run.stdout
    reasons = [line for line in run.stderr.splitlines() if "row kernel is off" in line]
    assert len(reasons) == 1, run.stderr


def _eager_and_traced(layer: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list]:
    """``layer(x)`` eager and compiled (whole graph), and the ops the compiled graph calls."""
    from test_decode_speed import _GraphRecorder

    with torch.inference_mode():
        eager = layer(x)
        recorder = _GraphRecorder()
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend=recorder, fullgraph=True)(x)
        torch._dynamo.reset()
    return eager, compiled, recorder.targets


# ---- int8 weights (AVX512-VNNI) -------------------------------------------------------------------------------------
def within_int8_bound(got: torch.Tensor, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> bool:
    """``got`` = x @ (qweight * scales).T within the kernel's two roundings: each x row to 16-bit fixed point (at most
    2^-16 of the row's largest |value| per value, times sum |w * scale|) and the output to its dtype (2^-8 relative for
    bf16, 2^-24 for float32); the integer sums are exact."""
    weight = qweight.double() * scales.double()[:, None]
    exact = x.double() @ weight.T
    largest = x.double().abs().amax(-1, keepdim=True)
    fixed_point = 2**-16 * largest * weight.abs().sum(1)  # [m, out]
    output = 2**-8 if got.dtype == torch.bfloat16 else 2**-24
    bound = output * (exact.abs() + fixed_point) + fixed_point * (1 + 1e-6) + 1e-30
    return bool(((got.double() - exact).abs() <= bound).all())


def _int8_operands(rows: int, inputs: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-127, 128, (700, inputs), generator=generator, dtype=torch.int8)
    scales = (torch.rand(700, generator=generator) * 0.01 + 1e-3).bfloat16()
    x = torch.randn(rows, inputs, generator=generator) * torch.logspace(-3, 1, inputs)  # values of many magnitudes
    return x, qweight, scales


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 31])  # more than 4: groups of 4 and a remainder
@pytest.mark.parametrize("inputs", [2048, 8192, 100, 8200, 33])  # one block or several, whole or partial 64-byte groups
def test_int8_products_stay_within_their_two_roundings(rows, inputs):
    x, qweight, scales = _int8_operands(rows, inputs, seed=rows * 10_000 + inputs)
    assert row_kernels.prepare_row_kernel()
    for dtype in (torch.bfloat16, torch.float32):  # decode steps use bf16 rows; the op takes float32 too
        got = row_kernels.int8_row_kernel_product(x.to(dtype), qweight, scales)
        assert got.shape == (rows, 700) and got.dtype == dtype
        assert within_int8_bound(got, x.to(dtype), qweight, scales), dtype


@needs_kernel
def test_int8_products_of_zero_and_non_finite_rows():
    _, qweight, scales = _int8_operands(1, 64, seed=9)
    x = torch.randn(3, 64)
    x[1] = 0.0
    x[2, 5] = float("nan")
    assert row_kernels.prepare_row_kernel()
    got = row_kernels.int8_row_kernel_product(x, qweight, scales)
    assert within_int8_bound(got[:1], x[:1], qweight, scales)
    assert torch.equal(got[1], torch.zeros(700)) and got[2].isnan().all()
    bf16 = x.bfloat16()
    assert uses_int8_row_kernel(bf16, qweight) and not uses_int8_row_kernel(x, qweight)  # float32 keeps torch's
    assert not uses_int8_row_kernel(torch.randn(32, 64).bfloat16(), qweight)  # 32 rows and more: torch's kernel
    through_layers = quantized_kernels.int8_product(bf16, qweight, scales)
    assert torch.equal(through_layers[:2], row_kernels.int8_row_kernel_product(bf16, qweight, scales)[:2])


@needs_kernel
def test_int8_layers_use_it_eager_and_compiled(monkeypatch):
    """An int8 layer's 1-4 row products go through the kernel, traced into a compiled graph as its op (not the
    fused multiply-and-sum or torch's int8 kernel); so do more rows (up to 31)."""
    from gemma3n.quantize import Int8Linear

    monkeypatch.setattr(linear, "SMALL_WEIGHT_ELEMENTS", 0)
    monkeypatch.setattr(quantize, "SMALL_WEIGHT_ELEMENTS", 0)
    weight = torch.randn(300, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    layer = Int8Linear.from_weight(weight)
    x = torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(3)).bfloat16()
    eager, compiled, targets = _eager_and_traced(layer, x)
    with torch.inference_mode():
        many = layer(torch.randn(6, 128).bfloat16())
    assert targets == [torch.ops.gemma3n_cpu.int8_few_row_product], targets
    assert torch.equal(compiled, eager)
    assert within_int8_bound(eager.reshape(2, 300), x.reshape(2, 128), layer.qweight, layer.scales)
    assert many.shape == (6, 300)


def _quantized_decode_errors(tiny_lm, mode: str, kernel: str, monkeypatch) -> tuple[float, float, list]:
    """Teacher-forced prefill and decode logits of the tiny model at ``quantize=mode`` with bf16 activations, through
    torch's kernels and through ours (``kernel``, the product function the layers call), each as its relative error
    against the same model with float32 activations (torch's kernels, no bf16 rounding); and the row counts ours got."""
    from gemma3n.generation import decode_step

    assert row_kernels.prepare_row_kernel()
    ids, mask = _left_padded_batch()
    with torch.inference_mode():
        float32 = gemma3n.load(tiny_lm[1], dtype=torch.float32, quantize=mode)
        reference = _teacher_forced_logits(float32, ids, mask, decode_step)
        model = gemma3n.load(tiny_lm[1], dtype=torch.bfloat16, quantize=mode)
        monkeypatch.setattr(row_kernels, "_loaded", False)
        torch_kernel = _teacher_forced_logits(model, ids, mask, decode_step)
        monkeypatch.setattr(row_kernels, "_loaded", True)
        calls = []
        original = getattr(row_kernels, kernel)
        monkeypatch.setattr(quantized_kernels, kernel, lambda *a: calls.append(a[0].shape[0]) or original(*a))
        ours = _teacher_forced_logits(model, ids, mask, decode_step)

    def error(got: torch.Tensor) -> float:
        return ((got - reference).norm() / reference.norm()).item()

    return error(torch_kernel), error(ours), calls


@needs_kernel
def test_an_int8_model_decodes_the_same_through_the_kernel(tiny_lm, monkeypatch):
    """Teacher-forced prefill (18 rows) and decode steps (2 rows) of the tiny model at quantize="int8" with bf16
    activations: through the kernel, no further from the float32-activation model than through torch's int8 kernel.
    Both round the same products to bf16 (ours rounds x to 16 bits first, 2^-16, and sums exactly), so their errors
    are of one size; 1.5x plus 1e-3 leaves room for where the roundings happen to fall."""
    torch_error, our_error, calls = _quantized_decode_errors(tiny_lm, "int8", "int8_row_kernel_product", monkeypatch)
    assert 2 in calls and 18 in calls  # the decode steps' and the prefill's products went through the kernel
    assert our_error <= 1.5 * torch_error + 1e-3, (our_error, torch_error)


# ---- int8 weights in tiles of 32 rows (the same products, another layout) ----------------------------------------
def test_int8_tiles_lay_out_each_pair_of_inputs_of_32_rows_together():
    """Tile t, pair p, row j, byte b of the tiled weight holds q[32 t + j, 2 p + b]; rows go back exactly."""
    q = torch.randint(-128, 128, (64, 10), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    tiles = quantized_kernels.int8_tiles(q)
    assert tiles.shape == q.shape and tiles.dtype == torch.int8
    flat = tiles.reshape(-1)
    for t, p, j, b in [(0, 0, 0, 0), (0, 0, 0, 1), (0, 0, 31, 1), (0, 4, 7, 0), (1, 2, 5, 1), (1, 4, 31, 1)]:
        assert flat[t * 32 * 10 + p * 64 + 2 * j + b] == q[32 * t + j, 2 * p + b]
    assert torch.equal(quantized_kernels.int8_rows_of_tiles(tiles), q)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 31, 40])  # more than 4: groups of 4 over each tile
@pytest.mark.parametrize(("outputs", "inputs"), [(32, 2), (64, 100), (96, 258), (704, 2048), (64, 8194)])
def test_tiled_int8_products_equal_the_row_kernels(rows, outputs, inputs):
    """The tiled kernel forms the same exact integer sums from the same 16-bit x (in another order), so its outputs
    equal int8_few_row_product's bit for bit: odd pair counts, several 256-input flushes, weights of -128 and 127."""
    generator = torch.Generator().manual_seed(rows * 1000 + inputs)
    qweight = torch.randint(-128, 128, (outputs, inputs), generator=generator, dtype=torch.int8)
    qweight[0], qweight[-1] = 127, -128  # the largest products a lane can take
    scales = (torch.rand(outputs, generator=generator) + 0.01).bfloat16()
    x = torch.randn(rows, inputs, generator=generator) * torch.logspace(-3, 1, inputs)
    x[0, 0] = 1e3
    tiles = quantized_kernels.int8_tiles(qweight)
    assert row_kernels.prepare_row_kernel()
    for dtype in (torch.bfloat16, torch.float32):
        rows_kernel = row_kernels.int8_row_kernel_product(x.to(dtype), qweight, scales)
        tiled_kernel = row_kernels.int8_tiles_row_kernel_product(x.to(dtype), tiles, scales)
        assert torch.equal(tiled_kernel, rows_kernel), dtype


@needs_kernel
def test_tiled_int8_layers_give_the_layers_outputs_in_every_path(monkeypatch):
    """An int8 layer tiled in place (use_tiles) gives the untiled layer's outputs bit for bit: 1-31 rows and prefill
    below ROW_KERNEL_PREFILL_ROWS through the tiled kernel (traced as its op when compiled), more rows dequantized
    from the tiles, float32 rows through torch's kernel; its dequantized weight, transposed copy and state dict are
    the rows'. Weights that do not divide into tiles stay in rows."""
    monkeypatch.setattr(quantize, "SMALL_WEIGHT_ELEMENTS", 0)
    weight = torch.randn(320, 256, generator=torch.Generator().manual_seed(4)).bfloat16()
    rows_layer = quantize.Int8Linear.from_weight(weight)
    layer = quantize.Int8Linear.from_weight(weight)
    assert layer.can_tile() and layer.use_tiles() and layer.tiled
    assert not torch.equal(layer.qweight, rows_layer.qweight)  # really another layout
    assert "in tiles of 32 rows" in repr(layer)
    generator = torch.Generator().manual_seed(5)
    with torch.inference_mode():
        for count in (1, 4, 31, 40, quantize.ROW_KERNEL_PREFILL_ROWS["int8 tiles"] + 6):
            x = torch.randn(1, count, 256, generator=generator).bfloat16()
            assert torch.equal(layer(x), rows_layer(x)), count
        x = torch.randn(3, 256, generator=generator)
        assert torch.equal(layer(x.bfloat16()).float(), rows_layer(x.bfloat16()).float())
        assert torch.equal(layer(x.float()), rows_layer(x.float()))  # float32 rows: torch's kernel, in rows
    eager, compiled, targets = _eager_and_traced(layer, torch.randn(2, 1, 256, generator=generator).bfloat16())
    assert targets == [torch.ops.gemma3n_cpu.int8_tiles_product], targets
    assert torch.equal(compiled, eager)
    assert torch.equal(layer.dequantized(torch.bfloat16), rows_layer.dequantized(torch.bfloat16))
    assert torch.equal(layer.dequantized(torch.float32, 64, 128), rows_layer.dequantized(torch.float32, 64, 128))
    assert torch.equal(layer.transposed_qweight(), rows_layer.transposed_qweight())
    state = layer.state_dict()
    assert torch.equal(state["qweight"], rows_layer.qweight)
    fresh = quantize.Int8Linear.from_weight(torch.zeros(320, 256).bfloat16())
    fresh.use_tiles()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.qweight, layer.qweight)
    assert not layer.use_tiles(False) and torch.equal(layer.qweight, rows_layer.qweight)
    odd = quantize.Int8Linear.from_weight(torch.randn(100, 256).bfloat16())  # 100 rows: no whole tiles
    assert not odd.can_tile() and not odd.use_tiles()


@needs_kernel
def test_an_int8_model_with_tiled_weights_gives_the_same_logits_and_tokens(tiny_lm, monkeypatch):
    """With every divisible int8 weight tiled (the size floor lowered, so the tiny model's weights qualify; at load
    on a CPU, once attached: no tiled weight went through a state dict, whose rows copy would cost a second copy of
    the weights), teacher-forced prefill and decode logits of a left-padded batch and compiled greedy tokens equal
    those of the untiled model. The sparse layers' up and down weights stay in rows: their decode product gathers
    rows."""
    from gemma3n.generation import decode_step

    ids, mask = _left_padded_batch()
    monkeypatch.setattr(quantize, "SMALL_WEIGHT_ELEMENTS", 0)
    copies = []
    hook = quantize._int8_rows_in_state_dict
    monkeypatch.setattr(quantize, "_int8_rows_in_state_dict", lambda m, *a: copies.append(m.tiled) or hook(m, *a))
    with torch.inference_mode():
        tiled = gemma3n.load(tiny_lm[1], dtype=torch.bfloat16, quantize="int8")
        assert copies and not any(copies)  # state dicts were taken before tiling only
        with monkeypatch.context() as untiled_only:
            untiled_only.setattr(quantize.Int8Linear, "can_tile", lambda self: False)
            rows = gemma3n.load(tiny_lm[1], dtype=torch.bfloat16, quantize="int8")
        layers = [m for m in tiled.modules() if isinstance(m, quantize.Int8Linear)]
        assert sum(m.tiled for m in layers) >= len(layers) // 2, [m.tiled for m in layers]
        assert not any(m.tiled for m in rows.modules() if isinstance(m, quantize.Int8Linear))
        for layer in tiled.language_model.layers:
            if layer.mlp.sparse_decode is not None:
                assert not layer.mlp.up_proj.tiled and not layer.mlp.down_proj.tiled
        assert torch.equal(
            _teacher_forced_logits(tiled, ids, mask, decode_step), _teacher_forced_logits(rows, ids, mask, decode_step)
        )
        prompt = ids[:1, -6:]
        settings = {"max_new_tokens": 4, "do_sample": False, "compile": True}
        assert torch.equal(tiled.generate(prompt, **settings), rows.generate(prompt, **settings))


# ---- int4 weights (AVX512-VNNI and VBMI, torch's CPU int4 packing) -------------------------------------------------
needs_int4_kernel = pytest.mark.skipif(
    not cpu_has_int4_row_kernel_instructions(), reason="no AVX512-BF16, VNNI and VBMI: torch's int4 kernel serves"
)


def int4_error_bound(x: torch.Tensor, layer: quantize.Int4Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact, bound) [m, out], float64: x @ W.T for the int4 layer's weight W = (q - 8) * scale + zero, and how far
    the kernel's result may be from it through its roundings: x to 8 bits per group of inputs (at most the group's
    largest |value| / 254 per value, times the group's sum |w|; 1% more for the float32 scale and its inverse); per
    group, float32 for the exact integer sums, the offset z - 8 s, the two multiply-adds and the scaling by x's group
    scale, then a float32 running total over the groups (together at most (groups + 5) * 2^-24 of the sum of
    |s q x| + |z - 8 s| |x| over the terms); the output to bf16 (2^-8 relative)."""
    weight = layer.dequantized(torch.float64)[: layer.out_features]  # [out, in]
    exact = x.double() @ weight.T
    group = layer.group_size
    groups = layer.in_features // group
    step = int4_kernel_input_step(x, group) * 1.01  # [m, in]
    fixed_point = step @ weight.abs().T  # [m, out]
    scale, zero = layer.scales_and_zeros[:, : layer.out_features].double().unbind(-1)  # [groups, out]
    q_part = (weight - (zero - 8 * scale).repeat_interleave(group, 0).T).abs()  # s * q, [out, in]
    offset = (zero - 8 * scale).abs().repeat_interleave(group, 0).T  # |z - 8 s|, [out, in]
    terms = (x.double().abs() + step) @ (q_part + offset).T  # [m, out]
    float32 = (groups + 5) * 2**-24 * terms * 1.01
    return exact, 2**-8 * (exact.abs() + fixed_point + float32) + fixed_point + float32 + 1e-30


def within_int4_bound(got: torch.Tensor, x: torch.Tensor, layer: quantize.Int4Linear) -> bool:
    exact, bound = int4_error_bound(x, layer)
    return bool(((got.double() - exact).abs() <= bound).all())


def _int4_layer(inputs: int, group: int, seed: int, outputs: int = 700) -> quantize.Int4Linear:
    weight = torch.randn(outputs, inputs, generator=torch.Generator().manual_seed(seed)) * 0.05
    weight[:, :group] += 0.3  # groups of different offsets: zero - 8 * scale far from 0
    return quantize.Int4Linear.from_weight(weight.bfloat16(), group_size=group)


def _int4_rows(rows: int, inputs: int, seed: int) -> torch.Tensor:
    x = torch.randn(rows, inputs, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-3, 1, inputs)
    return x.bfloat16()


@needs_int4_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 31])  # more than 4: groups of 4 and a remainder
@pytest.mark.parametrize(("inputs", "group"), [(2048, 64), (8192, 64), (128, 32), (512, 128), (256, 256), (96, 32)])
def test_int4_products_stay_within_their_roundings(rows, inputs, group):
    layer = _int4_layer(inputs, group, seed=inputs + group)
    x = _int4_rows(rows, inputs, seed=rows)
    assert uses_int4_row_kernel(x, layer.packed, layer.scales_and_zeros, group)
    got = row_kernels.int4_row_kernel_product(x, layer.packed, layer.scales_and_zeros, group, layer.out_features)
    assert got.shape == (rows, 700) and got.dtype == torch.bfloat16  # the 4 zero rows padding 700 to 704 are cut off
    assert within_int4_bound(got, x, layer)
    # torch's kernel on the same weight (float x, a bf16 output): the same product up to both kernels' roundings
    reference = quantized_kernels.torch_int4_product(x, layer.packed, layer.scales_and_zeros, group, 700)
    exact, bound = int4_error_bound(x, layer)
    rel = ((got.double() - reference.double()).norm() / exact.norm()).item()
    assert rel <= (bound.norm() / exact.norm()).item() + 2**-8 * 1.01, rel


@needs_int4_kernel
def test_int4_products_of_zero_and_non_finite_rows_and_the_products_that_do_not_qualify():
    layer = _int4_layer(128, 64, seed=4)
    x = _int4_rows(3, 128, seed=5)
    x[1] = 0.0
    x[2, 7] = float("nan")
    got = quantized_kernels.int4_product(x, layer.packed, layer.scales_and_zeros, 64, 700)
    assert within_int4_bound(got[:1], x[:1], layer)
    assert torch.equal(got[1], torch.zeros(700, dtype=torch.bfloat16)) and got[2].isnan().all()
    sz = layer.scales_and_zeros
    assert not uses_int4_row_kernel(x.float(), layer.packed, sz, 64)  # float32 rows keep torch's kernel
    assert not uses_int4_row_kernel(_int4_rows(32, 128, seed=6), layer.packed, sz, 64)  # 32 rows: torch's kernel
    assert not uses_int4_row_kernel(x, layer.packed, sz.float(), 64)  # float32 scales (a float32 model)
    with pytest.raises(ValueError, match="group_size=48"):
        _int4_layer(96, 48, seed=7)
    many = quantized_kernels.int4_product(_int4_rows(32, 128, seed=6), layer.packed, sz, 64, 700)
    assert many.shape == (32, 700)


@needs_int4_kernel
def test_int4_layers_use_it_eager_and_compiled():
    """An int4 layer's 1-4 row products go through the kernel, traced into a compiled graph as its op."""
    layer = _int4_layer(128, 64, seed=8, outputs=300)
    x = _int4_rows(2, 128, seed=9).view(2, 1, 128)
    eager, compiled, targets = _eager_and_traced(layer, x)
    assert targets == [torch.ops.gemma3n_cpu.int4_few_row_product], targets
    assert torch.equal(compiled, eager) and eager.shape == (2, 1, 300)
    assert within_int4_bound(eager.reshape(2, 300), x.reshape(2, 128), layer)


@needs_int4_kernel
def test_an_int4_model_decodes_the_same_through_the_kernel(tiny_lm, monkeypatch):
    """As for int8 (a left-padded batch of 2, sliding-window layers): through the int4 kernel, no further from the
    float32-activation int4 model than through torch's int4 kernel (1.5x plus 1e-3). Ours rounds x to 8 bits per
    group (2^-8 of the group's largest |x|) where torch's keeps bf16's 8 bits per value, so its error is of the same
    size, a little larger on this random model, which amplifies every perturbation (measured 0.165 against 0.157)."""
    torch_error, our_error, calls = _quantized_decode_errors(tiny_lm, "int4", "int4_row_kernel_product", monkeypatch)
    assert 2 in calls and 18 in calls
    assert our_error <= 1.5 * torch_error + 1e-3, (our_error, torch_error)


@needs_int4_kernel
def test_prefill_products_keep_the_kernels_below_their_row_counts(monkeypatch):
    """The quantized layers' prefill ops (32 rows and more) use the kernels below ``ROW_KERNEL_PREFILL_ROWS`` bf16
    rows, within the kernels' bounds, and dequantize the weight for a float matmul from there on."""
    calls = []
    for name in ("int8_row_kernel_product", "int4_row_kernel_product"):
        original = getattr(quantize, name)
        monkeypatch.setattr(quantize, name, lambda *a, original=original: calls.append(a[0].shape[0]) or original(*a))
    int8 = quantize.Int8Linear.from_weight(torch.randn(300, 128, generator=torch.Generator().manual_seed(1)).bfloat16())
    int4 = _int4_layer(128, 64, seed=2, outputs=300)
    int8_limit, int4_limit = quantize.ROW_KERNEL_PREFILL_ROWS["int8"], quantize.ROW_KERNEL_PREFILL_ROWS["int4"]
    with torch.inference_mode():
        x = _int4_rows(int8_limit - 1, 128, seed=3)
        assert within_int8_bound(int8(x.view(1, -1, 128)).view(-1, 300), x, int8.qweight, int8.scales)
        assert calls == [int8_limit - 1]
        int8(_int4_rows(int8_limit, 128, seed=4))
        assert calls == [int8_limit - 1]  # dequantized
        x = _int4_rows(int4_limit - 1, 128, seed=5)
        assert within_int4_bound(int4(x.view(1, -1, 128)).view(-1, 300), x, int4)
        assert calls == [int8_limit - 1, int4_limit - 1]
        int4(_int4_rows(int4_limit, 128, seed=6))
        int4(_int4_rows(40, 128, seed=7).float())  # float32 rows: dequantized, as before
    assert calls == [int8_limit - 1, int4_limit - 1]
