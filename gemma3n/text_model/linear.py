"""A linear layer whose few-row products on a CPU stream the weight at memory bandwidth (decode steps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 4  # products with up to this many rows (decode of small batches) take the weight-major path


def weight_major_product(x: torch.Tensor, weight: torch.Tensor, *, contiguous: bool = True) -> torch.Tensor:
    """``x @ weight.T`` computed as ``weight @ rows.T``. x [..., in], weight [out, in] -> [..., out].

    On a CPU, torch runs a product of few rows against a large weight as a matrix-vector kernel that reaches a
    fraction of the memory bandwidth; the same product with the weight as the left operand runs as a GEMM with a
    narrow right side that streams the weight. One row is padded to two, which takes that GEMM path.
    ``contiguous=False`` returns a transposed view instead of a copy (for a result too big to copy, the LM head's).
    """
    rows = x.reshape(-1, x.shape[-1])  # [n, in]
    n = rows.shape[0]
    if n == 1:
        rows = torch.cat([rows, torch.zeros_like(rows)])
    out = (weight @ rows.T)[:, :n].T  # [out, n or 2] -> [n, out]
    if contiguous:
        out = out.contiguous()
    return out.reshape(*x.shape[:-1], weight.shape[0])


def linear_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, through :func:`weight_major_product` for few bf16 rows on a CPU."""
    if (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and weight.dtype == torch.bfloat16
        and bias is None
        and x.numel() <= FEW_ROWS * x.shape[-1]
    ):
        return weight_major_product(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) taking :func:`weight_major_product` for few bf16 rows on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_product(x, self.weight, self.bias)
