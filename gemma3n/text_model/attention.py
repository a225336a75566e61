"""Self-attention of one decoder layer: q/k/v RMS norms, RoPE, grouped-query SDPA, KV sharing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..modules import RMSNorm
from .kv_cache import AttentionContext
from .linear import Linear


def rope_cos_sin(positions: torch.Tensor, head_dim: int, base: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos/sin tables [B, T, head_dim] for integer ``positions`` [B, T], computed in float32, returned in ``dtype``."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim))
    angles = positions.float()[..., None] * inv_freq  # [B, T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, heads, head_dim] by the (half-split) rotary embedding."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention with scale 1.0 (q and k are RMS-normalised instead)."""

    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.sliding = self.layer_type == "sliding_attention"
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.kv_source = config.kv_source_layer(layer_idx)
        self.kv_shared = self.kv_source != layer_idx
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        if not self.kv_shared:  # shared layers read another layer's keys/values and own no projections
            self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
            self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.v_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps, with_scale=False)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        B, T, _ = x.shape
        cos, sin = rope
        q = apply_rope(self.q_norm(self.q_proj(x).view(B, T, -1, self.head_dim)), cos, sin).transpose(1, 2)
        if self.kv_shared:
            k, v = shared_kv[self.kv_source]  # [B, kvh, Lk, hd], already cached by the source layer
        else:
            k = apply_rope(self.k_norm(self.k_proj(x).view(B, T, -1, self.head_dim)), cos, sin).transpose(1, 2)
            v = self.v_norm(self.v_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
            k, v = ctx.keys_values(self.layer_idx, self.sliding, k, v)
            shared_kv[self.layer_idx] = (k, v)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=ctx.masks[self.layer_type], scale=1.0, enable_gqa=self.num_heads != self.num_kv_heads
        )  # [B, heads, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
