"""The Gemma 3n language model: embeddings + per-layer embeddings, AltUp streams, decoder layers, tied LM head."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import TextConfig
from ..modules import RMSNorm, checkpoint_embedding, in_dtype
from .attention import rope_cos_sin
from .heads import lm_head_logits
from .kv_cache import AttentionContext, KVCache
from .layers import DecoderLayer
from .linear import Linear
from .mapped_rows import advise_row_reads, gather_rows


def match_magnitude(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Rescale ``x`` so its per-token RMS equals ``target`` [.., 1] (floor 1e-5 on the mean square)."""
    magnitude = torch.sqrt(torch.clamp(torch.mean(x**2, dim=-1, keepdim=True), min=1e-5))
    return x * target / magnitude


_RSQRT_2 = torch.rsqrt(torch.tensor(2.0)).item()  # float32 1/sqrt(2), as the reference computes it


class TextModel(nn.Module):
    """Decoder-only language model. Parameter names follow the published ``language_model.*`` tensors."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        L, P, H = config.num_hidden_layers, config.hidden_size_per_layer_input, config.hidden_size
        self.embed_tokens = checkpoint_embedding(config.vocab_size, H)
        self.embed_tokens_per_layer = checkpoint_embedding(config.vocab_size_per_layer_input, L * P)
        self.per_layer_model_projection = Linear(H, L * P, bias=False)
        self.per_layer_projection_norm = RMSNorm(P, eps=config.rms_norm_eps)
        self.altup_projections = nn.ModuleList(Linear(H, H, bias=False) for _ in range(config.altup_num_inputs - 1))
        self.altup_unembed_projections = nn.ModuleList(
            Linear(H, H, bias=False) for _ in range(config.altup_num_inputs - 1)
        )
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(L))
        self.norm = RMSNorm(H, eps=config.rms_norm_eps)
        # optional separate LM head (e.g. a quantized copy of the tied table, see gemma3n.quantize); None: tied weight
        self.lm_head: nn.Module | None = None
        # row blocks of the tied table that have oneDNN-packed copies for the head (packed_weights); () for none
        self.packed_head: tuple[torch.Tensor, ...] = ()

    def enable_sparse_decode(self, enable: bool = True) -> int:
        """CPU decode steps skip the inactive channels of the sparse MLP layers (see
        :meth:`SparseMLP.enable_sparse_decode`); returns how many layers take that path."""
        return sum(layer.mlp.enable_sparse_decode(enable) for layer in self.layers)

    def advise_row_reads(self) -> int:
        """Mark the file-mapped embedding tables that are only read by row gathers for random reads (the per-layer
        table; the token table too when a separate LM head leaves it to the gathers); returns how many were marked.
        See :func:`gemma3n.text_model.mapped_rows.advise_row_reads`."""
        tables = [self.embed_tokens_per_layer] + ([self.embed_tokens] if self.lm_head is not None else [])
        return sum(advise_row_reads(table) for table in tables)

    def enable_compiled_prefill(self, enable: bool = True) -> int:
        """Prefill runs each layer's element-wise work through ``torch.compile`` (see
        :meth:`DecoderLayer.enable_compiled_prefill`; ``generate(compile=True)`` turns it on); returns how many layers
        take that path."""
        return sum(layer.enable_compiled_prefill(enable) for layer in self.layers)

    # ---- inputs -------------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(hidden) (the scale rounded to the weight dtype). [B, T] -> [B, T, H]"""
        weight = self.embed_tokens.weight
        # the tied LM head (no separate head, no packed copy) reads the whole table every step: keep it mapped then
        release = self.lm_head is not None or bool(self.packed_head)
        rows = gather_rows(self.embed_tokens, input_ids.to(weight.device), release=release)
        return rows * in_dtype(self.config.embed_scale, weight.dtype)

    def per_layer_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids for the per-layer table: tokens outside its vocabulary (image/audio tokens) read row 0."""
        inside = (input_ids >= 0) & (input_ids < self.config.vocab_size_per_layer_input)
        return torch.where(inside, input_ids, torch.zeros_like(input_ids))

    def per_layer_inputs(self, ple_ids: torch.Tensor, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Per-layer inputs [B, T, L, P]: table rows (scaled) plus a normalised projection of the embeddings."""
        cfg = self.config
        L, P = cfg.num_hidden_layers, cfg.hidden_size_per_layer_input
        dtype = inputs_embeds.dtype
        table = self.embed_tokens_per_layer.weight  # may live off the compute device (PLE offload)
        rows = gather_rows(self.embed_tokens_per_layer, ple_ids.to(table.device)) * in_dtype(math.sqrt(P), table.dtype)
        rows = rows.to(inputs_embeds.device, non_blocking=True).view(*ple_ids.shape, L, P)
        projected = self.per_layer_model_projection(inputs_embeds) * in_dtype(cfg.hidden_size**-0.5, dtype)
        projected = self.per_layer_projection_norm(projected.view(*inputs_embeds.shape[:-1], L, P))
        return (projected + rows) * in_dtype(_RSQRT_2, dtype)

    # ---- body ---------------------------------------------------------------------------------------------------
    def hidden_states(
        self,
        inputs_embeds: torch.Tensor,
        per_layer_inputs: torch.Tensor,
        position_ids: torch.Tensor,
        ctx: AttentionContext,
        keep_last: int | None = None,
    ) -> torch.Tensor:
        """Run the decoder. inputs_embeds [B, T, H] -> final normed hidden states [B, T, H].

        With ``keep_last`` the KV-shared layers (which write no cache) only process the last ``keep_last`` positions,
        and only those are returned: same values as the full computation, less work during prefill.
        """
        cfg = self.config
        # AltUp entry: stream 0 is the embedding, the others are projections rescaled to its magnitude.
        target = torch.mean(inputs_embeds**2, dim=-1, keepdim=True) ** 0.5
        streams = torch.stack(
            [inputs_embeds] + [match_magnitude(proj(inputs_embeds), target) for proj in self.altup_projections]
        )  # [n, B, T, H]
        ropes = {
            t: rope_cos_sin(position_ids, cfg.head_dim, base, inputs_embeds.dtype) for t, base in cfg.rope_bases.items()
        }
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        first_shared = cfg.first_kv_shared_layer
        for i, layer in enumerate(self.layers):
            if keep_last is not None and i == first_shared and keep_last < streams.shape[2]:
                streams = streams[:, :, -keep_last:]
                per_layer_inputs = per_layer_inputs[:, -keep_last:]
                ropes = {t: (c[:, -keep_last:], s[:, -keep_last:]) for t, (c, s) in ropes.items()}
                ctx = ctx.keep_last(keep_last)
            rope = ropes[cfg.layer_types[i]]
            streams = layer(streams, per_layer_inputs[:, :, i], rope, ctx, shared_kv)

        # AltUp exit: bring the side streams back to stream 0's magnitude and average all streams.
        target = torch.mean(streams[0] ** 2, dim=-1, keepdim=True) ** 0.5
        outs = [streams[0]] + [
            match_magnitude(proj(streams[i + 1]), target) for i, proj in enumerate(self.altup_unembed_projections)
        ]
        return self.norm(torch.stack(outs).mean(dim=0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head (or ``lm_head`` when set) with the final soft-capping. [B, T, H] -> [B, T, vocab]"""
        softcap = self.config.final_logit_softcapping
        return lm_head_logits(hidden, self.embed_tokens.weight, self.lm_head, softcap, self.packed_head)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        ple_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        logits_to_keep: int | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (or the last ``logits_to_keep`` positions) for token ids or ready embeddings.

        ``ple_ids`` are the ids for the per-layer table (default: ``input_ids``); ``position_ids`` default to
        ``start + arange(T)``; ``attention_mask`` [B, T] marks real tokens (left padding), as in the reference.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
            ple_ids = input_ids if ple_ids is None else ple_ids
        if ple_ids is None:
            raise ValueError("inputs_embeds needs ple_ids (the token ids for the per-layer embeddings)")
        B, T = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = (torch.arange(T, device=device) + start).expand(B, T)
        ctx = AttentionContext(
            self.config, T, cache=cache, start=start, attention_mask=attention_mask, batch_size=B, device=device
        )
        per_layer = self.per_layer_inputs(self.per_layer_ids(ple_ids), inputs_embeds)
        hidden = self.hidden_states(inputs_embeds, per_layer, position_ids, ctx, keep_last=logits_to_keep)
        if logits_to_keep is not None:
            hidden = hidden[:, -logits_to_keep:]
        return self.logits(hidden)
