"""The gated GELU feed-forward block of every model of the family."""

from __future__ import annotations

import torch
from torch import nn

from ..modules import gelu
from .linear import Linear


class MLP(nn.Module):
    """``down(gelu(gate(x)) * up(x))`` (hidden -> intermediate -> hidden); tanh GELU unless ``exact_gelu``."""

    def __init__(self, hidden: int, intermediate: int, exact_gelu: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)
        self.approximate = "none" if exact_gelu else "tanh"

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate before its activation, [..., intermediate]."""
        return self.gate_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.gate(x), self.approximate) * self.up_proj(x))
