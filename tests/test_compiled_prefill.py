"""Compiled prefill (``TextModel.enable_compiled_prefill``, on with ``generate(compile=True)``): each layer's work
around attention runs through torch.compile for prefill-sized inputs.

Tolerances: fp32 logits within 1e-5 relative of transformers (the project's fp32 bound; fused kernels only reorder
float32 sums). Quantized layers (their prefill product a custom op) are covered in tests/test_quantize.py.
bf16: the compiled blocks keep float32 intermediates where eager rounds each op's output to bf16, so
their distance to a float32 computation of the same bf16 model is at most eager's distance plus a margin of 25% (the
error both share, the rounding of weights, matmul outputs and layer outputs to bf16, is most of it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err, save_reference_lm, text_config

import gemma3n
from gemma3n.text_model import layers

FP32_TOL = 1e-5


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    directory = tmp_path_factory.mktemp("compiled_prefill")
    ref = save_reference_lm(directory, text_config(vocab_size_per_layer_input=300))
    return ref, directory


@pytest.fixture
def block_calls(monkeypatch):
    """Counts the calls of the compiled blocks (before, after) by the number of rows they see."""
    compiled_before, compiled_after = layers.compiled_blocks()
    calls: list[int] = []

    def before(layer, streams):
        calls.append(streams[0].numel() // streams.shape[-1])
        return compiled_before(layer, streams)

    monkeypatch.setattr(layers, "compiled_blocks", lambda: (before, compiled_after))
    return calls


def _batch():
    ids = torch.randint(3, 280, (2, 11), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    return ids, mask


def test_fp32_prefill_matches_the_reference(reference, block_calls):
    """Every layer (sparse and dense MLPs, sliding and global, KV-shared) takes the compiled path on a left-padded
    batch, and the logits stay within 1e-5 of transformers'."""
    ref, directory = reference
    ours = gemma3n.load(directory, dtype=torch.float32)
    layer_count = ours.config.text.num_hidden_layers
    assert ours.language_model.enable_compiled_prefill() == layer_count
    ids, mask = _batch()
    with torch.inference_mode():
        got = ours(ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert rel_err(got[real], want[real]) <= FP32_TOL
    assert block_calls == [22] * layer_count  # 2 x 11 rows through every layer


def test_decode_steps_stay_eager_and_tokens_match(reference, block_calls):
    """With the compiled prefill on, decode steps (up to FEW_ROWS rows) stay eager, and fp32 greedy tokens equal
    those of a fully eager generation (``generate(compile=True)`` turns it on: tests/test_text_model.py)."""
    _, directory = reference
    ours = gemma3n.load(directory, dtype=torch.float32)
    ids, mask = _batch()
    settings = dict(max_new_tokens=6, do_sample=False, eos_token_id=[-1], pad_token_id=0)
    eager = ours.generate(ids, attention_mask=mask, **settings)
    assert block_calls == []
    ours.language_model.enable_compiled_prefill()
    fused = ours.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(fused, eager), f"\neager {eager[:, 11:]}\nfused {fused[:, 11:]}"
    # the prefill only: its KV-shared layers see just the last position (2 rows), which stays eager too
    assert block_calls == [22] * ours.config.text.first_kv_shared_layer


def test_bf16_error_no_worse_than_eager(reference):
    """bf16 with compiled blocks is no further from the float32 computation (same bf16 weights) than eager bf16 is,
    within the 25% margin the module docstring explains."""
    _, directory = reference
    ours = gemma3n.load(directory, dtype=torch.bfloat16)
    exact = gemma3n.load(directory, dtype=torch.bfloat16)
    exact.float()  # float32 arithmetic on the bf16-rounded weights
    ids, mask = _batch()
    real = mask.bool()
    with torch.inference_mode():
        want = exact(ids, attention_mask=mask).logits[real]
        eager = ours(ids, attention_mask=mask).logits[real]
        ours.language_model.enable_compiled_prefill()
        compiled = ours(ids, attention_mask=mask).logits[real]
    eager_err, compiled_err = rel_err(eager, want), rel_err(compiled, want)
    print(f"bf16 relative error to float32: compiled {compiled_err:.3e}, eager {eager_err:.3e}")
    assert compiled_err <= 1.25 * eager_err, f"compiled {compiled_err:.3e} vs eager {eager_err:.3e}"


def test_constants_round_like_torch_and_trace_without_graph_breaks():
    """``in_dtype`` (constants rounded to the weight dtype) is plain Python now: equal to torch's float32-then-dtype
    rounding on ordinary, tiny, huge and tie values, and torch.compile traces it in one graph."""
    import math

    from gemma3n.modules import in_dtype

    gen = torch.Generator().manual_seed(0)
    values = torch.cat(
        [torch.randn(2000, generator=gen, dtype=torch.float64) * 10.0 ** torch.arange(-20, 20).repeat(50)]
    )
    specials = [
        1 / math.sqrt(2),
        2048**-0.5,
        0.0,
        -0.0,
        1e-45,
        65519.9,
        65520.0,
        3.4e38,
        1e39,
        -1e39,
        1 + 2**-8,
        1 + 3 * 2**-9,
    ]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for value in values.tolist() + specials:
            want = torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32).to(dtype)
            got = in_dtype(value, dtype)
            assert got == want.item() and math.copysign(1, got) == math.copysign(1, want.item()), (dtype, value)
    scaled = torch.compile(lambda x: x * in_dtype(0.123456789, x.dtype), fullgraph=True)
    x = torch.randn(8, dtype=torch.bfloat16)
    assert torch.equal(scaled(x), x * 0.12353515625)  # 0.123456789 in bf16


def test_compiled_tanh_gelu_is_the_same_function():
    """``modules.gelu``: eager calls are ``F.gelu`` itself; compiled graphs use ``x * sigmoid(2u)``, the same function
    as ``0.5 * x * (1 + tanh(u))``. Checked against that function in float64 and against ``F.gelu`` in bf16."""
    import math

    from gemma3n.modules import gelu

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=gen) * 4, torch.linspace(-200, 200, 4001), torch.tensor([0.0, -0.0])])
    assert torch.equal(gelu(x), F.gelu(x, approximate="tanh"))
    compiled = torch.compile(gelu, fullgraph=True, dynamic=False)
    got = compiled(x)
    assert not got.isnan().any()
    # float64 reference in the sigmoid form: 0.5 * (1 + tanh(u)) cancels in the negative tail even in float64
    xd = x.double()
    two_u = xd * (2 * math.sqrt(2 / math.pi)) * (1 + 0.044715 * xd * xd)
    want = xd * torch.sigmoid(two_u)
    # float32 bound: 2u carries ~2|2u| eps of rounding, which exp turns into that relative error; exp, the sigmoid's
    # add and divide and the final product add about 1 ulp each. Where exp(-2u) passes float32's maximum (x < -10)
    # the sigmoid is 0, so values of |x| / 3.4e38 (< 1e-36 for |x| <= 200) may come out as 0.
    eps = torch.finfo(torch.float32).eps
    bound = (2 * two_u.abs() + 6) * eps * want.abs() + 1e-36
    assert ((got.double() - want).abs() <= bound).all(), ((got.double() - want).abs() / bound).max()
    # bf16: float32 inside and one rounding at the end, as F.gelu does, so at most one bf16 step from F.gelu where
    # F.gelu's own float32 tanh form is accurate (x > -3; below, it cancels to 0 while the sigmoid form does not)
    xb = x.bfloat16()
    got_b, ref_b = compiled(xb).float(), F.gelu(xb, approximate="tanh").float()
    usable = xb.float() > -3
    step = torch.finfo(torch.bfloat16).eps * ref_b.abs()
    assert ((got_b - ref_b).abs() <= step)[usable].all()
    assert (got_b == ref_b)[usable].float().mean() > 0.99  # rounding boundaries only
