"""A linear layer whose few-row products on a CPU stream the weight at memory bandwidth (decode steps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FEW_ROWS = 4  # products with up to this many rows (decode of small batches) take the weight-major path
# Under torch.compile, few-row products with weights up to this size (1 MB in bf16) are traced as a multiply-and-sum
# that inductor fuses with the ops around it: a BLAS call costs about 35 us however small the weight (oneDNN's own
# time is about 11 us), and a Gemma 3n decode step makes 180 such calls (LAuReL, per-layer gate and projection,
# AltUp router): 12-19 ms of an E2B step.
SMALL_WEIGHT_ELEMENTS = 1 << 19


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
    """Whether a product of ``rows`` rows with ``weight`` goes through :func:`fused_small_product`: few rows, a weight
    of at most ``SMALL_WEIGHT_ELEMENTS``, and torch.compile tracing (eager keeps its BLAS call)."""
    return rows <= FEW_ROWS and weight.numel() <= SMALL_WEIGHT_ELEMENTS and torch.compiler.is_compiling()


def fused_small_product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` [..., out] as a float32 multiply-and-sum, rounded once to x's dtype (as a BLAS product
    rounds); meant for tracing: inductor fuses it into one reduction loop, never materialising [..., out, in]."""
    return (x.float().unsqueeze(-2) * weight.float()).sum(-1).to(x.dtype)


def linear_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; for few rows on a CPU, through :func:`weight_major_product` (bf16) or, when traced by
    torch.compile with a small weight, :func:`fused_small_product`."""
    if x.device.type == "cpu" and bias is None and x.numel() <= FEW_ROWS * x.shape[-1]:
        if traced_small_product(x.numel() // x.shape[-1], weight):
            return fused_small_product(x, weight)
        if x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16:
            return weight_major_product(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) through :func:`linear_product` (few rows on a CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_product(x, self.weight, self.bias)
