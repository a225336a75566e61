"""The "text-classification" task: text -> labels with scores, with transformers' call forms and output shapes.

    pipe("I loved it")                     -> [{"label": "positive", "score": 0.93}]
    pipe(["I loved it", "Boring"])         -> [{"label": ...}, {"label": ...}]
    pipe("I loved it", top_k=None)         -> [{"label": "positive", ...}, {"label": "neutral", ...}, ...] (sorted)
    pipe(["a", "b"], top_k=2)              -> [[{...}, {...}], [{...}, {...}]]
    pipe({"text": "a", "text_pair": "b"})  -> {"label": ..., "score": ...}

Scores: ``function_to_apply`` "softmax", "sigmoid" or "none"; by default none for regression, sigmoid for
multi-label checkpoints or a single label, softmax otherwise (config.json ``problem_type`` / ``num_labels``), as the
reference pipeline decides.
"""

from __future__ import annotations

from typing import Any

import torch

from ..processors.tokenizer import Encoding
from .forward_base import ForwardPipeline

FUNCTIONS = ("softmax", "sigmoid", "none")
_UNSET = object()  # top_k not given: the reference's legacy shape (one best label, as a dict)


class TextClassificationPipeline(ForwardPipeline):
    task = "text-classification"
    task_keys = frozenset({"top_k", "function_to_apply"})

    def __call__(self, inputs: Any, **kwargs: Any) -> Any:
        """Classify one text, a {"text", "text_pair"} dict, or a list of either.

        top_k: the best k labels, sorted (None: all); not given: the single best label per input, in the reference's
        older shape (a dict per input, a one-element list for a single string). function_to_apply: see the module.
        Also ``batch_size``, ``padding_side`` and ``progress``.
        """
        settings = self._settings(kwargs)
        settings["function_to_apply"] = self._function(settings.get("function_to_apply"))
        top_k = settings.get("top_k", _UNSET)
        if top_k is not _UNSET and top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise ValueError(f"top_k must be an integer or None, got {top_k!r}")
        if isinstance(inputs, (str, dict)):
            result = self.run([inputs], settings)[0]
            return [result] if isinstance(inputs, str) and "top_k" not in kwargs else result
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(i, (str, dict)) for i in inputs):
            return self.run(list(inputs), settings)
        raise TypeError(
            "text-classification takes a string, a {'text': ..., 'text_pair': ...} dict or a non-empty list of them, "
            f"got {_describe(inputs)}"
        )

    def _function(self, name: Any) -> str:
        if name is None:
            return self.default_function()
        if not isinstance(name, str) or name.lower() not in FUNCTIONS:
            raise ValueError(f"function_to_apply must be one of {', '.join(FUNCTIONS)}, got {name!r}")
        return name.lower()

    def default_function(self) -> str:
        """The reference's default: none for regression, sigmoid for multi-label or one label, else softmax."""
        config = self.model.config
        if config.problem_type == "regression":
            return "none"
        if config.problem_type == "multi_label_classification" or config.num_labels == 1:
            return "sigmoid"
        return "softmax"

    def preprocess(self, item: str | dict, settings: dict[str, Any]) -> Encoding:
        if isinstance(item, dict):
            unknown = set(item) - {"text", "text_pair"}
            if unknown or not isinstance(item.get("text"), str) or not isinstance(item.get("text_pair", ""), str):
                raise ValueError(
                    "a text-classification dict input takes a 'text' string and optionally a 'text_pair' string, "
                    f"got keys {sorted(item)}"
                )
            if "text_pair" in item:
                ids = self.tokenizer.encode_pair(item["text"], item["text_pair"])
                return Encoding(ids, [(0, 0)] * len(ids), [0] * len(ids))
            item = item["text"]
        return self.tokenizer.encode_with_offsets([item])[0]

    def postprocess(self, item: Any, encoding: Encoding, logits: torch.Tensor, settings: dict[str, Any]) -> Any:
        function = settings["function_to_apply"]  # logits: [labels]
        if function == "softmax":
            scores = torch.softmax(logits, dim=-1)
        elif function == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = logits
        top_k = settings.get("top_k", _UNSET)
        if top_k is _UNSET:
            best = int(scores.argmax())
            return {"label": self.label(best), "score": scores[best].item()}
        ranked = [{"label": self.label(i), "score": s} for i, s in enumerate(scores.tolist())]
        ranked.sort(key=lambda entry: entry["score"], reverse=True)  # stable: ties keep label order
        return ranked if top_k is None else ranked[:top_k]


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "an empty list" if not value else f"a list holding {type(value[0]).__name__}"
    return type(value).__name__
