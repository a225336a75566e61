"""What each decode matmul kernel can stream on this CPU: the ceiling a decode step cannot beat.

Used by ``bench_cpu_decode.py`` (its ``kernels`` child, once per round, so the figures share the round's machine state).
The weights are the matrices of ``LAYERS`` E2B decoder layers (q, k, v, o, gate, up, down; about 120 MB per layer in
bf16, 0.7 GB in all: more than the last-level cache) plus, separately, the 262,144 x 2048 LM head. Each kernel runs one
product per weight for 1 and 4 rows; GB/s counts the bytes of the weight (and its scales) per second, so
``bytes read per token / GB/s`` is the time a decode step would take with no other work.

Kernels: bf16 as the weight-major product of ``gemma3n.text_model.linear`` and as ``F.linear`` (transformers) runs
it, of which gemma3n takes the faster on this CPU (``few_row_bf16_kernel``, recorded as ``bf16_few_row_kernel``),
bf16 with oneDNN's packed copy, and bf16 through gemma3n's row kernel (``gemma3n.row_kernels``, where the
CPU has AVX512-BF16: what gemma3n's unpacked decode steps use for 1-4 rows); int8
per-channel weight-only and int4 group-wise as gemma3n's quantized layers run them (its VNNI row kernels where the CPU
has them, else ``torch._weight_int8pack_mm`` and ``torch._weight_int4pack_mm_for_cpu``; the JSON's ``row_kernel``
says which); and, measured but not used, fbgemm's dynamic int8 GEMM
(``torch.ops.quantized.linear_dynamic``), which also quantizes the activations (see the note in the results).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, KV, VOCAB = 2048, 8192, 512, 262_144
LAYER_SHAPES = [(HIDDEN, HIDDEN), (KV, HIDDEN), (KV, HIDDEN), (HIDDEN, HIDDEN)]  # q, k, v, o
LAYER_SHAPES += [(INTERMEDIATE, HIDDEN), (INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]  # gate, up, down
LAYERS = 6


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Median bytes/s of ``amax`` over a ``gib`` GiB float32 tensor: a read-only stream with one compare per value
    (vectorised, both threads), the bound for reading weights."""
    data = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    data.amax()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        data.amax()
        times.append(time.perf_counter() - t0)
    return data.numel() * 4 / statistics.median(times) / 1e9


def fbgemm_pack(qweight: torch.Tensor, scales: torch.Tensor) -> torch.ScriptObject:
    """fbgemm's prepacked form of a per-output-channel int8 weight [out, in] with its scales [out]."""
    with warnings.catch_warnings():  # torch flags its quantized-tensor constructors as deprecated
        warnings.simplefilter("ignore")
        zeros = torch.zeros(len(scales), dtype=torch.long)
        per_channel = torch._make_per_channel_quantized_tensor(qweight, scales.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(per_channel, None)


def _fbgemm_int8(weight: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    scale = (weight.float().abs().amax(1) / 127).clamp_min(1e-12)
    q = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    packed = fbgemm_pack(q, scale)
    return lambda x: torch.ops.quantized.linear_dynamic(x.float(), packed, True)


def _kernels(weight: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]]:
    """name -> (product of rows [n, in] with this weight, bytes the product reads)."""
    from gemma3n.quantize import Int4Linear, Int8Linear
    from gemma3n.row_kernels import row_kernel_product, uses_row_kernel
    from gemma3n.text_model.linear import pack_weight, packed_product, weight_major_product

    int8 = Int8Linear.from_weight(weight)
    pack_weight(weight)  # the copy lives as long as ``weight`` (the lambda below keeps it)
    int4 = Int4Linear.from_weight(weight, group_size=64)
    out: dict = {
        "bf16 weight-major": (lambda x: weight_major_product(x, weight), weight.numel() * 2),
        "bf16 F.linear (transformers)": (lambda x: F.linear(x, weight), weight.numel() * 2),
        "bf16 oneDNN-packed (gemma3n)": (lambda x: packed_product(x, weight), weight.numel() * 2),
        "int8 weight-only (gemma3n)": (int8, int8.qweight.numel() + int8.scales.numel() * 2),
        "int4 g64 (gemma3n)": (int4, int4.packed.numel() + int4.scales_and_zeros.numel() * 2),
    }
    x = torch.zeros(1, weight.shape[1], dtype=torch.bfloat16)
    if uses_row_kernel(x, weight):  # the CPU has AVX512-BF16 and the kernel built
        out["bf16 row kernel (gemma3n)"] = (lambda x: row_kernel_product(x, weight), weight.numel() * 2)
    if "fbgemm" in torch.backends.quantized.supported_engines:
        out["int8 fbgemm dynamic (not used)"] = (_fbgemm_int8(weight), weight.numel() + weight.shape[0] * 8)
    return out


def _time_products(products: list[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]], repeats: int) -> float:
    """Median seconds of one pass of every (product, its input rows)."""
    for product, x in products:  # warm-up: first-call allocations
        product(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for product, x in products:
            product(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def kernel_ceilings(threads: int, repeats: int = 5) -> dict:
    """Per kernel and row count: GB/s over the layer matrices and over the LM head, and the read bandwidth."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    groups = {
        "layers": [(o, i) for _ in range(LAYERS) for o, i in LAYER_SHAPES],
        "lm_head": [(VOCAB, HIDDEN)],
    }
    from gemma3n.text_model.linear import few_row_bf16_kernel

    result: dict = {"read_gbs": read_bandwidth_gbs(), "bf16_few_row_kernel": few_row_bf16_kernel(), "kernels": {}}
    for group, shapes in groups.items():
        per_kernel: dict[str, list] = {}
        for out_f, in_f in shapes:
            weight = (torch.randn(out_f, in_f, generator=gen) * in_f**-0.5).to(torch.bfloat16)
            for name, (product, nbytes) in _kernels(weight).items():
                per_kernel.setdefault(name, []).append((product, nbytes, in_f))
            del weight
        for name, items in per_kernel.items():
            total = sum(nbytes for _, nbytes, _ in items)
            result["kernels"].setdefault(name, {})[f"{group}_bytes"] = total
            for rows in (1, 4):
                inputs = {i: torch.randn(rows, i, generator=gen).to(torch.bfloat16) for i in (HIDDEN, INTERMEDIATE)}
                seconds = _time_products([(product, inputs[in_f]) for product, _, in_f in items], repeats)
                result["kernels"].setdefault(name, {})[f"{group}_b{rows}_gbs"] = total / seconds / 1e9
        del per_kernel
    return result
