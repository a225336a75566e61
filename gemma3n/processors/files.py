"""Reading processor settings from checkpoint JSON files with clear, typed errors.

Every getter takes the parsed JSON object, the key, a default and a `source` string naming the file (and section)
the object came from, so that a bad value produces an error such as
``preprocessor_config.json: "do_resize" must be a boolean, got "yes"``.
A key that is absent or null takes the default (the reference libraries treat null as "use the class default").
Unknown keys are never looked at, so they are ignored without error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A processor file is unreadable or holds a value of the wrong type or an impossible value."""


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; errors name the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read file ({e.strerror or e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _fail(source: str, key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f'{source}: "{key}" must be {expected}, got {value!r}')


def get_bool(data: dict, key: str, default: bool, source: str) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _fail(source, key, "a boolean", value)
    return value


def get_int(data: dict, key: str, default: int, source: str, minimum: int | None = None) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, key, "an integer", value)
    if minimum is not None and value < minimum:
        raise _fail(source, key, f"an integer >= {minimum}", value)
    return value


def get_float(
    data: dict,
    key: str,
    default: float,
    source: str,
    minimum: float | None = None,
    positive: bool = False,
) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _fail(source, key, "a finite number", value)
    if positive and value <= 0:
        raise _fail(source, key, "a number > 0", value)
    if minimum is not None and value < minimum:
        raise _fail(source, key, f"a number >= {minimum}", value)
    return float(value)


def get_str(data: dict, key: str, default: str | None, source: str, choices: Sequence[str] | None = None) -> str | None:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _fail(source, key, "a string", value)
    if choices is not None and value not in choices:
        raise _fail(source, key, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


def get_float_list(
    data: dict,
    key: str,
    default: tuple[float, ...] | None,
    source: str,
    length: int | None = None,
    positive: bool = False,
) -> tuple[float, ...] | None:
    """A list of finite numbers (a single number is broadcast to `length` when one is given)."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool) and length is not None:
        value = [value] * length
    if not isinstance(value, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
    ):
        raise _fail(source, key, "a list of finite numbers", value)
    if length is not None and len(value) != length:
        raise _fail(source, key, f"a list of {length} numbers", value)
    if positive and any(v <= 0 for v in value):
        raise _fail(source, key, "a list of numbers > 0", value)
    return tuple(float(v) for v in value)


def get_section(data: dict, key: str, source: str) -> dict | None:
    """A nested JSON object (e.g. the `image_processor` section of processor_config.json), or None if absent."""
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _fail(source, key, "a JSON object", value)
    return value
