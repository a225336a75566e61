"""The decoder of Gemma and Gemma 2: scaled token embedding, a stack of layers, final norm, (tied) LM head.

The layers are :mod:`gemma3n.text_model.gemma`'s or :mod:`gemma3n.text_model.gemma2`'s; attention, MLP, norms and
the KV cache are the family's shared blocks. Parameter names follow the published ``model.*`` tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..gemma_config import GemmaConfig
from ..modules import RMSNorm, checkpoint_embedding, in_dtype
from .attention import rope_cos_sin
from .gemma import GemmaDecoderLayer
from .gemma2 import Gemma2DecoderLayer
from .heads import lm_head_logits
from .kv_cache import AttentionContext, KVCache


class Decoder(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        layer = Gemma2DecoderLayer if config.is_gemma2 else GemmaDecoderLayer
        self.embed_tokens = checkpoint_embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, unit_offset=True)
        # separate LM head: an untied checkpoint's, or a quantized copy of the tied table (gemma3n.quantize)
        self.lm_head: nn.Module | None = None
        # row blocks of the tied table that have oneDNN-packed copies for the head (packed_weights); () for none
        self.packed_head: tuple[torch.Tensor, ...] = ()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(hidden) (the scale rounded to the weight dtype). [B, T] -> [B, T, H]"""
        weight = self.embed_tokens.weight
        return self.embed_tokens(input_ids.to(weight.device)) * in_dtype(self.config.embed_scale, weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Final normed hidden states [B, T, H] for token ids [B, T] (or ready embeddings [B, T, H]).

        ``attention_mask`` [B, T] marks real tokens; ``position_ids`` default to ``start + arange(T)``.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        B, T = h.shape[:2]
        if position_ids is None:
            position_ids = (torch.arange(T, device=h.device) + start).expand(B, T)
        ctx = AttentionContext(
            self.config, T, cache=cache, start=start, attention_mask=attention_mask, batch_size=B, device=h.device
        )
        rope = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_base, h.dtype)  # [B, T, hd] x 2
        for layer in self.layers:
            h = layer(h, rope, ctx)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (tied unless ``lm_head`` is set) with the final soft-cap. [B, T, H] -> [B, T, vocab]"""
        softcap = self.config.final_logit_softcapping
        return lm_head_logits(hidden, self.embed_tokens.weight, self.lm_head, softcap, self.packed_head)
