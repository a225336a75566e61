"""Attention shared by the decoder family: RoPE, grouped-query heads, sliding windows (via the context's masks),
logit soft-capping, and the KV cache. Gemma and Gemma 2 use :class:`Attention` as is; Gemma 3n's variant (q/k/v
norms, KV sharing) is :class:`gemma3n.text_model.gemma3n_attention.Gemma3nAttention`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kv_cache import AttentionContext
from .linear import Linear, materialized


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


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """Grouped-query attention. q [B, H, T, D], k/v [B, KVH, Lk, D], boolean mask [B, 1, T, Lk] -> [B, H, T, D].

    Without ``softcap`` this is SDPA. With it, the scores are capped as ``cap * tanh(scores / cap)`` before the mask
    and a float32 softmax (Gemma 2); the query heads of each key/value head are folded into the rows of one product,
    so keys and values are never repeated per head. A bf16 / fp16 decode step on the CPU (one query per sequence)
    takes :func:`single_query_attention` instead.
    """
    if uses_single_query_attention(q):
        return single_query_attention(q, k, v, mask, scale, softcap)
    heads, kv_heads = q.shape[1], k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=heads != kv_heads)
    B, _, T, D = q.shape
    group = heads // kv_heads
    scores = q.reshape(B, kv_heads, group * T, D) @ k.transpose(-1, -2) * scale  # [B, KVH, group * T, Lk]
    scores = (scores / softcap).tanh() * softcap
    scores = scores.view(B, heads, T, -1).masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs.view(B, kv_heads, group * T, -1) @ v).view(B, heads, T, D)


def uses_single_query_attention(q: torch.Tensor) -> bool:
    """Whether :func:`attend` computes ``q`` [B, H, T, D] with :func:`single_query_attention`: a decode step (T == 1)
    in bf16 or fp16 on the CPU. There torch's SDPA takes 6x longer than this float32 computation for one query over
    256 keys (450 against 75 us per E2B layer on an AMD EPYC, ``benchmarks/decode_attention.py``): 30 layers' SDPA
    were 15 ms of a 90 ms int4 step. float32 keeps SDPA, which is as fast there and matches the reference bit for bit.
    """
    return q.shape[2] == 1 and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)


def single_query_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """Attention of one query per sequence, in float32 throughout: q [B, H, 1, D], k/v [B, KVH, Lk, D], boolean mask
    [B, 1, 1, Lk] -> [B, H, 1, D] in q's dtype, rounded once at the end.

    The H / KVH query heads of each key/value head are the rows of one product (q viewed as [B, KVH, group, D]), so
    the cache is never repeated per head. Eager calls upcast k and v and use two batched products; under
    ``torch.compile`` both products are written as multiply-and-sum, which inductor fuses into reductions that read
    the cache in its own dtype (no float32 copy of it; 5x faster at 4 sequences x 4096 keys).
    """
    B, heads, _, D = q.shape
    kv_heads = k.shape[1]
    fused = torch.compiler.is_compiling()
    if fused:  # q in a buffer of its own: else inductor recomputes its norm and RoPE (cos, sin) for every key
        q = materialized(q)
    queries = q.reshape(B, kv_heads, heads // kv_heads, D).float()  # [B, KVH, group, D]
    if fused:
        scores = (queries[:, :, :, None, :] * k[:, :, None].float()).sum(-1)  # [B, KVH, group, Lk]
    else:
        scores = queries @ k.float().transpose(-1, -2)
    scores = scores * scale
    if softcap is not None:
        scores = (scores / softcap).tanh() * softcap
    probs = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # mask broadcasts over [KVH, group]
    if fused:
        out = (probs[..., None] * v[:, :, None].float()).sum(-2)  # [B, KVH, group, D]
    else:
        out = probs @ v.float()
    return out.to(q.dtype).view(B, heads, 1, D)


class Attention(nn.Module):
    """Self-attention of one decoder layer: q/k/v projections, RoPE, the cache, :func:`attend`, output projection."""

    def __init__(
        self,
        config,
        layer_idx: int,
        *,
        scale: float,
        softcap: float | None = None,
        with_kv: bool = True,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.layer_type = config.layer_types[layer_idx]
        self.sliding = self.layer_type == "sliding_attention"
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = scale
        self.softcap = softcap
        bias = config.attention_bias
        self.q_proj = Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        if with_kv:  # Gemma 3n's KV-shared layers read another layer's keys/values and own no projections
            self.k_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
            self.v_proj = Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def queries(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x [B, T, hidden] -> rotated queries [B, heads, T, head_dim]."""
        B, T, _ = x.shape
        return apply_rope(self.q_proj(x).view(B, T, -1, self.head_dim), *rope).transpose(1, 2)

    def keys_values(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values in the cache; return what the queries attend over [B, kv_heads, Lk, hd]."""
        B, T, _ = x.shape
        k = apply_rope(self.k_proj(x).view(B, T, -1, self.head_dim), *rope).transpose(1, 2)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        return ctx.keys_values(self.layer_idx, self.sliding, k, v)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """x [B, T, hidden] -> [B, T, hidden]."""
        B, T, _ = x.shape
        q = self.queries(x, rope)
        k, v = self.keys_values(x, rope, ctx, shared_kv)
        out = attend(q, k, v, ctx.masks[self.layer_type], self.scale, self.softcap)  # [B, heads, T, hd]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
