"""A linear layer whose few-row products on a CPU stream the weight at memory bandwidth (decode steps)."""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..mapped_pages import release_mapped_pages
from ..quantized_kernels import int8_product
from ..row_kernels import row_kernel_product, uses_row_kernel

FEW_ROWS = 4  # products with up to this many rows (decode of small batches) take the few-row paths below
# Under torch.compile, few-row products with weights up to this size (1 MB in bf16) are traced as a multiply-and-sum
# that inductor fuses with the ops around it: a BLAS call costs about 35 us however small the weight (oneDNN's own
# time is about 11 us), and a Gemma 3n decode step makes 180 such calls (LAuReL, per-layer gate and projection,
# AltUp router): 12-19 ms of an E2B step.
SMALL_WEIGHT_ELEMENTS = 1 << 19
# Which kernel runs few-row bf16 products with a larger weight: "weight-major" or "linear"; unset: measured once.
FEW_ROW_KERNEL_ENV = "GEMMA3N_BF16_FEW_ROW_KERNEL"
_few_row_kernel: str | None = None  # the choice for this process, once made
FUSED_ROW_ENV = "GEMMA3N_FUSED_ROW_PRODUCT"


def few_row_bf16_kernel() -> str:
    """The faster kernel on this CPU for few-row bf16 products with a large weight: "weight-major"
    (:func:`weight_major_product`) or "linear" (``F.linear``).

    oneDNN picks its kernels per CPU, and neither wins everywhere: on a Xeon with AMX the weight-major GEMM streamed
    bf16 weights at 24.5 GB/s against 16.8 for ``F.linear``; on an AMD EPYC (Zen 4, no AMX) it was 9.9 against 20.1.
    So the first call times both on one 64 MB weight (tens of ms) and keeps the faster, unless ``GEMMA3N_BF16_FEW_
    ROW_KERNEL`` names one. ``F.linear`` is kept unless weight-major is clearly faster (10%): it is the reference's
    own kernel."""
    global _few_row_kernel
    if _few_row_kernel is None:
        _few_row_kernel = _choose_few_row_kernel()
    return _few_row_kernel


@torch.compiler.disable
def _choose_few_row_kernel() -> str:
    choice = os.environ.get(FEW_ROW_KERNEL_ENV)
    if choice:
        if choice not in ("weight-major", "linear"):
            raise ValueError(f"{FEW_ROW_KERNEL_ENV}={choice!r}: use 'weight-major' or 'linear'")
        return choice
    row, weight = _probe_operands()
    best = _best_seconds(
        {"weight-major": lambda: weight_major_product(row, weight), "linear": lambda: F.linear(row, weight)}
    )
    return "weight-major" if best["weight-major"] < 0.9 * best["linear"] else "linear"


def _probe_operands() -> tuple[torch.Tensor, torch.Tensor]:
    """One bf16 row [1, 4096] and a 64 MB bf16 weight [8192, 4096] (read from memory, not from a cache)."""
    return torch.full((1, 4096), 0.01, dtype=torch.bfloat16), torch.full((8192, 4096), 0.01, dtype=torch.bfloat16)


def _best_seconds(kernels: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Per kernel, its best time of three runs, after one untimed run (set-up, compilation); the kernels take turns,
    so the machine's noise hits them alike."""
    best = dict.fromkeys(kernels, float("inf"))
    with torch.inference_mode():
        for kernel in kernels.values():
            kernel()
        for _ in range(3):
            for name, kernel in kernels.items():
                start = time.perf_counter()
                kernel()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def use_weight_major(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes through :func:`weight_major_product`: few bf16 rows on a CPU, a weight larger
    than ``SMALL_WEIGHT_ELEMENTS``, and weight-major the faster kernel here (:func:`few_row_bf16_kernel`)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and x.numel() <= FEW_ROWS * x.shape[-1]
        and weight.numel() > SMALL_WEIGHT_ELEMENTS
        and few_row_bf16_kernel() == "weight-major"
    )


def weight_major_columns(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``weight @ rows.T`` [out, m] for the rows of x [..., in] (m = rows, or 2 for one row, the second a zero pad).

    On a CPU, torch runs a product of few rows against a large weight as a matrix-vector kernel that reaches a
    fraction of the memory bandwidth; the same product with the weight as the left operand runs as a GEMM with a
    narrow right side that streams the weight. One row is padded to two, which takes that GEMM path.
    """
    rows = x.reshape(-1, x.shape[-1])  # [n, in]
    if rows.shape[0] == 1:
        rows = torch.cat([rows, torch.zeros_like(rows)])
    return weight @ rows.T


def weight_major_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` computed as :func:`weight_major_columns`. x [..., in], weight [out, in] -> [..., out]."""
    n = x.numel() // x.shape[-1]
    out = weight_major_columns(x, weight)[:, :n].T.contiguous()  # [out, n or 2] -> [n, out]
    return out.reshape(*x.shape[:-1], weight.shape[0])


def traced_small_product(rows: int, weight: torch.Tensor) -> bool:
    """Whether a product of ``rows`` rows with ``weight`` goes through :func:`fused_small_product` while torch.compile
    traces (eager keeps its BLAS call): few rows and a weight of at most ``SMALL_WEIGHT_ELEMENTS``; or one row and
    a bf16 or int8 weight of any size, where inductor's reduction streams it faster than the kernel
    (:func:`measure_fused_row_product`; int8 only up to ``FUSED_INT8_MAX_INPUTS`` inputs)."""
    if rows > FEW_ROWS or not torch.compiler.is_compiling():
        return False
    if weight.numel() <= SMALL_WEIGHT_ELEMENTS:
        return True
    if rows != 1 or _fused_row_product is None:
        return False
    if weight.dtype == torch.int8 and weight.shape[1] > FUSED_INT8_MAX_INPUTS:
        return False
    return _fused_row_product.get(weight.dtype, False)


# Fused one-row int8 products with longer rows were slower than the int8 kernel: 9.7 against 29 GB/s on [2048, 8192]
# on the AMD EPYC (22.6 against 20.0 on [8192, 2048], 23.8 against 19.2 on the LM head).
FUSED_INT8_MAX_INPUTS = 2048
CASCADE_FREE_SUM = 4096  # the longest float sum inductor's CPU code keeps a plain running sum for
FUSED_ROW_TOLERANCE = 1.1  # the fused one-row product is kept unless its probe is more than 10% slower than the kernel
_fused_row_product: dict[torch.dtype, bool] | None = None  # per weight dtype: one-row large products traced fused


@torch.compiler.disable
def measure_fused_row_product() -> dict[torch.dtype, bool]:
    """Whether, in compiled decode steps of one row, products of large bf16 and int8 weights are traced as
    :func:`fused_small_product` too (per dtype); decided once per process (``GEMMA3N_FUSED_ROW_PRODUCT=1`` or ``0``
    decides both).

    inductor compiles that multiply-and-sum into one vectorised reduction over each weight row. On an AMD EPYC (Zen 4)
    it streamed bf16 weights at 33-35 GB/s (the copy bandwidth) where oneDNN's best kernel reached 20-21, and the
    compiled E2B step took 226 ms against 273-330 with BLAS; int8 E2B steps took 103-108 ms against 132-134 with
    torch's int8 kernel. For 4 rows it fell to 6-11 GB/s, so it is used for one row only. Elsewhere the kernels may
    win, so this compiles the reduction for one 64 MB bf16 weight and one 64 MB int8 weight (seconds, then from
    inductor's disk cache) and times each against this CPU's kernel. The fused form is kept unless it is more than
    10% slower alone (:data:`FUSED_ROW_TOLERANCE`): in a step it also saves the kernel call and fuses with the ops
    around it. Alone, the int8 product was only 1.08-1.16x faster fused (20.7 against 22.4 GB/s on [8192, 2048]),
    which a rule asking for 10% faster missed in some processes, while the whole int8 step was 1.25x faster."""
    global _fused_row_product
    if _fused_row_product is None:
        setting = os.environ.get(FUSED_ROW_ENV)
        if setting:
            if setting not in ("0", "1"):
                raise ValueError(f"{FUSED_ROW_ENV}={setting!r}: use 1 (fused) or 0 (BLAS)")
            _fused_row_product = dict.fromkeys((torch.bfloat16, torch.int8), setting == "1")
        else:
            _fused_row_product = {torch.bfloat16: _fused_row_is_faster(), torch.int8: _fused_int8_row_is_faster()}
    return _fused_row_product


def _fused_row_is_faster() -> bool:
    row, weight = _probe_operands()
    fused = torch.compile(fused_small_product, dynamic=False)
    best = _best_seconds({"fused": lambda: fused(row, weight), "blas": lambda: linear_product(row, weight)})
    return best["fused"] <= FUSED_ROW_TOLERANCE * best["blas"]


def fused_int8_product(rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The int8 layer's product ``rows @ (qweight * scales)^T`` as :func:`fused_small_product`: float32 rows keep
    the sum unrounded until it is scaled, as the int8 kernel does; one rounding to the rows' dtype."""
    return (fused_small_product(rows.float(), qweight) * scales.float()).to(rows.dtype)


def _fused_int8_row_is_faster() -> bool:
    row = torch.full((1, FUSED_INT8_MAX_INPUTS), 0.01, dtype=torch.bfloat16)
    qweight = torch.ones(32768, FUSED_INT8_MAX_INPUTS, dtype=torch.int8)  # 64 MB: read from memory
    scales = torch.full((32768,), 0.01, dtype=torch.bfloat16)
    fused = torch.compile(fused_int8_product, dynamic=False)
    best = _best_seconds(
        {"fused": lambda: fused(row, qweight, scales), "kernel": lambda: int8_product(row, qweight, scales)}
    )
    return best["fused"] <= FUSED_ROW_TOLERANCE * best["kernel"]


def fused_small_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` [..., out] as a float32 multiply-and-sum, rounded once to x's dtype (as a BLAS product
    rounds); meant for tracing: inductor fuses it into one reduction loop, never materialising [..., out, in].

    For a large weight, x is first copied by an opaque op (:func:`materialized`): otherwise inductor may inline the
    ops that produce x (an RMSNorm, with its mean) into the loop over the weight's rows and redo them for every row.
    In the E2B step that made such a product read its weight at about 5 GB/s instead of 30."""
    if weight.numel() > SMALL_WEIGHT_ELEMENTS and torch.compiler.is_compiling():
        x = materialized(x)
    inputs = x.shape[-1]
    chunks = -(-inputs // CASCADE_FREE_SUM)
    if chunks > 1 and inputs % chunks == 0:
        # Sums of chunks, then of their partial sums: x [..., chunks, in / chunks] against weight [out, chunks, in /
        # chunks] -> [..., out, chunks] -> [..., out]. inductor sums a float reduction longer than 4096 through a
        # cascade helper (for accuracy) that ran E2B's down_proj [2048, 8192] at 21.5 GB/s; in two levels, 24 GB/s.
        parts = x.float().unflatten(-1, (chunks, -1)).unsqueeze(-3) * weight.float().unflatten(-1, (chunks, -1))
        return parts.sum(-1).sum(-1).to(x.dtype)
    return (x.float().unsqueeze(-2) * weight.float()).sum(-1).to(x.dtype)


@torch.library.custom_op("gemma3n::materialized", mutates_args=())
def materialized(x: torch.Tensor) -> torch.Tensor:
    """A copy of x that torch.compile cannot see through: the compiled graph computes x into a buffer of its own."""
    return x.clone()


@materialized.register_fake
def _(x):
    return torch.empty_like(x)


# ---- bf16 weights packed once for oneDNN -------------------------------------------------------------------------
# F.linear hands oneDNN the weight in its plain [out, in] layout, which oneDNN re-blocks on every call. A copy packed
# once into oneDNN's own blocked layout skips that: on the AMD EPYC, E2B's matrices streamed at 25-31 GB/s at 1-4 rows
# against 20-21 for F.linear, and prefill products were 3-8% faster, with the same bits (the same oneDNN kernel).
# Copies are keyed by the dense weight's address and dropped when that weight is freed.
_packed_copies: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def packed_copy(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN-packed copy of ``weight`` made by :func:`pack_weight`, or None."""
    entry = _packed_copies.get(weight.data_ptr())
    if entry is None:
        return None
    dense, packed = entry[0](), entry[1]
    if dense is None or dense.shape != weight.shape or dense.dtype != weight.dtype:
        return None
    return packed


def pack_weight(weight: torch.Tensor, release: bool = True, mappings: list[tuple[int, int]] | None = None) -> bool:
    """Make a oneDNN-packed copy of a bf16 CPU weight [out, in] for :func:`packed_product` (about 20 ms per 32 MB);
    True when it has one. With ``release``, the dense weight's memory-mapped pages are dropped from resident memory
    afterwards (the packed copy is what products read; the file keeps the data; ``mappings``: this process's file
    mappings, default: read now)."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return False
    if packed_copy(weight) is not None:
        return True
    address = weight.data_ptr()
    with torch.inference_mode():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), FEW_ROWS)

    def forget(ref: weakref.ref) -> None:
        if _packed_copies.get(address, (None,))[0] is ref:
            del _packed_copies[address]

    # a weak reference to the caller's tensor (the module's parameter): the copy goes when the parameter goes
    _packed_copies[address] = (weakref.ref(weight, forget), packed)
    if release:
        release_mapped_pages(weight.detach(), mappings)
    return True


def unpack_weight(weight: torch.Tensor) -> None:
    """Drop ``weight``'s packed copy, if any."""
    if packed_copy(weight) is not None:
        del _packed_copies[weight.data_ptr()]


def _packed_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    packed = packed_copy(weight)
    if packed is None:  # the weight was replaced or unpacked since: the plain product, same result
        return F.linear(x, weight)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")  # needs contiguous x


@torch.library.custom_op("gemma3n::packed_product", mutates_args=())
def _traced_packed_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`packed_product` as one opaque call in a compiled graph (the packed copy is looked up at run time)."""
    return _packed_product(x, weight)


@_traced_packed_product.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def packed_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` [..., out] through ``weight``'s oneDNN-packed copy (:func:`pack_weight`), any number of rows;
    ``F.linear`` when it has none."""
    if torch.compiler.is_compiling():
        return _traced_packed_product(x, weight)
    return _packed_product(x, weight)


def linear_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, packed: bool = False
) -> torch.Tensor:
    """``F.linear``; with ``packed`` (the weight has a copy from :func:`pack_weight`) through
    :func:`packed_product`; for few rows on a CPU, through the row kernel (a large bf16 weight, where the CPU has
    AVX512-BF16: :mod:`gemma3n.row_kernels`), :func:`fused_small_product` (a small weight, traced by
    torch.compile) or :func:`weight_major_product` (bf16, where that kernel is the faster: :func:`use_weight_major`)."""
    if packed and bias is None and x.device.type == "cpu":
        # a compiled one-row step keeps a small weight's fused multiply-and-sum (it fuses with the ops around it)
        if not (x.numel() == x.shape[-1] and weight.numel() <= SMALL_WEIGHT_ELEMENTS and torch.compiler.is_compiling()):
            return packed_product(x, weight)
    if x.device.type == "cpu" and bias is None and x.numel() <= FEW_ROWS * x.shape[-1]:
        if weight.numel() > SMALL_WEIGHT_ELEMENTS and uses_row_kernel(x, weight):
            return row_kernel_product(x, weight)  # the dense weight streamed at read bandwidth (bf16, AVX512-BF16)
        if traced_small_product(x.numel() // x.shape[-1], weight):
            return fused_small_product(x, weight)
        if use_weight_major(x, weight):
            return weight_major_product(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) through :func:`linear_product` (few rows on a CPU; ``packed``: the
    weight has a oneDNN-packed copy, see :mod:`gemma3n.text_model.packed_weights`)."""

    packed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_product(x, self.weight, self.bias, self.packed)
