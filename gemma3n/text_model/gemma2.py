"""One Gemma 2 decoder layer: attention and MLP each wrapped in a pre- and a post-norm; attention soft-caps its
scores and, on sliding layers (the context's "sliding_attention" mask), sees only the last ``sliding_window`` keys."""

from __future__ import annotations

import torch
from torch import nn

from ..gemma_config import GemmaConfig
from ..modules import RMSNorm
from .attention import Attention
from .kv_cache import AttentionContext
from .mlp import MLP


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(
            config, layer_idx, scale=config.attention_scale, softcap=config.attn_logit_softcapping
        )
        self.mlp = MLP(hidden, config.intermediate_size, exact_gelu=not config.gelu_tanh)
        self.input_layernorm = RMSNorm(hidden, eps=eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps=eps, unit_offset=True)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps=eps, unit_offset=True)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ctx: AttentionContext) -> torch.Tensor:
        """h [B, T, H] -> [B, T, H]."""
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), rope, ctx))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
