"""Small building blocks shared by the decoder and the encoders."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32; ``with_scale=False`` gives the scale-free variant.

    The weight multiplies directly (no ``1 + w`` offset, unlike Gemma 1-3).
    """

    def __init__(self, dim: int, eps: float = 1e-6, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        # pow(-0.5) rather than rsqrt: matches the reference's arithmetic bit for bit in fp32.
        out = x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            out = out * self.weight.float()
        return out.type_as(x)


def checkpoint_embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """An ``nn.Embedding`` whose weight is left uninitialized, because a checkpoint always provides it.

    Skipping the random init matters on the meta device: torch's normal_ init there costs about 2 s on first use
    (it imports torch._dynamo), which every model load would pay.
    """
    return nn.Embedding.from_pretrained(torch.empty(num_embeddings, dim), freeze=False)
