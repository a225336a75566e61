"""The "token-classification" task (named entities, tagging): a label per token, with transformers' output shape.

    pipe("John lives in Paris")
        -> [{"entity": "B-PER", "score": 0.98, "index": 1, "word": "John", "start": 0, "end": 4}, ...]
    pipe("John lives in Paris", aggregation_strategy="simple")
        -> [{"entity_group": "PER", "score": 0.98, "word": "John", "start": 0, "end": 4}, ...]
    pipe(["a", "b"])  -> one list per text

"word" is the token as the vocabulary spells it ("▁lives") without aggregation, the decoded text of the group with
"simple"; "start" / "end" are character offsets into the input; "index" counts tokens from the BOS (0). Tokens the
tokenizer added (BOS) are skipped, and entities whose label is in ``ignore_labels`` (default ["O"]) are left out.
"simple" joins neighbouring tokens of the same entity type: a "B-" label starts a new group, an "I-" label (or a
label without prefix) continues one of the same type; the group's score is the mean of its tokens' scores.
"first", "average" and "max" first give every word one label (that of its first token, of its tokens' mean scores,
of its most confident token), then group words as "simple" groups tokens. As in the reference, a token continues a
word when its vocabulary marks continuations (a subword prefix) by its spelling, else when no space touches its
start: Gemma's vocabulary marks none, so words are guessed from spaces (a warning says so).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..processors.tokenizer import Encoding
from .forward_base import ForwardPipeline

STRATEGIES = ("none", "simple", "first", "average", "max")
WORD_STRATEGIES = ("first", "average", "max")


class TokenClassificationPipeline(ForwardPipeline):
    task = "token-classification"
    task_keys = frozenset({"aggregation_strategy", "ignore_labels"})

    def __call__(self, inputs: str | list[str], **kwargs: Any) -> list[dict] | list[list[dict]]:
        """Entities of one text (a list of dicts) or of each text in a list (a list of lists).

        aggregation_strategy: "none" (default: one entry per token), "simple" (neighbouring tokens of one entity
        joined), or "first" / "average" / "max" (one label per word, then words joined; see the module).
        ignore_labels: labels left out (default ["O"]). Also ``batch_size``, ``padding_side``, ``progress``.
        """
        settings = self._settings(kwargs)
        strategy = settings.get("aggregation_strategy") or "none"
        if not isinstance(strategy, str) or strategy.lower() not in STRATEGIES:
            raise ValueError(f"aggregation_strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        settings["aggregation_strategy"] = strategy.lower()
        if settings["aggregation_strategy"] in WORD_STRATEGIES and self._subword_prefix() is None:
            warnings.warn(
                "the tokenizer does not mark word pieces: words are guessed from spaces (as transformers does)",
                UserWarning,
                stacklevel=2,
            )
        ignore = settings.get("ignore_labels")
        settings["ignore_labels"] = ["O"] if ignore is None else list(ignore)
        if isinstance(inputs, str):
            return self.run([inputs], settings)[0]
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
            return self.run(list(inputs), settings)
        raise TypeError(f"token-classification takes a string or a non-empty list of strings, got {inputs!r:.80}")

    def preprocess(self, item: str, settings: dict[str, Any]) -> Encoding:
        return self.tokenizer.encode_with_offsets([item], max_length=self.tokenizer.model_max_length)[0]

    def postprocess(self, item: str, encoding: Encoding, logits: torch.Tensor, settings: dict[str, Any]) -> list[dict]:
        scores = torch.softmax(logits, dim=-1)  # [tokens, labels]
        best_scores, best = scores.max(dim=-1)  # [tokens] each (max picks the first of equal scores)
        tokens, token_scores, continues = [], [], []
        prefix = self._subword_prefix()
        for index, token_id in enumerate(encoding.ids):
            if encoding.special_mask[index]:
                continue
            start, end = encoding.offsets[index]
            word = self.tokenizer.id_to_token(token_id)
            if prefix is not None:
                piece = len(word) != end - start  # spelled with the continuation prefix
            else:
                piece = start > 0 and " " not in item[start - 1 : start + 1]
            if token_id == self.tokenizer.unk_token_id:
                word, piece = item[start:end], False  # the text the unknown token stands for
            tokens.append(
                {
                    "entity": self.label(int(best[index])),
                    "score": best_scores[index].item(),
                    "index": index,
                    "word": word,
                    "start": start,
                    "end": end,
                }
            )
            token_scores.append(scores[index])
            continues.append(piece)
        ignore = settings["ignore_labels"]
        strategy = settings["aggregation_strategy"]
        if strategy == "none":
            return [token for token in tokens if token["entity"] not in ignore]
        if strategy in WORD_STRATEGIES:
            tokens = self._words(tokens, token_scores, continues, strategy)
        return [group for group in self._groups(tokens) if group["entity_group"] not in ignore]

    def _subword_prefix(self) -> str | None:
        """The prefix the vocabulary spells word continuations with ("##"), None when it has none (Gemma)."""
        return getattr(self.tokenizer.backend.model, "continuing_subword_prefix", None)

    def _words(
        self, tokens: list[dict], scores: list[torch.Tensor], continues: list[bool], strategy: str
    ) -> list[dict]:
        """One entry per word (a token and the pieces continuing it), labelled by ``strategy``."""
        spans: list[list[int]] = []
        for i, piece in enumerate(continues):
            if spans and piece:
                spans[-1].append(i)
            else:
                spans.append([i])
        words = []
        for span in spans:
            if strategy == "first":
                chosen = scores[span[0]]
            elif strategy == "max":
                chosen = scores[max(span, key=lambda i: tokens[i]["score"])]  # the first of equally sure tokens
            else:
                chosen = torch.stack([scores[i] for i in span]).mean(dim=0)  # [labels]
            label = int(chosen.argmax())
            words.append(
                {
                    "entity": self.label(label),
                    "score": chosen[label].item(),
                    "word": self.tokenizer.convert_tokens_to_string([tokens[i]["word"] for i in span]),
                    "start": tokens[span[0]]["start"],
                    "end": tokens[span[-1]]["end"],
                }
            )
        return words

    def _groups(self, tokens: list[dict]) -> list[dict]:
        """Neighbouring tokens of one entity type, joined (a "B-" label always starts a new group)."""
        groups: list[list[dict]] = []
        for token in tokens:
            begins, kind = _tag(token["entity"])
            if groups and not begins and _tag(groups[-1][-1]["entity"])[1] == kind:
                groups[-1].append(token)
            else:
                groups.append([token])
        return [
            {
                "entity_group": group[0]["entity"].split("-", 1)[-1],
                "score": sum(t["score"] for t in group) / len(group),
                "word": self.tokenizer.convert_tokens_to_string([t["word"] for t in group]),
                "start": group[0]["start"],
                "end": group[-1]["end"],
            }
            for group in groups
        ]


def _tag(label: str) -> tuple[bool, str]:
    """(whether the label begins an entity, its type): "B-PER" -> (True, "PER"); "I-PER" and "PER" -> (False, "PER")."""
    if label.startswith("B-"):
        return True, label[2:]
    if label.startswith("I-"):
        return False, label[2:]
    return False, label
