"""Decode-step cost: the KV cache is sized by what generation can fill, and a step attends over the filled prefix
(rounded up to a bucket), not over the allocated buffer; compiled decoding gives eager's tokens in fp32."""

from __future__ import annotations

import operator

import pytest
import torch
from conftest import save_reference_lm, text_config

import gemma3n
from gemma3n import generation
from gemma3n.text_model import KVCache, kv_cache


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 280, (batch, length), generator=torch.Generator().manual_seed(seed))


_SDPA = torch.nn.functional.scaled_dot_product_attention


class _Recorder:
    """Records the key length of every single-query attention call and the length of every cache allocated."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.key_lengths: list[int] = []
        self.cache_lengths: list[int] = []

        def recording_sdpa(q, k, v, *args, **kwargs):
            if q.shape[-2] == 1:
                self.key_lengths.append(k.shape[-2])
            return _SDPA(q, k, v, *args, **kwargs)

        recorder = self

        class RecordingCache(KVCache):
            def __init__(self, config, batch_size, max_len, **kwargs):
                recorder.cache_lengths.append(max_len)
                super().__init__(config, batch_size, max_len, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
        monkeypatch.setattr(generation, "KVCache", RecordingCache)


def _decode_steps(model, ids: torch.Tensor, steps: int, max_new_tokens: int) -> None:
    """Run the first ``steps`` decode steps of a greedy generation allowed ``max_new_tokens`` tokens."""
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_ids=[-1])
    run = generation._generate_iter(
        model, ids, None, None, None, None, config_overrides=settings, seed=None, generator=None, streamer=None,
        tokenizer=None, generation_config=None,
    )  # fmt: skip
    for _ in range(steps + 1):  # the first yield comes after the prefill's token
        next(run)
    run.close()


def test_decode_cost_does_not_grow_with_max_new_tokens(tiny_lm, monkeypatch):
    """Decode steps attend over the same key positions whatever max_new_tokens allows, and the cache is allocated
    for what can be used: prompt + max_new_tokens, never past the model's context."""
    _, directory = tiny_lm
    model = gemma3n.load(directory, dtype=torch.float32)
    ids = _ids(1, 7)
    per_limit = {}
    for limit in (300, 20_000):
        recorder = _Recorder(monkeypatch)
        _decode_steps(model, ids, steps=5, max_new_tokens=limit)
        per_limit[limit] = recorder
        assert recorder.cache_lengths == [7 + limit]
    assert per_limit[20_000].key_lengths == per_limit[300].key_lengths
    # full-attention layers: the first bucket (256); sliding: the window (5); 7: the prompt, in the prefill's KV-shared
    # layers (which only process the last position)
    assert set(per_limit[20_000].key_lengths) == {256, 5, 7}

    context = model.config.text.max_position_embeddings
    assert generation.cache_length_for(model, 7, 10**9, compile=False) == context
    assert generation.cache_length_for(model, 7, 10**9, compile=True) == context


def test_decode_buckets_grow_with_the_filled_prefix(tiny_lm, monkeypatch):
    """Across bucket boundaries (buckets of 4, 8, 16 positions here) incremental decoding still equals a full forward
    of the generated sequence: each greedy token is the argmax of the full forward's logits one position earlier
    (left-padded batch; fp32, random weights, so no near-ties), and the attended keys follow the powers of two."""
    _, directory = tiny_lm
    model = gemma3n.load(directory, dtype=torch.float32)
    monkeypatch.setattr(kv_cache, "DECODE_BUCKET", 4)
    recorder = _Recorder(monkeypatch)
    ids = _ids(2, 6, seed=3)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[-1])
    full_layers = [n for n in recorder.key_lengths if n != model.config.text.sliding_window]
    # 6: the prompt (prefill, KV-shared layers); decode: positions 6..7 -> 8, 8..15 -> 16, 16 -> the 18-slot cache
    assert sorted(set(full_layers)) == [6, 8, 16, 18]
    full_mask = torch.cat([mask, torch.ones(2, 12, dtype=mask.dtype)], dim=1)
    with torch.inference_mode():
        logits = model(out, attention_mask=full_mask).logits
    chosen = logits[:, 5:-1].gather(-1, out[:, 6:, None])[..., 0]
    best = logits[:, 5:-1].max(-1).values
    assert (best - chosen).max() <= 1e-4  # fp32 summation-order differences are ~1e-5 on these logits (|x| < 30)


def test_compiled_decoding_equals_eager_in_fp32_across_buckets(tmp_path, monkeypatch):
    """fp32: compiled decode steps (inductor) give exactly eager's greedy tokens, also when the attended length grows
    (one compile per bucket: 16 and 32 here)."""
    save_reference_lm(tmp_path, text_config(vocab_size_per_layer_input=300))
    model = gemma3n.load(tmp_path, dtype=torch.float32)
    monkeypatch.setattr(kv_cache, "DECODE_BUCKET", 16)
    ids = _ids(2, 9, seed=17)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    settings = dict(max_new_tokens=12, do_sample=False, eos_token_id=[-1], pad_token_id=0)
    eager = model.generate(ids, attention_mask=mask, **settings)
    compiled = model.generate(ids, attention_mask=mask, compile=True, **settings)
    assert torch.equal(compiled, eager), f"\neager    {eager[:, 9:]}\ncompiled {compiled[:, 9:]}"


@pytest.mark.parametrize("kernel", ["weight-major", "linear"])
@pytest.mark.parametrize("shape", [(1, 1, 96), (2, 1, 96), (4, 96), (3, 5, 96)], ids=["1", "2", "4", "15-rows"])
def test_few_row_bf16_linear_equals_the_float32_product(shape, kernel, monkeypatch):
    """The decoder's Linear (for few bf16 rows on a CPU, the weight-major product or F.linear, whichever this CPU runs
    faster; F.linear otherwise) gives the float32 product of the same bf16 values rounded once to bf16, element by
    element: within a bf16 rounding (2^-8 relative, 8 significant bits) plus a float32 accumulation-order bound
    (products of bf16 values are exact in float32; each of the K additions rounds by at most 2^-24 of the running sum
    of magnitudes), on either kernel (both are checked, whatever this machine would choose)."""
    from gemma3n.text_model import linear
    from gemma3n.text_model.linear import Linear

    monkeypatch.setattr(linear, "_few_row_kernel", kernel)
    monkeypatch.setattr(linear, "SMALL_WEIGHT_ELEMENTS", 0)  # this 200 x 96 weight counts as large

    gen = torch.Generator().manual_seed(0)
    layer = Linear(96, 200, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(200, 96, generator=gen))
    x = torch.randn(shape, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        got = layer(x)
    want = x.float() @ layer.weight.float().T
    assert got.shape == (*shape[:-1], 200) and got.dtype == torch.bfloat16 and got.is_contiguous()
    accumulation = 96 * 2**-24 * (x.float().abs() @ layer.weight.float().abs().T)
    bound = 2**-8 * (want.abs() + accumulation) + accumulation
    assert ((got.float() - want).abs() <= bound).all()


class _GraphRecorder:
    """A torch.compile backend that keeps each traced FX graph and runs it as traced (eagerly)."""

    def __init__(self):
        self.targets: list[object] = []

    def __call__(self, graph_module, example_inputs):
        self.targets += [node.target for node in graph_module.graph.nodes if node.op == "call_function"]
        return graph_module.forward


_BLAS_CALLS = {torch._C._nn.linear, torch.matmul, operator.matmul, torch.ops.aten.mm.default, torch._weight_int8pack_mm}


@pytest.mark.parametrize(
    ("small", "fused_rows", "rows", "fused"),
    [(True, False, 1, True), (False, False, 1, False), (False, True, 1, True), (False, True, 2, False)],
    ids=["small-weight", "large-weight", "large-weight-fused-row", "large-weight-two-rows"],
)
def test_compiled_few_row_product_of_a_small_weight_is_a_fused_multiply_and_sum(
    small, fused_rows, rows, fused, monkeypatch
):
    """Traced by torch.compile, a few-row product with a small weight is a float32 multiply-and-sum (inductor fuses
    it; a BLAS call costs ~35 us however small the weight), rounded once to bf16: within the float32 product's
    bounds of the test above. A weight over the size limit keeps its BLAS call, unless this CPU streams one-row
    products faster fused (``measure_fused_row_product``), and then for one row only. (The row kernel, which takes
    large bf16 weights first where the CPU has AVX512-BF16, is off here: tests/test_row_kernel.py covers it.)"""
    from gemma3n import row_kernels
    from gemma3n.text_model import linear

    monkeypatch.setattr(row_kernels, "_loaded", False)

    gen = torch.Generator().manual_seed(1)
    layer = linear.Linear(96, 200, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(200, 96, generator=gen))
    monkeypatch.setattr(linear, "SMALL_WEIGHT_ELEMENTS", 200 * 96 if small else 200 * 96 - 1)
    monkeypatch.setattr(linear, "_fused_row_product", {torch.bfloat16: fused_rows})
    monkeypatch.setattr(linear, "_few_row_kernel", "linear")
    x = torch.randn(rows, 1, 96, generator=gen).to(torch.bfloat16)
    recorder = _GraphRecorder()
    torch._dynamo.reset()
    with torch.inference_mode():
        got = torch.compile(layer, backend=recorder, fullgraph=True)(x)
    torch._dynamo.reset()
    assert bool(_BLAS_CALLS & set(recorder.targets)) is not fused, recorder.targets
    want = x.float() @ layer.weight.float().T
    accumulation = 96 * 2**-24 * (x.float().abs() @ layer.weight.float().abs().T)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 1, 200)
    assert ((got.float() - want).abs() <= 2**-8 * (want.abs() + accumulation) + accumulation).all()


@pytest.mark.parametrize("inputs", [8192, 8200], ids=["split-in-two", "odd-length"])
def test_fused_product_of_long_rows_sums_in_chunks_within_the_float32_bound(inputs, monkeypatch):
    """Rows longer than inductor's plain-sum limit (4096) are summed as chunks, then their partial sums (no cascade
    helper); a length that does not split evenly keeps one sum. Compiled with inductor, both stay within the float32
    product's bounds (as above, with the K = ``inputs`` accumulation term)."""
    from gemma3n.text_model import linear

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, inputs, generator=gen).to(torch.bfloat16)
    weight = torch.randn(24, inputs, generator=gen).to(torch.bfloat16)
    split = []
    original = torch.Tensor.unflatten
    monkeypatch.setattr(torch.Tensor, "unflatten", lambda t, *a: split.append(a) or original(t, *a))
    eager = linear.fused_small_product(x, weight)
    assert bool(split) is (inputs == 8192)
    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(linear.fused_small_product, fullgraph=True)(x, weight)
    torch._dynamo.reset()
    want = x.float() @ weight.float().T
    accumulation = inputs * 2**-24 * (x.float().abs() @ weight.float().abs().T)
    bound = 2**-8 * (want.abs() + accumulation) + accumulation
    for got in (eager, compiled):
        assert got.dtype == torch.bfloat16 and got.shape == (1, 24)
        assert ((got.float() - want).abs() <= bound).all()


def test_compiled_one_row_lm_head_is_fused_where_that_is_faster(monkeypatch):
    """With fused one-row products on, a compiled one-token LM head makes no BLAS call; its soft-capped logits are
    the float32 product within one bf16 rounding plus the accumulation bound, then capped (tanh is 1-Lipschitz, so
    the cap does not grow the error), all within [-cap, cap]."""
    from gemma3n.text_model import linear
    from gemma3n.text_model.heads import lm_head_logits

    monkeypatch.setattr(linear, "SMALL_WEIGHT_ELEMENTS", 0)
    monkeypatch.setattr(linear, "_fused_row_product", {torch.bfloat16: True})
    monkeypatch.setattr(linear, "_few_row_kernel", "linear")
    gen = torch.Generator().manual_seed(6)
    table = torch.randn(300, 64, generator=gen).to(torch.bfloat16)
    hidden = torch.randn(1, 1, 64, generator=gen).to(torch.bfloat16)
    recorder = _GraphRecorder()
    torch._dynamo.reset()
    with torch.inference_mode():
        got = torch.compile(lm_head_logits, backend=recorder, fullgraph=True)(hidden, table, None, 2.0)
    torch._dynamo.reset()
    assert not _BLAS_CALLS & set(recorder.targets), recorder.targets
    product = hidden.float() @ table.float().T
    accumulation = 64 * 2**-24 * (hidden.float().abs() @ table.float().abs().T)
    bound = 2**-8 * (product.abs() + accumulation) + accumulation + 2**-8 * 2.0  # and the capped value's rounding
    want = 2.0 * torch.tanh(product / 2.0)
    assert got.shape == (1, 1, 300) and ((got.float() - want).abs() <= bound).all()
    assert got.abs().max() <= 2.0


def test_fused_row_choice_is_measured_once_or_set(monkeypatch):
    """``GEMMA3N_FUSED_ROW_PRODUCT`` decides for bf16 and int8 (1 / 0), a wrong value is a clear error, and unset the
    choice is measured per dtype (real compiles and timings here) and kept for the process."""
    from gemma3n.text_model import linear

    for setting, expected in (("1", True), ("0", False)):
        monkeypatch.setattr(linear, "_fused_row_product", None)
        monkeypatch.setenv(linear.FUSED_ROW_ENV, setting)
        assert linear.measure_fused_row_product() == {torch.bfloat16: expected, torch.int8: expected}
    monkeypatch.setattr(linear, "_fused_row_product", None)
    monkeypatch.setenv(linear.FUSED_ROW_ENV, "yes")
    with pytest.raises(ValueError, match="GEMMA3N_FUSED_ROW_PRODUCT='yes'"):
        linear.measure_fused_row_product()
    monkeypatch.delenv(linear.FUSED_ROW_ENV)
    measured = linear.measure_fused_row_product()
    assert set(measured) == {torch.bfloat16, torch.int8} and all(isinstance(v, bool) for v in measured.values())
    assert linear.measure_fused_row_product() is measured


@pytest.mark.parametrize("in_features", [128, 256], ids=["short-rows", "rows-over-the-int8-limit"])
def test_compiled_one_row_int8_product_of_a_large_weight(in_features, monkeypatch):
    """With fused one-row int8 products on, a large int8 weight with rows up to FUSED_INT8_MAX_INPUTS is traced as
    the fused multiply-and-sum (no int8 kernel call), longer rows keep the kernel; both give the kernel's result up to
    float32 summation order, then one bf16 rounding. (The VNNI row kernel, which takes bf16 rows first where the CPU
    has it, is off here: tests/test_row_kernel.py covers it.)"""
    from gemma3n import row_kernels
    from gemma3n.quantize import Int8Linear
    from gemma3n.text_model import linear

    monkeypatch.setattr(row_kernels, "_loaded", False)
    monkeypatch.setattr(linear, "SMALL_WEIGHT_ELEMENTS", 0)
    monkeypatch.setattr(linear, "FUSED_INT8_MAX_INPUTS", 128)
    monkeypatch.setattr(linear, "_fused_row_product", {torch.int8: True})
    gen = torch.Generator().manual_seed(7)
    layer = Int8Linear.from_weight(torch.randn(64, in_features, generator=gen).to(torch.bfloat16))
    x = torch.randn(1, in_features, generator=gen).to(torch.bfloat16)
    recorder = _GraphRecorder()
    torch._dynamo.reset()
    with torch.inference_mode():
        got = torch.compile(layer, backend=recorder, fullgraph=True)(x)
    torch._dynamo.reset()
    assert (torch._weight_int8pack_mm in recorder.targets) is (in_features > 128), recorder.targets
    exact = (x.float() @ layer.qweight.float().T) * layer.scales.float()
    accumulation = 2 * in_features * 2**-24 * (x.float().abs() @ layer.qweight.float().abs().T) * layer.scales.float()
    assert ((got.float() - exact).abs() <= 2**-8 * (exact.abs() + accumulation) + accumulation).all()


def test_compiled_int8_product_of_a_small_weight_is_a_fused_multiply_and_sum():
    """The int8 layer does the same under torch.compile: no int8 kernel call, and the kernel's result (float32 sums
    of exact int8 * bf16 products, times the scale) up to float32 summation order, then one bf16 rounding."""
    from gemma3n.quantize import Int8Linear

    gen = torch.Generator().manual_seed(2)
    layer = Int8Linear.from_weight(torch.randn(64, 128, generator=gen).to(torch.bfloat16))
    x = torch.randn(2, 128, generator=gen).to(torch.bfloat16)
    recorder = _GraphRecorder()
    torch._dynamo.reset()
    with torch.inference_mode():
        got = torch.compile(layer, backend=recorder, fullgraph=True)(x)
        kernel = layer(x)
    torch._dynamo.reset()
    assert not _BLAS_CALLS & set(recorder.targets), recorder.targets
    exact = (x.float() @ layer.qweight.float().T) * layer.scales.float()
    accumulation = 2 * 128 * 2**-24 * (x.float().abs() @ layer.qweight.float().abs().T) * layer.scales.float()
    for result in (got, kernel):
        assert ((result.float() - exact).abs() <= 2**-8 * (exact.abs() + accumulation) + accumulation).all()


@pytest.mark.parametrize("tokens", [1, 3])
def test_lm_head_soft_caps_the_weight_major_product(tokens, monkeypatch):
    """Where the weight-major kernel is the faster, the bf16 CPU LM head soft-caps its contiguous [vocab, m] product
    (vectorised) and returns the [B, T, vocab] view: the same values as soft-capping the row-major product."""
    from gemma3n.text_model import linear
    from gemma3n.text_model.heads import lm_head_logits
    from gemma3n.text_model.linear import weight_major_product

    monkeypatch.setattr(linear, "_few_row_kernel", "weight-major")
    monkeypatch.setattr(linear, "SMALL_WEIGHT_ELEMENTS", 0)

    gen = torch.Generator().manual_seed(3)
    table = torch.randn(300, 64, generator=gen).to(torch.bfloat16)
    hidden = torch.randn(1, tokens, 64, generator=gen).to(torch.bfloat16)
    got = lm_head_logits(hidden, table, None, 2.0)
    want = weight_major_product(hidden, table).div_(2.0).tanh_().mul_(2.0)
    assert got.shape == (1, tokens, 300) and torch.equal(got, want)
    assert got.abs().max() <= 2.0 and got.abs().max() > 1.5  # capped, and the cap did bite


@pytest.mark.parametrize("kernel", ["weight-major", "linear"])
def test_few_row_kernel_choice_routes_large_bf16_products(kernel, monkeypatch):
    """The kernel chosen for this CPU (here forced through the environment variable) runs few-row bf16 products with
    a large weight and the LM head, bit for bit as calling it directly; small weights and fp32 keep F.linear."""
    from gemma3n.text_model import linear
    from gemma3n.text_model.heads import lm_head_logits

    monkeypatch.setattr(linear, "_few_row_kernel", None)
    monkeypatch.setenv(linear.FEW_ROW_KERNEL_ENV, kernel)
    gen = torch.Generator().manual_seed(5)
    weight = torch.randn(600, 1024, generator=gen).to(torch.bfloat16)  # over SMALL_WEIGHT_ELEMENTS (2^19)
    x = torch.randn(1, 2, 1024, generator=gen).to(torch.bfloat16)
    direct = linear.weight_major_product if kernel == "weight-major" else torch.nn.functional.linear
    assert torch.equal(linear.linear_product(x, weight), direct(x, weight))
    assert linear.few_row_bf16_kernel() == kernel
    logits = lm_head_logits(x, weight, None, None)
    assert torch.equal(logits, direct(x, weight))
    small = weight[:256, :1024]  # 2^18 elements
    assert torch.equal(linear.linear_product(x, small), torch.nn.functional.linear(x, small))


def test_few_row_kernel_is_measured_once_and_checked(monkeypatch):
    """Unset, the choice is measured on first use (one of the two kernels) and kept for the process; a wrong value
    of the environment variable is a clear error naming it."""
    from gemma3n.text_model import linear

    monkeypatch.setattr(linear, "_few_row_kernel", None)
    monkeypatch.delenv(linear.FEW_ROW_KERNEL_ENV, raising=False)
    calls = []
    choose = linear._choose_few_row_kernel
    monkeypatch.setattr(linear, "_choose_few_row_kernel", lambda: calls.append(1) or choose())
    first = linear.few_row_bf16_kernel()
    assert first in ("weight-major", "linear") and linear.few_row_bf16_kernel() == first and len(calls) == 1

    monkeypatch.setattr(linear, "_few_row_kernel", None)
    monkeypatch.setenv(linear.FEW_ROW_KERNEL_ENV, "mv")
    with pytest.raises(ValueError, match="GEMMA3N_BF16_FEW_ROW_KERNEL='mv'"):
        linear.few_row_bf16_kernel()


@pytest.mark.parametrize("tokens", [1, 8], ids=["decode", "prefill"])
def test_compiled_altup_mix_of_few_tokens_is_a_fused_multiply_and_sum(tokens):
    """Traced by torch.compile with a few tokens on the CPU, AltUp's n x n stream mix is a float32 multiply-and-sum
    (no bmm call): the eager prediction up to float32 summation order (4 terms: within 1e-6 relative here). More
    tokens keep the batched matmul."""
    from gemma3n.config import TextConfig
    from gemma3n.text_model.layers import AltUp

    gen = torch.Generator().manual_seed(4)
    altup = AltUp(TextConfig(hidden_size=64))
    with torch.no_grad():
        for parameter in altup.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=gen))
    streams = torch.randn(altup.n, 1, tokens, 64, generator=gen)
    recorder = _GraphRecorder()
    torch._dynamo.reset()
    with torch.inference_mode():
        got = torch.compile(altup.predict, backend=recorder, fullgraph=True)(streams)
        want = altup.predict(streams)
    torch._dynamo.reset()
    assert bool((_BLAS_CALLS | {torch.bmm}) & set(recorder.targets)) is (tokens > 4), recorder.targets
    assert got.shape == want.shape == streams.shape
    assert ((got - want).norm() / want.norm()).item() <= 1e-6
