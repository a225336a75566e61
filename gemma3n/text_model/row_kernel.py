"""A CPU kernel for decode products: a few bf16 rows against a large dense bf16 weight, at the memory's read bandwidth.

A decode step multiplies 1-4 rows by every weight matrix, so its time is the time to read the weights. On an AMD EPYC
(Zen 4, 2 cores) every library kernel we measured stalled at about 29-37 GB/s (oneDNN's ``F.linear`` 21, oneDNN with
a packed weight 29-37, inductor's fused reduction 32-35, inductor's C++ GEMM template 34) while a plain read of the
same bytes ran at 35-66 GB/s, depending on the machine's state. ``csrc/few_row_products.cpp`` streams each weight row
once, in order, with AVX512-BF16 dot products: 58-64 GB/s for one row when a read ran at 60-66, and the read rate
when that was 35 (``benchmarks/kernel_ceilings.py``). No library offers this product at that speed (oneDNN, torch's
kernels and inductor's templates were measured), so it is our own, about 90 lines of C++.

It is compiled once per machine with torch's extension builder (a C++ compiler and ninja; a few seconds, cached in
torch's extension directory) on the first product that can use it, and used only where the CPU has AVX512-BF16.
``GEMMA3N_ROW_KERNEL=0`` turns it off; without the instructions or a compiler, products keep the other paths.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import torch

ROW_KERNEL_ENV = "GEMMA3N_ROW_KERNEL"
MAX_ROWS = 4  # the kernel's row counts: 1 to 4
SOURCE = Path(__file__).parent / "csrc" / "few_row_products.cpp"
_EXTENSION = "gemma3n_cpu_row_kernel"
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp"]
_loaded: bool | None = None  # None: not tried yet in this process
_why_not = ""  # when not loaded: why


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU has AVX512-BF16 (the ``avx512_bf16`` flag in ``/proc/cpuinfo``; False where that is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return "avx512_bf16" in flags.split()


def _setting() -> str | None:
    setting = os.environ.get(ROW_KERNEL_ENV)
    if setting not in (None, "", "0", "1"):
        raise ValueError(f"{ROW_KERNEL_ENV}={setting!r}: use 1 (use the row kernel where the CPU allows) or 0 (never)")
    return setting or None


@torch.compiler.disable
def prepare_row_kernel() -> bool:
    """Build (once per machine) and load the kernel if this process may use it; True when it is ready. Called before
    a decode step is compiled, and by the first eager product that could use it."""
    global _loaded, _why_not
    if _loaded is not None:
        return _loaded
    if _setting() == "0":
        _loaded, _why_not = False, f"{ROW_KERNEL_ENV}=0"
    elif sys.platform != "linux" or not cpu_has_bf16_dot():
        _loaded, _why_not = False, "the CPU has no AVX512-BF16"
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
            torch.library.register_fake("gemma3n_cpu::bf16_few_row_product")(
                lambda x, w: x.new_empty(x.shape[0], w.shape[0])
            )
            _loaded = True
        except Exception as error:  # no compiler or ninja: the other kernels serve, and we say so once
            _loaded, _why_not = False, f"building it failed ({type(error).__name__}: {str(error).splitlines()[0]})"
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
