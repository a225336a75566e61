"""CPU kernels for decode products: a few rows against a large bf16, int8 or int4 weight, at the memory's read speed.

A decode step multiplies 1-4 rows by every weight matrix, so its time is the time to read the weights. On an AMD EPYC
(Zen 4, 2 cores) every library kernel we measured stalled at about 29-37 GB/s (oneDNN's ``F.linear`` 21, oneDNN with
a packed weight 29-37, inductor's fused reduction 32-35, inductor's C++ GEMM template 34) while a plain read of the
same bytes ran at 35-66 GB/s, depending on the machine's state. ``csrc/few_row_products.cpp`` streams each weight row
once, in order, with AVX512-BF16 dot products: 58-64 GB/s for one row when a read ran at 60-66, and the read rate
when that was 35 (``benchmarks/kernel_ceilings.py``). No library offers this product at that speed (oneDNN, torch's
kernels and inductor's templates were measured), so it is our own C++.

int8 weights (one scale per output row, :class:`gemma3n.quantize.Int8Linear`) go through AVX512-VNNI: each x row is
rounded to 16-bit fixed point with its own scale (an error of at most 2^-16 of the row's largest value, far below the
weights' int8 rounding), and the weight, widened to int16, meets it in VPDPWSSD: exact integer sums, one rounding at
the end. torch's int8 kernel read E2B-sized weights at 21 GB/s for one row and 15 for four; this one at the read
bandwidth for one row. CPU int8 layers keep their large weights in tiles of 32 output rows
(:func:`gemma3n.quantize.Int8Linear.use_tiles`), which a second form of the kernel reads with the output rows in the
lanes: the same sums and outputs, 1.2-1.7x faster for 4 to 31 rows. Every kernel also prefetches its weight stream in
software, which 4-row products needed to keep pace with the memory.

int4 weights (:class:`gemma3n.quantize.Int4Linear`, torch's CPU packing read as it is) go through a byte permutation
(AVX512-VBMI) into lanes of output rows and VPDPBUSD against x rounded to 8 bits per group of the weight's inputs (an
error of at most 2^-8 of the group's largest |x|, small beside the int4 weight's own): exact integer sums per group,
then the group's scales and zero in float32. With 16-bit x (VPDPWSSD, until this change) a 4-row product was bound by
its dot-product instructions, not the memory; 8-bit x halves them. On E2B shapes the 16-bit kernel ran 1.3-1.8x
torch's int4 kernel from 8 to 31 rows (``benchmarks/quantized_row_products.py``).

It is compiled once per machine with torch's extension builder (a C++ compiler and ninja; a few seconds, cached in
torch's extension directory) on the first product that can use it, and used only where the CPU has AVX512-BF16 and
AVX512-VNNI (int4: AVX512-VBMI too).
``GEMMA3N_ROW_KERNEL=0`` turns it off; without the instructions or a compiler, products keep the other paths.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path

import torch

ROW_KERNEL_ENV = "GEMMA3N_ROW_KERNEL"
MAX_ROWS = 4  # the bf16 kernel's row counts: 1 to 4
# The int8 and int4 kernels take any number of rows (in groups of 4 over each cached span of the weight); the layers
# give them fewer than gemma3n.quantize.DEQUANTIZE_FROM_ROWS (32). benchmarks/quantized_row_products.py on E2B's MLP
# shapes (AMD EPYC, 2 threads, weights read from memory): from 8 to 31 rows 1.9-2.8x torch's int4 kernel (8-bit
# inputs) and 1.1-1.8x its int8 kernel; at 1 and 4 rows as fast or faster.
MAX_QUANTIZED_ROWS = 31
SOURCE = Path(__file__).parent / "csrc" / "few_row_products.cpp"
_EXTENSION = "gemma3n_cpu_row_kernel"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fopenmp"]
_loaded: bool | None = None  # None: not tried yet in this process
_why_not = ""  # when not loaded: why
_int4_loaded = False  # loaded, on a CPU with AVX512-VBMI too (the int4 kernel's byte permutation)


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's flags in ``/proc/cpuinfo`` (empty where that is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(next((line for line in text.splitlines() if line.startswith("flags")), "").split())


def cpu_has_row_kernel_instructions() -> bool:
    """Whether this CPU has AVX512-BF16 and AVX512-VNNI (with AVX512-BW and VL, which every such CPU has; flags in
    ``/proc/cpuinfo``; False where that is absent)."""
    return {"avx512_bf16", "avx512_vnni", "avx512bw", "avx512vl"} <= _cpu_flags()


def cpu_has_int4_row_kernel_instructions() -> bool:
    """Whether the int4 kernel may run: the row kernel's instructions and AVX512-VBMI (its byte permutation)."""
    return cpu_has_row_kernel_instructions() and "avx512vbmi" in _cpu_flags()


def _setting() -> str | None:
    setting = os.environ.get(ROW_KERNEL_ENV)
    if setting not in (None, "", "0", "1"):
        raise ValueError(f"{ROW_KERNEL_ENV}={setting!r}: use 1 (use the row kernel where the CPU allows) or 0 (never)")
    return setting or None


@torch.compiler.disable
def prepare_row_kernel() -> bool:
    """Build (once per machine) and load the kernel if this process may use it; True when it is ready. Called before
    a decode step is compiled, and by the first eager product that could use it."""
    global _loaded, _why_not, _int4_loaded
    if _loaded is not None:
        return _loaded
    if _setting() == "0":
        _loaded, _why_not = False, f"{ROW_KERNEL_ENV}=0"
    elif sys.platform != "linux" or not cpu_has_row_kernel_instructions():
        _loaded, _why_not = False, "the CPU lacks AVX512-BF16 or AVX512-VNNI"
    else:
        try:
            logger = logging.getLogger("torch.utils.cpp_extension")
            level = logger.level
            logger.setLevel(logging.ERROR)  # its import warns that a CPU-only machine has no CUDA runtime
            try:
                from torch.utils.cpp_extension import _get_build_directory, load
            finally:
                logger.setLevel(level)
            if not (Path(_get_build_directory(_EXTENSION, False)) / f"{_EXTENSION}.so").exists():
                print("gemma3n: building the CPU row kernel (once per machine, seconds)...", file=sys.stderr)
            load(_EXTENSION, [str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
            products = ("bf16_few_row_product", "int8_few_row_product", "int8_tiles_product")
            for op in (f"gemma3n_cpu::{name}" for name in products):
                torch.library.register_fake(op)(lambda x, w, *scales: x.new_empty(x.shape[0], w.shape[0]))
            torch.library.register_fake("gemma3n_cpu::int4_few_row_product")(
                lambda x, packed, scales_and_zeros, group, n_out: x.new_empty(x.shape[0], n_out)
            )
            _loaded = True
            _int4_loaded = cpu_has_int4_row_kernel_instructions()
        except Exception as error:  # no compiler or ninja: the other kernels serve, and we say so once
            lines = str(error).splitlines()  # the compiler's first error, else the message's first line
            reason = next((line.strip() for line in lines if "error:" in line), lines[0] if lines else "")
            _loaded, _why_not = False, f"building it failed ({type(error).__name__}: {reason})"
            print(f"gemma3n: the CPU row kernel is off: {_why_not}", file=sys.stderr)
    return _loaded


def row_kernel_ready() -> bool:
    """Whether products may use the kernel now: it is loaded, or (outside tracing) it can be loaded now."""
    if _loaded is None and not torch.compiler.is_compiling():
        return prepare_row_kernel()
    return bool(_loaded)


def row_kernel_status() -> str:
    """ "on", or "off: <why>" (after :func:`prepare_row_kernel`)."""
    return "on" if prepare_row_kernel() else f"off: {_why_not}"


def uses_row_kernel(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight.T`` goes through :func:`row_kernel_product`: 1-4 bf16 rows against a dense bf16 CPU
    weight [out, in], with the kernel ready. (Callers decide which weights are large enough to pay for a call.)"""
    return (
        x.device.type == "cpu"
        and weight.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
        and weight.is_contiguous()
        and x.numel() <= MAX_ROWS * x.shape[-1]
        and x.numel() > 0
        and row_kernel_ready()
    )


def row_kernel_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` [..., out] for x [..., in] of 1-4 rows (bf16, one rounding per output), through the kernel."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()  # [m, in]
    out = torch.ops.gemma3n_cpu.bf16_few_row_product(rows, weight)  # [m, out]
    return out.view(*x.shape[:-1], weight.shape[0])


def _quantized_rows_qualify(rows: torch.Tensor, weight: torch.Tensor, max_rows: int) -> bool:
    """What the int8 and int4 kernels share: 1 to ``max_rows`` bf16 rows [m, in] and a contiguous CPU weight, with
    the kernel ready."""
    return (
        rows.device.type == "cpu"
        and weight.device.type == "cpu"
        and rows.dtype == torch.bfloat16
        and weight.is_contiguous()
        and rows.dim() == 2
        and 0 < rows.shape[0] <= max_rows
        and row_kernel_ready()
    )


def uses_int8_row_kernel(rows: torch.Tensor, qweight: torch.Tensor, max_rows: int = MAX_QUANTIZED_ROWS) -> bool:
    """Whether ``rows`` [m, in] (bf16, m <= ``max_rows``) times an int8 CPU weight [out, in] goes through
    :func:`int8_row_kernel_product`, with the kernel ready. float32 rows keep torch's kernel: their 24-bit values
    would lose precision in the 16-bit rounding, where bf16 rows (8 bits) do not."""
    return qweight.dtype == torch.int8 and _quantized_rows_qualify(rows, qweight, max_rows)


def int8_row_kernel_product(rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``rows @ (qweight * scales)^T`` [m, out] in the rows' dtype, through the VNNI kernel: rows [m, in] (any m; bf16
    or float32), qweight [out, in] int8, scales [out]. The rows are rounded to 16 bits each (see the module's note)."""
    return torch.ops.gemma3n_cpu.int8_few_row_product(rows.contiguous(), qweight, scales)


def int8_tiles_row_kernel_product(rows: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """:func:`int8_row_kernel_product` for an int8 weight in tiles of 32 output rows (``tiles`` [out, in] int8 as
    :func:`gemma3n.quantized_kernels.int8_tiles` lays it out; out a multiple of 32, in even): the same outputs, bit
    for bit; 4 rows read the weight 1.2-1.3x faster."""
    return torch.ops.gemma3n_cpu.int8_tiles_product(rows.contiguous(), tiles, scales)


def uses_int4_row_kernel(
    rows: torch.Tensor,
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group: int,
    max_rows: int = MAX_QUANTIZED_ROWS,
) -> bool:
    """Whether ``rows`` [m, in] (bf16, m <= ``max_rows``) times an int4 weight in torch's CPU packing goes through
    :func:`int4_row_kernel_product`: bf16 scales and zeros, groups of a multiple of 4 up to 256, the kernel ready and
    the CPU with AVX512-VBMI. float32 rows keep torch's kernel (as for int8)."""
    return (
        scales_and_zeros.dtype == torch.bfloat16
        and scales_and_zeros.is_contiguous()
        and group % 4 == 0
        and 4 <= group <= 256
        and _quantized_rows_qualify(rows, packed, max_rows)
        and _int4_loaded
    )


def int4_row_kernel_product(
    rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group: int, out_features: int
) -> torch.Tensor:
    """``rows @ W^T`` [m, out_features] bf16 for the int4 weight ``W = (q - 8) * scale + zero`` in torch's CPU packing
    (``packed`` [ceil64(out), in / 2] uint8, ``scales_and_zeros`` [in / group, ceil64(out), 2] bf16), through the
    kernel: rows [m, in] bf16 (any m), rounded to 8 bits per group of inputs; exact integer group sums."""
    return torch.ops.gemma3n_cpu.int4_few_row_product(rows.contiguous(), packed, scales_and_zeros, group, out_features)
