"""torch's CPU weight-only kernels as the quantized layers call them.

Shared by the quantized layers (:mod:`gemma3n.quantize`) and the sparse decode products
(:mod:`gemma3n.text_model.sparse_decode`); imports nothing of gemma3n, so both can use it.
"""

from __future__ import annotations

import torch


def int8_product(rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``rows @ (qweight * scales)^T`` [n, out] through ``torch._weight_int8pack_mm``: rows [n, in] (float),
    qweight [out, in] int8, scales [out] (converted to the rows' dtype, as the kernel needs)."""
    scales = scales if scales.dtype == rows.dtype else scales.to(rows.dtype)
    return torch._weight_int8pack_mm(rows.contiguous(), qweight, scales)


def int4_product(
    rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int
) -> torch.Tensor:
    """``rows @ W^T`` [n, out_features] through ``torch._weight_int4pack_mm_for_cpu``: rows [n, in] (float), the
    weight in torch's CPU int4 packing (``packed`` [ceil64(out), in / 2], ``scales_and_zeros`` [in / group,
    ceil64(out), 2]); the zero rows padding ``out`` to whole blocks of 64 are cut off."""
    sz = scales_and_zeros if scales_and_zeros.dtype == rows.dtype else scales_and_zeros.to(rows.dtype)
    out = torch._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, group_size, sz)  # [n, ceil64(out)]
    return out if out.shape[1] == out_features else out[:, :out_features]
