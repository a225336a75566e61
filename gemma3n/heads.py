"""Gemma and Gemma 2 models with their heads, loaded from a checkpoint: causal LM, sequence and token classification.

    model = gemma3n.load("path/to/gemma-2-2b")                  # -> CausalLM (from config.json "architectures")
    model(input_ids).logits                                      # [B, T, vocab]
    model.generate(input_ids, max_new_tokens=32)

``SequenceClassifier`` returns [B, labels] (each row pooled at its last non-padding token, found by
``pad_token_id``, for left and right padding alike); ``TokenClassifier`` returns [B, T, labels]. Labels are
``config.id2label``. All three share the decoder (:class:`gemma3n.text_model.decoder.Decoder`), the loader, and the
speed work: preallocated cache and compiled decode steps (generation), quantized linear layers (``quantize=``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import attach_weights, checkpoint_dtype, read_checkpoint_tensors
from .devices import resolve_device, resolve_dtype
from .gemma_config import GemmaConfig
from .loaded_model import LoadedModel
from .text_model.decoder import Decoder
from .text_model.heads import ModelOutput, last_token_index
from .text_model.kv_cache import KVCache
from .text_model.linear import Linear


class FamilyModel(LoadedModel):
    """What every Gemma / Gemma 2 model shares: the decoder (``model``) and its text-only input checks."""

    task = ""  # the pipeline task this head serves

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.model.embed_tokens.weight

    def _hidden(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        media: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        given = [name for name, value in (media or {}).items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} given, but this {self.config.model_type} model is text only")
        device = self.device
        input_ids = input_ids.to(device)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        return self.model(
            input_ids,
            attention_mask=None if attention_mask is None else attention_mask.to(device),
            position_ids=None if position_ids is None else position_ids.to(device),
            cache=cache,
            start=start,
        )


class CausalLM(FamilyModel):
    """A Gemma / Gemma 2 language model: logits [B, T, vocab] (tied head, Gemma 2's final soft-cap), generation."""

    task = "text-generation"

    def __init__(self, config: GemmaConfig):
        super().__init__(config)
        if not config.tie_word_embeddings:
            self.model.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        logits_to_keep: int | None = None,
        token_type_ids: torch.Tensor | None = None,
        **media: Any,
    ) -> ModelOutput:
        """Logits [B, T, vocab] (the last ``logits_to_keep`` positions only, when set). ``token_type_ids`` is
        accepted and unused, so ``model(**processor_outputs)`` works."""
        hidden = self._hidden(input_ids, attention_mask, position_ids, cache, start, media)
        if logits_to_keep is not None:
            hidden = hidden[:, -logits_to_keep:]
        return ModelOutput(logits=self.model.logits(hidden))

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Generate continuations; see :func:`gemma3n.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)


class SequenceClassifier(FamilyModel):
    """Scores [B, labels]: the ``score`` projection of each row's last non-padding token."""

    task = "text-classification"

    def __init__(self, config: GemmaConfig):
        super().__init__(config)
        self.score = Linear(config.hidden_size, config.num_labels, bias=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        hidden = self._hidden(input_ids, attention_mask, position_ids)  # [B, T, H]
        last = last_token_index(input_ids.to(hidden.device), self.config.pad_token_id)  # [B]
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        return ModelOutput(logits=self.score(pooled))


class TokenClassifier(FamilyModel):
    """Scores [B, T, labels]: the ``score`` projection (with bias) of every token."""

    task = "token-classification"

    def __init__(self, config: GemmaConfig):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=config.token_classification_bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        return ModelOutput(logits=self.score(self._hidden(input_ids, attention_mask, position_ids)))


HEAD_CLASSES: dict[str, type[FamilyModel]] = {
    "causal-lm": CausalLM,
    "sequence-classification": SequenceClassifier,
    "token-classification": TokenClassifier,
}


def load_family_model(
    path: Path,
    config: GemmaConfig,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
) -> FamilyModel:
    """Build the head ``config`` names on the meta device and attach the memory-mapped checkpoint tensors.

    ``quantize="int8" | "int4"`` (CPU or CUDA) makes the decoder's linear layers (and a causal LM's head) weight-only
    quantized, as for Gemma 3n; see :mod:`gemma3n.quantize`.
    """
    device = resolve_device(device)
    tensors = read_checkpoint_tensors(path)
    dtype = resolve_dtype(dtype) or checkpoint_dtype(tensors.values())
    with torch.device("meta"):
        model = HEAD_CLASSES[config.head](config)
    renamed = _published_to_module_names(tensors, config)
    if quantize is not None:
        from .quantize import quantize_checkpoint

        renamed = quantize_checkpoint(
            model,
            renamed,
            quantize,
            dtype=dtype,
            device=device,
            prefix="model.",
            lm_head=model.task == "text-generation",
        )
    attach_weights(model, renamed, dtype=dtype, device=device, source=str(path))
    if quantize is not None and device.type == "cpu":
        from .quantize import tile_int8_layers

        tile_int8_layers(model)
    model.path = path
    return model.eval().requires_grad_(False)


def _published_to_module_names(tensors: dict[str, torch.Tensor], config: GemmaConfig) -> dict[str, torch.Tensor]:
    """Published names -> module names: ``model.*`` and ``score.*`` as is; ``lm_head.weight`` dropped when tied
    (the embedding serves) or moved under the decoder; a bare decoder's unprefixed names get ``model.``."""
    bare = "model.embed_tokens.weight" not in tensors and "embed_tokens.weight" in tensors
    renamed = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            if not config.tie_word_embeddings and config.head == "causal-lm":
                renamed["model.lm_head.weight"] = tensor
            continue
        if bare and not name.startswith(("model.", "score.")):
            name = "model." + name
        renamed[name] = tensor
    return renamed
