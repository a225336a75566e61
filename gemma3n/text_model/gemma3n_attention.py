"""Gemma 3n's attention: RMS-normalised q, k and v (so the score scale is 1.0), and KV sharing: the last layers
own no key/value projections and attend over the cache of the last earlier layer of their type."""

from __future__ import annotations

import torch

from ..config import TextConfig
from ..modules import RMSNorm
from .attention import Attention, apply_rope
from .kv_cache import AttentionContext


class Gemma3nAttention(Attention):
    def __init__(self, config: TextConfig, layer_idx: int):
        self.kv_source = config.kv_source_layer(layer_idx)
        kv_shared = self.kv_source != layer_idx
        super().__init__(config, layer_idx, scale=1.0, with_kv=not kv_shared)
        self.kv_shared = kv_shared
        self.q_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps)
        if not kv_shared:
            self.k_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps)
            self.v_norm = RMSNorm(config.head_dim, eps=config.rms_norm_eps, with_scale=False)

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, T, _ = x.shape
        return apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)), *rope).transpose(1, 2)

    def keys_values(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kv_shared:
            return shared_kv[self.kv_source]  # [B, kvh, Lk, hd], already cached by the source layer
        B, T, _ = x.shape
        k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)), *rope).transpose(1, 2)
        v = self.v_norm(self.v_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        k, v = ctx.keys_values(self.layer_idx, self.sliding, k, v)
        shared_kv[self.layer_idx] = (k, v)
        return k, v
