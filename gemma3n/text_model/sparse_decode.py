"""Decode steps that read only the active channels of Gemma 3n's sparse MLPs (CPU).

With activation sparsity ``s`` (0.95 in the first 10 layers of E2B and E4B) the gate keeps only values above a
Gaussian quantile and sets the rest to exactly 0, and ``gelu(0) == 0``: for one token about 5% of the intermediate
channels are non-zero. A decode step then needs only those rows of ``up_proj`` and those columns of ``down_proj``, so
2/3 of the layer's MLP weights need not be read at all (the gate must still be computed whole: its cutoff depends on
the mean and spread of every channel). Columns of ``down_proj`` are gathered from a transposed copy, whose rows are
contiguous: gathering columns of the [hidden, intermediate] original would touch nearly every cache line.

The product is a custom op, so a compiled decode step calls it as one opaque kernel (its shapes inside depend on the
data). Outputs match the dense product up to float32 summation order (the skipped terms are exact zeros).
"""

from __future__ import annotations

import torch

from .linear import linear_product

# With more channels active than this (the union over the rows of a batch), the dense product reads less.
MAX_ACTIVE_FRACTION = 0.5


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
    active = activation.ne(0).any(0).nonzero().squeeze(1)  # [k] channels some row uses
    if active.numel() > MAX_ACTIVE_FRACTION * activation.shape[1]:
        return linear_product(activation * linear_product(x, up_weight), down_weight)
    up = linear_product(x, up_weight.index_select(0, active))  # [N, k]
    gated = activation.index_select(1, active) * up  # [N, k]
    return gated @ down_weight_t.index_select(0, active)  # [N, k] @ [k, H] -> [N, H]


@sparse_gated_down.register_fake
def _(activation, x, up_weight, down_weight, down_weight_t):
    return x.new_empty(x.shape[0], down_weight.shape[0])
