"""Gemma tokenizer: a thin wrapper around `tokenizers.Tokenizer` read from a checkpoint's tokenizer files.

The wrapper owns what the `tokenizers` backend does not: which ids are the special tokens (read from
tokenizer_config.json), whether BOS/EOS are added, and batch padding (left by default, for generation).
The same class serves Gemma 3n and the text-only Gemma / Gemma 2 checkpoints, whose vocabularies have no image or
audio tokens: a special token that the files do not name and the vocabulary lacks is simply absent (None).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as BackendTokenizer

from .files import ConfigError, read_json

NO_LENGTH_LIMIT = int(1e20)  # a model_max_length above this means "no limit" (as transformers reads it)

# Attribute name -> (tokenizer_config.json key, default token text as published for Gemma 3n).
SPECIAL_TOKENS: dict[str, tuple[str, str]] = {
    "bos_token": ("bos_token", "<bos>"),
    "eos_token": ("eos_token", "<eos>"),
    "pad_token": ("pad_token", "<pad>"),
    "unk_token": ("unk_token", "<unk>"),
    "image_token": ("image_token", "<image_soft_token>"),
    "boi_token": ("boi_token", "<start_of_image>"),
    "eoi_token": ("eoi_token", "<end_of_image>"),
    "audio_token": ("audio_token", "<audio_soft_token>"),
    "boa_token": ("boa_token", "<start_of_audio>"),
    "eoa_token": ("eoa_token", "<end_of_audio>"),
    "start_of_turn_token": ("start_of_turn_token", "<start_of_turn>"),
    "end_of_turn_token": ("end_of_turn_token", "<end_of_turn>"),
}
# Every Gemma vocabulary has these; the others may be missing (text-only checkpoints, custom vocabularies).
REQUIRED_TOKENS = frozenset({"bos_token", "eos_token", "pad_token", "unk_token"})
MEDIA_TOKENS = ("image_token", "boi_token", "eoi_token", "audio_token", "boa_token", "eoa_token")


@dataclass(frozen=True)
class Encoding:
    """One tokenized string: ids, the character [start, end) of each token in the string ((0, 0) for the BOS / EOS
    the tokenizer added) and 1 where the tokenizer added a token (BOS / EOS; not special-token text in the input)."""

    ids: list[int]
    offsets: list[tuple[int, int]]
    special_mask: list[int]


def _token_text(value: Any, key: str, source: str) -> str:
    """A special token is stored either as a string or as a serialized AddedToken ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str) or not value:
        raise ConfigError(f'{source}: "{key}" must be a token string or an object with "content", got {value!r}')
    return value


class Tokenizer:
    """Text <-> token ids for Gemma models, with the special token ids as attributes.

    Attributes such as `bos_token_id`, `eos_token_id`, `pad_token_id`, `image_token_id`, `audio_token_id`,
    `boi_token_id`, `eoi_token_id`, `boa_token_id`, `eoa_token_id`, `start_of_turn_token_id` and
    `end_of_turn_token_id` hold the ids; the same names without `_id` hold the token text. BOS, EOS, pad and unk
    must be in the vocabulary, as must every token named in `special_tokens`; a default-named image / audio / turn
    token the vocabulary lacks is None (text-only checkpoints: see `has_media_tokens`).
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        special_tokens: dict[str, str] | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        padding_side: str = "left",
        source: str = "tokenizer",
        truncation_side: str = "right",
        model_max_length: int | None = None,
    ):
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        self.backend = backend
        # Padding and truncation are done here, not by the backend, so that every caller sees the same behaviour.
        self.backend.no_padding()
        self.backend.no_truncation()
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.padding_side = padding_side
        self.truncation_side = truncation_side
        self.model_max_length = model_max_length  # None: no limit of its own (the published value is 1e30)
        named = dict(special_tokens or {})
        tokens = {name: named.get(name, default) for name, (_, default) in SPECIAL_TOKENS.items()}
        tokens.update(named)
        present: dict[str, str] = {}
        for name, text in tokens.items():
            token_id = backend.token_to_id(text)
            if token_id is None and (name in named or name in REQUIRED_TOKENS):
                raise ConfigError(f"{source}: special token {name}={text!r} is not in the tokenizer vocabulary")
            setattr(self, name, None if token_id is None else text)
            setattr(self, f"{name}_id", token_id)
            if token_id is not None:
                present[name] = text
        self.special_tokens = present  # the special tokens this vocabulary has (chat templates see them)

    # Declared for type checkers; set in __init__ from SPECIAL_TOKENS.
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    unk_token_id: int
    image_token_id: int | None
    boi_token_id: int | None
    eoi_token_id: int | None
    audio_token_id: int | None
    boa_token_id: int | None
    eoa_token_id: int | None
    start_of_turn_token_id: int | None
    end_of_turn_token_id: int | None
    bos_token: str
    eos_token: str
    pad_token: str
    unk_token: str
    image_token: str | None
    boi_token: str | None
    eoi_token: str | None
    audio_token: str | None
    boa_token: str | None
    eoa_token: str | None
    start_of_turn_token: str | None
    end_of_turn_token: str | None

    @property
    def has_media_tokens(self) -> bool:
        """Whether the vocabulary has every image and audio token (Gemma 3n's; not Gemma's or Gemma 2's)."""
        return all(getattr(self, f"{name}_id") is not None for name in MEDIA_TOKENS)

    @property
    def missing_media_tokens(self) -> list[str]:
        """The image / audio tokens (as named by default) the vocabulary lacks."""
        return [SPECIAL_TOKENS[name][1] for name in MEDIA_TOKENS if getattr(self, f"{name}_id") is None]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Read `tokenizer.json` and (if present) `tokenizer_config.json` / `special_tokens_map.json`."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file}: not found (a tokenizer.json file is required)")
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust backend raises a plain Exception on malformed files
            raise ConfigError(f"{tokenizer_file}: cannot load tokenizer ({e})") from e

        config_file = directory / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        source = config_file.name
        # Older checkpoints keep the named tokens in special_tokens_map.json, newer ones in tokenizer_config.json,
        # and transformers v5 also nests model-specific tokens under "extra_special_tokens".
        sources: list[tuple[dict, str]] = []
        map_file = directory / "special_tokens_map.json"
        if map_file.is_file():
            sources.append((read_json(map_file), map_file.name))
        extra = config.get("extra_special_tokens")
        if isinstance(extra, dict):
            sources.append((extra, f"{source} (extra_special_tokens)"))
        sources.append((config, source))
        special: dict[str, str] = {}
        for data, where in sources:  # later sources win
            for name, (key, _) in SPECIAL_TOKENS.items():
                if data.get(key) is not None:
                    special[name] = _token_text(data[key], key, where)

        add_bos = config.get("add_bos_token")
        add_eos = config.get("add_eos_token")
        for key, value in (("add_bos_token", add_bos), ("add_eos_token", add_eos)):
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f'{source}: "{key}" must be a boolean, got {value!r}')
        if add_bos is None or add_eos is None:
            # No explicit flags: follow the post-processor stored in tokenizer.json, as the reference does.
            probe = backend.encode("", add_special_tokens=True).ids
            bos_id = backend.token_to_id(special.get("bos_token", SPECIAL_TOKENS["bos_token"][1]))
            eos_id = backend.token_to_id(special.get("eos_token", SPECIAL_TOKENS["eos_token"][1]))
            add_bos = (probe[:1] == [bos_id]) if add_bos is None else add_bos
            add_eos = (len(probe) > 0 and probe[-1] == eos_id) if add_eos is None else add_eos
        sides = {}
        for key in ("padding_side", "truncation_side"):
            sides[key] = config.get(key, "left" if key == "padding_side" else "right")
            if sides[key] not in ("left", "right"):
                raise ConfigError(f'{source}: "{key}" must be "left" or "right", got {sides[key]!r}')
        model_max_length = config.get("model_max_length")
        if model_max_length is not None and (
            isinstance(model_max_length, bool) or not isinstance(model_max_length, (int, float)) or model_max_length < 1
        ):
            raise ConfigError(f'{source}: "model_max_length" must be a positive number, got {model_max_length!r}')
        if model_max_length is not None and model_max_length > NO_LENGTH_LIMIT:
            model_max_length = None  # the "no limit" placeholder (1e30) stored in published configs
        return cls(
            backend,
            special,
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            padding_side=sides["padding_side"],
            source=str(directory),
            truncation_side=sides["truncation_side"],
            model_max_length=None if model_max_length is None else int(model_max_length),
        )

    # ---- encoding -------------------------------------------------------------------------------------------

    def _with_special(self, ids: list[int]) -> list[int]:
        if self.add_bos_token:
            ids = [self.bos_token_id, *ids]
        if self.add_eos_token:
            ids = [*ids, self.eos_token_id]
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one string; special-token text inside it (e.g. `<start_of_turn>`) maps to its single id."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return self._with_special(ids) if add_special_tokens else ids

    def encode_batch(
        self, texts: Sequence[str], add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[list[int]]:
        """Token ids of each string; with `max_length`, each is cut to that many tokens (special ones included)."""
        return [ids for ids, _ in self.encode_batch_with_offsets(texts, add_special_tokens, max_length)]

    def encode_batch_with_offsets(
        self, texts: Sequence[str], add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[tuple[list[int], list[tuple[int, int]]]]:
        """(ids, character [start, end) of each token in its string) per string; added BOS / EOS get (0, 0).

        With `max_length`, the text's tokens are cut on `truncation_side` so that, with BOS / EOS, at most
        `max_length` remain (as transformers' tokenizers truncate).
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text[{i}] must be a string, got {type(t).__name__}")
        n_special = (int(self.add_bos_token) + int(self.add_eos_token)) if add_special_tokens else 0
        out = []
        for encoding in self.backend.encode_batch(list(texts), add_special_tokens=False):
            ids, offsets = list(encoding.ids), list(encoding.offsets)
            if max_length is not None and len(ids) + n_special > max_length:
                keep = max(max_length - n_special, 0)
                cut = slice(0, keep) if self.truncation_side == "right" else slice(len(ids) - keep, len(ids))
                ids, offsets = ids[cut], offsets[cut]
            if add_special_tokens:
                ids = self._with_special(ids)
                offsets = [(0, 0)] * int(self.add_bos_token) + offsets + [(0, 0)] * int(self.add_eos_token)
            out.append((ids, offsets))
        return out

    def encode_with_offsets(
        self, texts: Sequence[str], add_special_tokens: bool = True, max_length: int | None = None
    ) -> list[Encoding]:
        """:meth:`encode_batch_with_offsets` with a mask of the tokens the tokenizer added (what token
        classification skips), one :class:`Encoding` per string."""
        n_bos = int(self.add_bos_token and add_special_tokens)
        n_eos = int(self.add_eos_token and add_special_tokens)
        out = []
        for ids, offsets in self.encode_batch_with_offsets(texts, add_special_tokens, max_length):
            mask = [0] * len(ids)
            mask[:n_bos] = [1] * n_bos
            if n_eos:
                mask[-1] = 1
            out.append(Encoding(ids, offsets, mask))
        return out

    def encode_pair(self, text: str, text_pair: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of a text pair: each part with its own BOS / EOS, as Gemma tokenizers join pairs."""
        return self.encode(text, add_special_tokens) + self.encode(text_pair, add_special_tokens)

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, list]:
        """Unpadded ids and masks, for one string or a list of strings."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        batch = self.encode_batch(text, add_special_tokens)
        return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}

    def pad(
        self,
        batch: Sequence[Sequence[int]],
        padding_side: str | None = None,
        length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad sequences to `length` (default: the longest) with `pad_token_id`; returns (input_ids, attention_mask)."""
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        longest = max((len(ids) for ids in batch), default=0)
        length = longest if length is None else length
        if length < longest:
            raise ValueError(f"cannot pad to length {length}: the longest sequence has {longest} tokens")
        input_ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, ids in enumerate(batch):
            n = len(ids)
            if n == 0:
                continue
            span = slice(length - n, length) if side == "left" else slice(0, n)
            input_ids[row, span] = torch.tensor(list(ids), dtype=torch.long)
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    # ---- decoding -------------------------------------------------------------------------------------------

    @staticmethod
    def _as_id_list(ids: Any) -> list[int]:
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(f"decode expects a 1-D sequence of ids, got a tensor of shape {tuple(ids.shape)}")
            return ids.tolist()
        if hasattr(ids, "tolist"):  # numpy arrays
            ids = ids.tolist()
        if isinstance(ids, int):
            return [ids]
        return [int(i) for i in ids]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of one sequence of ids (list, 1-D tensor or array)."""
        return self.backend.decode(self._as_id_list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """Text of each row of a 2-D tensor / array or each sequence in a list."""
        if isinstance(sequences, torch.Tensor) or hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        rows = [self._as_id_list(s) for s in sequences]
        return self.backend.decode_batch(rows, skip_special_tokens=skip_special_tokens)

    # ---- vocabulary -----------------------------------------------------------------------------------------

    def convert_tokens_to_string(self, tokens: Sequence[str]) -> str:
        """Text of a list of token strings (as :meth:`id_to_token` gives them), through the tokenizer's decoder."""
        decoder = self.backend.decoder
        return decoder.decode(list(tokens)) if decoder is not None else " ".join(tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | list[int]:
        """Id of a token (or ids of a list of tokens); unknown tokens map to `unk_token_id`."""
        if isinstance(tokens, str):
            found = self.backend.token_to_id(tokens)
            return self.unk_token_id if found is None else found
        return [self.convert_tokens_to_ids(t) for t in tokens]

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def all_special_ids(self) -> list[int]:
        return sorted({getattr(self, f"{name}_id") for name in self.special_tokens})

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={self.eos_token_id}, "
            f"pad={self.pad_token_id}, padding_side={self.padding_side!r})"
        )
