"""What every model loaded from a checkpoint offers, whatever its family: path, device, dtype and processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class LoadedModel(nn.Module):
    """Base of :class:`gemma3n.Gemma3n` and the Gemma / Gemma 2 heads; ``token_embedding`` names the tensor whose
    device and dtype are the model's."""

    def __init__(self):
        super().__init__()
        self.path: Path | None = None
        self._processor = None

    @property
    def token_embedding(self) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return self.token_embedding.device

    @property
    def dtype(self) -> torch.dtype:
        return self.token_embedding.dtype

    @property
    def processor(self) -> Any:
        """The checkpoint's processor (tokenizer, chat template and, for Gemma 3n, image and audio preprocessing),
        loaded on first use."""
        if self._processor is None:
            if self.path is None:
                raise ValueError("this model was not loaded from a checkpoint directory; build a Processor yourself")
            from .processors import Processor

            self._processor = Processor.from_pretrained(self.path)
        return self._processor
