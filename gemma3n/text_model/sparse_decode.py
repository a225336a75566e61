"""Decode steps that read only the active channels of Gemma 3n's sparse MLPs (CPU; float and int8 weights).

With activation sparsity ``s`` (0.95 in the first 10 layers of E2B and E4B) the gate keeps only values above a
Gaussian quantile and sets the rest to exactly 0, and ``gelu(0) == 0``: for one token about 5% of the intermediate
channels are non-zero. A decode step then needs only those rows of ``up_proj`` and those columns of ``down_proj``, so
2/3 of the layer's MLP weights need not be read at all (the gate must still be computed whole: its cutoff depends on
the mean and spread of every channel). Columns of ``down_proj`` are gathered from a transposed copy, whose rows are
contiguous: gathering columns of the [hidden, intermediate] original would touch nearly every cache line.

int8 layers gather the same way: up's rows go through the int8 kernel itself, and the transposed copy of
``down_proj`` is int8 too (its scales stay one per output). Rows are gathered with ``F.embedding``: ``index_select``
on a bf16 table ran 10x slower on an AMD EPYC (Zen 4) than the same bytes gathered as int16, or by the embedding.
int4 layers keep their dense kernel: a group-wise int4 column of ``down_proj`` carries its own scale and zero per
output (groups run along the intermediate dimension), 8x its weight bytes, and the gathered path measured slower than
the dense kernel (benchmarks/results/sparse_mlp_products_epyc.md).

Each product is a custom op, so a compiled decode step calls it as one opaque kernel (its shapes inside depend on the
data). Outputs match the dense product up to float32 summation order (the skipped terms are exact zeros).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..quantized_kernels import int8_product
from .linear import Linear, linear_product, packed_copy

# With more channels active than this (the union over the rows of a batch), the dense product is the faster. Measured
# on an AMD EPYC (Zen 4), E2B shapes (benchmarks/results/sparse_mlp_products_epyc.md): at batch 1 (about 5% active)
# the sparse product took 1/7 (bf16) and 1/1.7 (int8) of the dense time, at batch 4 (18%) 2.3x and 1.6x of it.
MAX_ACTIVE_FRACTION = 0.125


def active_channels(activation: torch.Tensor, max_fraction: float) -> torch.Tensor | None:
    """The channels [k] where some row of ``activation`` [N, I] is non-zero, or None when they are more than
    ``max_fraction`` of the I channels (then the dense product reads less)."""
    active = activation.ne(0).any(0).nonzero().squeeze(1)
    return None if active.numel() > max_fraction * activation.shape[1] else active


@torch.library.custom_op("gemma3n::sparse_gated_down", mutates_args=())
def sparse_gated_down(
    activation: torch.Tensor,
    x: torch.Tensor,
    up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    down_weight_t: torch.Tensor,
) -> torch.Tensor:
    """``down(activation * up(x))`` over the channels where some row of ``activation`` is non-zero.

    activation [N, I] (exact zeros where the gate is off), x [N, H], up_weight [I, H], down_weight [H, I] and its
    transposed copy down_weight_t [I, H] -> [N, H].
    """
    active = active_channels(activation, MAX_ACTIVE_FRACTION)
    if active is None:  # the dense product, through the packed copies where the weights have them
        up_dense = linear_product(x, up_weight, packed=packed_copy(up_weight) is not None)
        return linear_product(activation * up_dense, down_weight, packed=packed_copy(down_weight) is not None)
    up = linear_product(x, F.embedding(active, up_weight))  # [N, k]
    gated = activation.index_select(1, active) * up  # [N, k]
    return gated @ F.embedding(active, down_weight_t)  # [N, k] @ [k, H] -> [N, H]


@sparse_gated_down.register_fake
def _(activation, x, up_weight, down_weight, down_weight_t):
    return x.new_empty(x.shape[0], down_weight.shape[0])


@torch.library.custom_op("gemma3n::sparse_gated_down_int8", mutates_args=())
def sparse_gated_down_int8(
    activation: torch.Tensor,
    x: torch.Tensor,
    up_qweight: torch.Tensor,
    up_scales: torch.Tensor,
    down_qweight: torch.Tensor,
    down_scales: torch.Tensor,
    down_qweight_t: torch.Tensor,
) -> torch.Tensor:
    """:func:`sparse_gated_down` for int8 per-channel weights (``gemma3n.quantize.Int8Linear``): up [I, H] int8 with
    scales [I], down [H, I] int8 with scales [H], and down's transposed copy [I, H] int8 -> [N, H].

    Up's active rows go through the int8 kernel (its rounding, bit for bit). Down's active columns, rows of the copy,
    are summed in float32 and scaled before one rounding to x's dtype, as the kernel does."""
    active = active_channels(activation, MAX_ACTIVE_FRACTION)
    if active is None:
        return int8_product(activation * int8_product(x, up_qweight, up_scales), down_qweight, down_scales)
    up = int8_product(x, F.embedding(active, up_qweight), up_scales.index_select(0, active))  # [N, k]
    gated = activation.index_select(1, active) * up  # [N, k]
    down = gated.float() @ F.embedding(active, down_qweight_t).float()  # [N, k] @ [k, H] -> [N, H]
    return (down * down_scales.float()).to(x.dtype)


@sparse_gated_down_int8.register_fake
def _(activation, x, up_qweight, up_scales, down_qweight, down_scales, down_qweight_t):
    return x.new_empty(x.shape[0], down_qweight.shape[0])


@dataclass(frozen=True)
class SparseDecodeProduct:
    """One sparse layer's decode product: ``op(activation, rows, *weights)``, with the weights (and row-gatherable
    copies) its up and down layers need."""

    op: Any
    weights: tuple[Any, ...]

    def __call__(self, activation: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.op(activation, rows, *self.weights)


def sparse_decode_product(up: nn.Module, down: nn.Module) -> SparseDecodeProduct | None:
    """The sparse decode product for an MLP's ``up_proj`` and ``down_proj`` on the CPU: plain float ``Linear``
    layers, or both int8 layers of :mod:`gemma3n.quantize` (put back in rows if they were tiled); None for anything
    else (int4, CUDA, mixed)."""
    from ..quantize import Int8Linear  # gemma3n.quantize imports this package

    weights = [t for m in (up, down) for t in m.buffers()] + [p for m in (up, down) for p in m.parameters()]
    if not weights or any(t.device.type != "cpu" for t in weights):
        return None
    if type(up) is Linear and type(down) is Linear and up.weight.is_floating_point():
        down_t = down.weight.detach().t().contiguous()
        return SparseDecodeProduct(sparse_gated_down, (up.weight, down.weight, down_t))
    if type(up) is Int8Linear and type(down) is Int8Linear:
        up.use_tiles(False)  # gathered by rows (the tiles of Int8Linear.use_tiles are not)
        down.use_tiles(False)
        weights = (up.qweight, up.scales, down.qweight, down.scales, down.transposed_qweight())
        return SparseDecodeProduct(sparse_gated_down_int8, weights)
    return None
