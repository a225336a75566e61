"""What the one-forward-pass tasks (text and token classification) share: settings, batching, padding, progress.

A task turns each input into an :class:`~gemma3n.processors.tokenizer.Encoding` (``preprocess``); the base pads the
encodings of ``batch_size`` inputs into one batch (on the tokenizer's side, or ``padding_side``), runs the model once
and hands each input its own logits back without the padding (``forward``); the task turns them into the
user-facing dicts (``postprocess``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from ..processors.tokenizer import Encoding
from .base import _check_batch_size, check_model_task, progress_bar

COMMON_KEYS = frozenset({"batch_size", "progress", "padding_side"})


class ForwardPipeline:
    """Base of the classification pipelines. Subclasses set ``task`` and ``task_keys`` and implement ``__call__``,
    ``preprocess`` and ``postprocess``. Settings are given at construction (defaults) or per call."""

    task: ClassVar[str] = ""
    task_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, model: Any, processor: Any = None, *, batch_size: int = 1, progress: bool | None = None, **defaults: Any
    ):
        check_model_task(model, self.task)
        self.model = model
        self._processor = processor
        self.batch_size = _check_batch_size(batch_size)
        self.progress = progress
        self._defaults = self._check_keys(defaults)

    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._processor = self.model.processor
        return self._processor

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _check_keys(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        for key in kwargs:
            if key not in self.task_keys and key not in COMMON_KEYS:
                known = ", ".join(sorted(self.task_keys | COMMON_KEYS))
                raise TypeError(f"{self.task} pipeline got an unknown argument {key!r}; known: {known}")
        return kwargs

    def _settings(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Per-call settings over the construction defaults."""
        settings = {"batch_size": self.batch_size, "progress": self.progress, **self._defaults}
        settings.update(self._check_keys(kwargs))
        _check_batch_size(settings["batch_size"])
        side = settings.get("padding_side")
        if side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return settings

    # ---- the three steps --------------------------------------------------------------------------------------
    def preprocess(self, item: Any, settings: dict[str, Any]) -> Encoding:
        raise NotImplementedError

    def postprocess(self, item: Any, encoding: Encoding, logits: torch.Tensor, settings: dict[str, Any]) -> Any:
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, encodings: Sequence[Encoding], padding_side: str | None = None) -> list[torch.Tensor]:
        """One model call for a padded batch; per input its float32 CPU logits: [labels] for a sequence
        classifier, [tokens, labels] for a token classifier (padding positions removed)."""
        input_ids, attention_mask = self.tokenizer.pad([e.ids for e in encodings], padding_side=padding_side)
        logits = self.model(input_ids.to(self.device), attention_mask=attention_mask.to(self.device)).logits
        logits = logits.float().cpu()  # [B, labels] or [B, T, labels]
        if logits.dim() == 2:
            return list(logits)
        keep = attention_mask.bool()
        return [logits[row][keep[row]] for row in range(len(encodings))]  # [tokens, labels] each

    def run(self, items: Sequence[Any], settings: dict[str, Any]) -> list[Any]:
        """Results for ``items`` in order, ``batch_size`` inputs per model call."""
        batch_size = settings["batch_size"]
        results: list[Any] = []
        with progress_bar(self.task, len(items), batch_size, settings["progress"]) as bar:
            for start in range(0, len(items), batch_size):
                batch = items[start : start + batch_size]
                encodings = [self.preprocess(item, settings) for item in batch]
                logits = self.forward(encodings, settings.get("padding_side"))
                for item, encoding, row in zip(batch, encodings, logits, strict=True):
                    results.append(self.postprocess(item, encoding, row, settings))
                bar.update(len(batch))
        return results

    def label(self, index: int) -> str:
        """The name of label ``index`` (config ``id2label``; ``LABEL_{index}`` when it has none)."""
        return self.model.config.id2label.get(index, f"LABEL_{index}")

    def __repr__(self) -> str:
        path = getattr(self.model, "path", None)
        return f"{type(self).__name__}(task={self.task!r}, model={str(path) if path else 'in memory'!r})"
