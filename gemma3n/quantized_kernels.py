"""The CPU weight-only kernels as the quantized layers call them: torch's, and for int8 and int4 products of 1-31 rows
our VNNI row kernels where they are ready (:mod:`gemma3n.row_kernels`).

Shared by the quantized layers (:mod:`gemma3n.quantize`) and the sparse decode products
(:mod:`gemma3n.text_model.sparse_decode`); imports only :mod:`gemma3n.row_kernels` (which imports nothing of gemma3n),
so both can use it.
"""

from __future__ import annotations

import torch

from .row_kernels import (
    int4_row_kernel_product,
    int8_row_kernel_product,
    int8_tiles_row_kernel_product,
    uses_int4_row_kernel,
    uses_int8_row_kernel,
)


def int8_tiles(qweight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """An int8 weight [out, in] (out a multiple of 32, in even) in tiles of 32 output rows, as the tiled row kernel
    reads it: [out, in] int8 again, whose rows ``32 t`` to ``32 t + 31`` hold tile ``t``: for each pair of inputs
    (c, c + 1), 64 bytes, row j's two weights at bytes 2j and 2j + 1. A tile takes the bytes its rows took. Written
    into ``out`` ([out, in] int8) when given."""
    return _transpose_pairs(qweight, 32, qweight.shape[1] // 2, out)


def int8_rows_of_tiles(tiles: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`int8_tiles`: [out, in] int8 in tiles -> the weight's rows [out, in] (into ``out`` when
    given)."""
    return _transpose_pairs(tiles, tiles.shape[1] // 2, 32, out)


def _transpose_pairs(q: torch.Tensor, rows: int, cols: int, out: torch.Tensor | None) -> torch.Tensor:
    """Each block of 32 rows of ``q`` [n, in] int8, read as int16 pairs [rows, cols] (32 x in / 2 either way),
    transposed. Moving the pairs as int16 ran 3x as fast as moving single bytes through a 4-D transpose (E2B's
    [8192, 2048] back into rows: 3.4 ms converted to bf16 afterwards, against 10 ms in one strided conversion)."""
    n, in_f = q.shape
    out = torch.empty_like(q) if out is None else out
    pairs = q.view(torch.int16).view(n // 32, rows, cols)
    out.view(torch.int16).view(n // 32, cols, rows).copy_(pairs.transpose(1, 2))
    return out


def int8_product(rows: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """``rows @ (qweight * scales)^T`` [n, out]: rows [n, in] (float), qweight [out, in] int8 (``tiled``: in the
    layout of :func:`int8_tiles`), scales [out]. 1-31 bf16 rows go through the VNNI row kernel where it is ready,
    others through ``torch._weight_int8pack_mm`` (scales converted to the rows' dtype, as that kernel needs; a tiled
    weight is put back in rows for it, per call)."""
    if uses_int8_row_kernel(rows, qweight):
        if tiled:
            return int8_tiles_row_kernel_product(rows, qweight, scales)
        return int8_row_kernel_product(rows, qweight, scales)
    scales = scales if scales.dtype == rows.dtype else scales.to(rows.dtype)
    return torch._weight_int8pack_mm(rows.contiguous(), int8_rows_of_tiles(qweight) if tiled else qweight, scales)


def int4_product(
    rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int
) -> torch.Tensor:
    """``rows @ W^T`` [n, out_features]: rows [n, in] (float), the weight in torch's CPU int4 packing (``packed``
    [ceil64(out), in / 2], ``scales_and_zeros`` [in / group, ceil64(out), 2]). 1-31 bf16 rows go through the VNNI row
    kernel where it is ready, others through ``torch._weight_int4pack_mm_for_cpu`` (whose zero rows padding ``out`` to
    whole blocks of 64 are cut off)."""
    if uses_int4_row_kernel(rows, packed, scales_and_zeros, group_size):
        return int4_row_kernel_product(rows, packed, scales_and_zeros, group_size, out_features)
    return torch_int4_product(rows, packed, scales_and_zeros, group_size, out_features)


def torch_int4_product(
    rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int
) -> torch.Tensor:
    """:func:`int4_product` through ``torch._weight_int4pack_mm_for_cpu`` whatever the rows."""
    sz = scales_and_zeros if scales_and_zeros.dtype == rows.dtype else scales_and_zeros.to(rows.dtype)
    out = torch._weight_int4pack_mm_for_cpu(rows.contiguous(), packed, group_size, sz)  # [n, ceil64(out)]
    return out if out.shape[1] == out_features else out[:, :out_features]
