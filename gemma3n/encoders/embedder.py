"""Maps vision / audio content into the text model's embedding space.

Two kinds of input share one projection:
  * soft tokens: encoder features [..., mm_hidden] -> soft norm -> projection -> scale-free norm;
  * hard tokens: ids of the modality's own small vocabulary, which sits in the tokenizer at
    ``[vocab_offset, vocab_offset + vocab_size)`` -> embedding row -> hard norm -> projection -> scale-free norm.

State-dict keys match the checkpoint's ``model.embed_vision.`` / ``model.embed_audio.`` sections.
"""

from __future__ import annotations

import torch
from torch import nn

from gemma3n.config import AudioConfig, TextConfig, VisionConfig
from gemma3n.modules import RMSNorm, checkpoint_embedding


class MultimodalEmbedder(nn.Module):
    """Soft features or hard token ids of one modality -> text embeddings [..., text_hidden]."""

    def __init__(self, multimodal_hidden: int, text_hidden: int, vocab_size: int, vocab_offset: int, eps: float):
        super().__init__()
        self.multimodal_hidden = multimodal_hidden
        self.vocab_size = vocab_size
        self.vocab_offset = vocab_offset
        self.embedding = checkpoint_embedding(vocab_size, multimodal_hidden)
        self.hard_embedding_norm = RMSNorm(multimodal_hidden, eps=eps)
        self.soft_embedding_norm = RMSNorm(multimodal_hidden, eps=eps)
        self.embedding_projection = nn.Linear(multimodal_hidden, text_hidden, bias=False)
        # No weight: this norm only rescales, so it adds no state-dict key.
        self.embedding_post_projection_norm = RMSNorm(text_hidden, eps=eps, with_scale=False)

    @classmethod
    def from_config(cls, config: VisionConfig | AudioConfig, text: TextConfig) -> MultimodalEmbedder:
        return cls(config.hidden_size, text.hidden_size, config.vocab_size, config.vocab_offset, config.rms_norm_eps)

    def in_vocab(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids that belong to this modality's vocabulary."""
        return (ids >= self.vocab_offset) & (ids < self.vocab_offset + self.vocab_size)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_post_projection_norm(self.embedding_projection(x))

    def embed_soft(self, features: torch.Tensor) -> torch.Tensor:
        """Encoder features [..., mm_hidden] -> [..., text_hidden]."""
        if features.shape[-1] != self.multimodal_hidden:
            raise ValueError(
                f"soft features must end in width {self.multimodal_hidden}, got shape {tuple(features.shape)}"
            )
        return self._project(self.soft_embedding_norm(features))

    def embed_hard(self, ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Token ids in ``[vocab_offset, vocab_offset + vocab_size)`` -> [..., text_hidden].

        ``check=False`` skips the range check (a host sync); use it only where the ids are already
        known to be in range, e.g. inside a compiled forward that masked them.
        """
        if check:
            if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
                raise TypeError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
            bad = ids[~self.in_vocab(ids)]
            if bad.numel():
                raise ValueError(
                    f"token id {int(bad[0])} ({bad.numel()} out of range in all) is outside this embedder's "
                    f"vocabulary [{self.vocab_offset}, {self.vocab_offset + self.vocab_size})"
                )
        return self._project(self.hard_embedding_norm(self.embedding(ids - self.vocab_offset)))
