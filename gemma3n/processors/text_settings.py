"""Text settings of the processor call: how prompts are cut (truncation, max_length) and padded (padding,
pad_to_multiple_of, side), with the rules of transformers' tokenizers, applied to rows of token ids and of the
per-token values that travel with them (attention mask, token types, assistant masks)."""

from __future__ import annotations

from dataclasses import dataclass

from .tokenizer import Tokenizer

_TRUNCATE = (True, "longest_first", "only_first")
_NO_TRUNCATION = (None, False, "do_not_truncate")


@dataclass(frozen=True)
class TextSettings:
    """How prompts are cut and padded: `truncate_to` tokens (None: no cut), padded to the longest / `pad_to` /
    not at all, lengths rounded up to `multiple_of`, on `side`."""

    truncate_to: int | None
    pad: str  # "longest", "max_length" or "none"
    pad_to: int | None
    multiple_of: int | None
    side: str

    @classmethod
    def resolve(
        cls,
        padding: bool | str | None,
        truncation: bool | str | None,
        max_length: int | None,
        pad_to_multiple_of: int | None,
        padding_side: str | None,
        tokenizer: Tokenizer,
    ) -> TextSettings:
        """The reference tokenizer's rules: max_length alone (padding off or left at None) truncates; without
        max_length, truncation and padding="max_length" use the tokenizer's model_max_length, or do nothing without
        one. padding=None pads to the longest."""
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if truncation is None and max_length is not None and padding in (None, False, "do_not_pad"):
            truncation = True
        if padding in (None, True, "longest"):
            pad = "longest"
        elif padding in (False, "do_not_pad"):
            pad = "none"
        elif padding == "max_length":
            pad = "max_length"
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if truncation not in _TRUNCATE and truncation not in _NO_TRUNCATION:
            raise ValueError(
                f"truncation must be True, False, 'longest_first', 'only_first' or 'do_not_truncate', "
                f"got {truncation!r}"
            )
        limit = max_length if max_length is not None else tokenizer.model_max_length
        truncate_to = limit if truncation in _TRUNCATE else None
        if pad == "max_length" and limit is None:
            pad = "none"  # nothing to pad to, as in the reference
        if truncate_to is not None and pad != "none" and pad_to_multiple_of and truncate_to % pad_to_multiple_of:
            raise ValueError(
                f"truncation and padding are both on, but max_length {truncate_to} is not a multiple of "
                f"pad_to_multiple_of {pad_to_multiple_of}"
            )
        side = padding_side or tokenizer.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return cls(truncate_to, pad, limit if pad == "max_length" else None, pad_to_multiple_of, side)


def shifted_position(position: int, shifts: list[tuple[int, int]]) -> int:
    """A character position in a prompt -> its position after the placeholders before it were expanded."""
    return position + sum(extra for end, extra in shifts if end <= position)


def pad_rows(rows: dict[str, list[list[int]]], settings: TextSettings, pad_token_id: int) -> dict[str, list]:
    """Pad every row (input_ids with the pad id, the rest with 0) to the settings' length; longer rows stay."""
    if settings.pad == "none":
        return rows
    length = settings.pad_to if settings.pad == "max_length" else max(len(r) for r in rows["input_ids"])
    if settings.multiple_of:
        length = -(-length // settings.multiple_of) * settings.multiple_of
    out: dict[str, list] = {}
    for key, values in rows.items():
        fill = pad_token_id if key == "input_ids" else 0
        padded = []
        for row in values:
            extra = [fill] * max(length - len(row), 0)
            padded.append(extra + row if settings.side == "left" else row + extra)
        out[key] = padded
    return out
