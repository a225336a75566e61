"""gemma3n on a CUDA GPU against transformers on the same GPU, and the CUDA quantized layers.

These need a GPU, so CI (CPU only) skips them; they are run on a lent GPU machine by ``benchmarks/gpu_run.sh``, which
saves their output beside the GPU benchmarks. TF32 is turned off for the fp32 comparisons (cuDNN allows it by default
for convolutions), so that both implementations compute in true fp32 and the CPU bounds and their reasoning apply:
the same operations, differing only in the summation order inside the kernels.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err, save_reference_lm, text_config, use_dequantized_weights
from torch import nn

import gemma3n
import gemma3n.quantize as quant
from gemma3n.quantize import Int4CudaLinear, Int4Linear, Int8Linear, for_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FP32_TOL = 1e-5  # relative, over the real (non-padding) positions
# bf16 outputs: each output is rounded to bf16 once (2^-9 relative) and the kernels' inputs once more; the norm of the
# difference stays well inside 3 roundings, 3 * 2^-8 ~ 1.2e-2
BF16_TOL = 1.2e-2


@pytest.fixture(autouse=True)
def true_fp32():
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.fixture(scope="module")
def tiny_text(tmp_path_factory):
    directory = tmp_path_factory.mktemp("cuda_lm")
    ref = save_reference_lm(directory, text_config(vocab_size_per_layer_input=300))
    return ref.to("cuda"), directory


def _left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 280, (2, 14), generator=gen)
    mask = torch.ones_like(ids)
    ids[1, :5], mask[1, :5] = 0, 0
    return ids.cuda(), mask.cuda()


def test_text_logits_match_reference_on_cuda(tiny_text):
    ref, path = tiny_text
    ours = gemma3n.load(path, device="cuda", dtype=torch.float32)
    ids, mask = _left_padded_batch()
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    err = rel_err(got[real], want[real])
    print(f"cuda fp32 text logits: relative error {err:.2e}")
    assert err <= FP32_TOL, f"relative error {err:.3e}"


def test_greedy_tokens_match_reference_on_cuda(tiny_text):
    ref, path = tiny_text
    ours = gemma3n.load(path, device="cuda", dtype=torch.float32)
    ids, mask = _left_padded_batch()
    settings = dict(max_new_tokens=10, do_sample=False)
    with torch.inference_mode():
        want = ref.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=None, **settings)
        got = ours.generate(ids, attention_mask=mask, pad_token_id=0, eos_token_id=[-1], **settings)
    assert torch.equal(got[:, -10:].cpu(), want[:, -10:].cpu())


def test_multimodal_logits_match_reference_on_cuda():
    from test_multimodal_model import CASES, IMAGE_SIZE, _batch, _features, _prompt, reference

    ref, path = reference()
    ref = ref.to("cuda")
    ours = gemma3n.load(path, device="cuda", dtype=torch.float32)
    prompts, n_images, clip_lengths = CASES["both"]
    ids, mask = (t.cuda() for t in _batch([_prompt(p) for p in prompts]))
    pixels = torch.rand(n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)).cuda()
    features, valid = (t.cuda() for t in _features(clip_lengths))
    inputs = dict(pixel_values=pixels, input_features=features, input_features_mask=valid)
    with torch.inference_mode():
        want = ref(input_ids=ids, attention_mask=mask, **inputs).logits
        got = ours(ids, attention_mask=mask, **inputs).logits
    err = rel_err(got[mask.bool()], want[mask.bool()])
    print(f"cuda fp32 multimodal logits: relative error {err:.2e}")
    assert err <= FP32_TOL, f"relative error {err:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int8_layer_on_cuda_is_the_dequantized_matmul(dtype):
    gen = torch.Generator().manual_seed(0)
    weight, x = torch.randn(320, 256, generator=gen), torch.randn(3, 5, 256, generator=gen)
    layer = for_device(Int8Linear.from_weight(weight, dtype), "cuda")
    assert isinstance(layer, Int8Linear) and layer.qweight.is_cuda
    got = layer(x.to("cuda", dtype))
    want = x.double() @ layer.dequantized(torch.float64).T.cpu()
    err = rel_err(got.cpu(), want)
    assert err <= (BF16_TOL if dtype == torch.bfloat16 else FP32_TOL), f"relative error {err:.3e}"


@pytest.mark.parametrize("in_features", [96, 256, 2048])  # tilings of 2, 8 and 8 k-tiles
def test_int4_cuda_layer_is_the_cpu_layer(in_features):
    """Re-packed for the CUDA kernel, the int4 weight is bit-for-bit the CPU layer's: the two kernels agree within
    bf16 rounding, and both with the float matmul on the dequantized weight."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(200, in_features, generator=gen)  # 200 rows: padded to 256 in the packing
    cpu = Int4Linear.from_weight(weight, group_size=32 if in_features == 96 else 64, dtype=torch.bfloat16)
    cuda = for_device(cpu, "cuda")
    assert isinstance(cuda, Int4CudaLinear) and cuda.packed.is_cuda
    x = torch.randn(4, in_features, generator=gen).to(torch.bfloat16)
    want = x.double() @ cpu.dequantized(torch.float64).T
    got_cuda = cuda(x.cuda()).cpu()
    assert got_cuda.dtype == torch.bfloat16 and got_cuda.shape == (4, 200)
    assert rel_err(got_cuda, want) <= BF16_TOL
    assert rel_err(got_cuda, cpu(x)) <= BF16_TOL


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_load_on_cuda_is_as_close_as_the_cpu_path(tiny_text, mode, monkeypatch):
    """bf16 logits of the model quantized on CUDA, against the same quantized weights in fp32 (the CPU model's
    quantized layers dequantized into a float model): no worse than twice the CPU bf16 path's own error (two bf16
    computations of the same ops; neither is systematically worse)."""
    monkeypatch.setattr(quant, "DEFAULT_INT4_GROUP_SIZE", 32)  # the tiny widths (64, 96, 128) all take group 32
    _, path = tiny_text
    on_cuda = gemma3n.load(path, device="cuda", dtype=torch.bfloat16, quantize=mode)
    on_cpu = gemma3n.load(path, dtype=torch.bfloat16, quantize=mode)
    kind = Int4CudaLinear if mode == "int4" else Int8Linear
    assert isinstance(on_cuda.language_model.lm_head, kind)
    assert not any(type(m) is nn.Linear and m.weight.numel() > 1024 for m in on_cuda.language_model.modules())
    exact = gemma3n.load(path, dtype=torch.float32)
    layers = {n: m for n, m in on_cpu.language_model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}
    assert use_dequantized_weights(exact.language_model, layers) > 20
    ids, mask = _left_padded_batch()
    real = mask.bool().cpu()
    with torch.inference_mode():
        got = on_cuda(ids, attention_mask=mask).logits.float().cpu()[real]
        cpu = on_cpu(ids.cpu(), attention_mask=mask.cpu()).logits.float()[real]
        want = exact(ids.cpu(), attention_mask=mask.cpu()).logits[real]
    err, cpu_err = rel_err(got, want), rel_err(cpu, want)
    print(f"{mode} bf16 logits vs the fp32 dequantized model: cuda {err:.2e}, cpu {cpu_err:.2e}")
    assert err <= 2 * cpu_err, f"cuda {err:.3e} vs cpu {cpu_err:.3e}"
    out = on_cuda.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=[-1])
    assert out.shape == (2, 18) and out.is_cuda


def test_int4_on_cuda_needs_bfloat16(tiny_text):
    with pytest.raises(ValueError, match="bfloat16"):
        gemma3n.load(tiny_text[1], device="cuda", dtype=torch.float32, quantize="int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_gives_the_eager_tokens(tiny_text, dtype, monkeypatch):
    """Decoding replayed from CUDA graphs (the default on CUDA) runs the captured eager kernels: the same tokens as
    eager steps, across an attention bucket boundary (two graphs: positions 250-260 straddle 256)."""
    import gemma3n.generation as generation

    made = []

    class Recording(generation.CudaGraphDecodeStep):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(generation, "CudaGraphDecodeStep", Recording)
    model = gemma3n.load(tiny_text[1], device="cuda", dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 280, (2, 250), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    settings = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=[-1], pad_token_id=0)
    eager = model.generate(ids, cuda_graphs=False, **settings)
    assert not made
    replayed = model.generate(ids, **settings)
    assert len(made) == 1 and sorted(made[0].graphs) == [256, 262]  # the cache holds 262 positions
    assert torch.equal(replayed, eager)


def test_cuda_graph_decoding_with_int4_weights(tiny_text, monkeypatch):
    monkeypatch.setattr(quant, "DEFAULT_INT4_GROUP_SIZE", 32)
    model = gemma3n.load(tiny_text[1], device="cuda", dtype=torch.bfloat16, quantize="int4")
    ids, mask = _left_padded_batch()
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=[-1], pad_token_id=0)
    assert torch.equal(model.generate(ids, **settings), model.generate(ids, cuda_graphs=False, **settings))


def test_cuda_graphs_are_off_with_a_host_side_table(tiny_text):
    from gemma3n.cuda_graphs import cuda_graphs_supported

    model = gemma3n.load(tiny_text[1], device="cuda", dtype=torch.float32, ple_device="cpu")
    assert not cuda_graphs_supported(model)
    ids, mask = _left_padded_batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, eos_token_id=[-1])
    assert out.shape == (2, 17)
    with pytest.raises(ValueError, match="cuda_graphs=True"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, cuda_graphs=True)
