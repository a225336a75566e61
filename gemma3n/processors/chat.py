"""Chat templates: find one in a checkpoint (or use the default shipped in gemma3n/templates) and render it.

Templates that come with checkpoints are untrusted code, so they run in Jinja's ImmutableSandboxedEnvironment with
the conventions chat templates are written for: `trim_blocks` / `lstrip_blocks`, the loop-controls extension, a
`raise_exception(message)` global, a `strftime_now(format)` global and a `tojson` filter that does not HTML-escape.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .files import ConfigError, read_json

DEFAULT_TEMPLATE_NAME = "chat_template.jinja"


class ChatTemplateError(ValueError):
    """The chat template rejected the conversation (e.g. roles that do not alternate) or failed to render."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(text: str) -> jinja2.Template:
    return _environment().from_string(text)


def default_template_text() -> str:
    """The Gemma 3n chat template shipped with this package."""
    return resources.files("gemma3n.templates").joinpath(DEFAULT_TEMPLATE_NAME).read_text(encoding="utf-8")


def find_template(directory: Path) -> tuple[str, str]:
    """Return (template text, where it came from) for a checkpoint directory.

    Order: chat_template.jinja, chat_template.json ({"chat_template": ...}), tokenizer_config.json["chat_template"],
    then the default shipped with gemma3n. A list of named templates picks the one named "default".
    """
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        value = read_json(path).get("chat_template")
        if value is None:
            continue
        if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
            value = named.get("default")
        if not isinstance(value, str):
            raise ConfigError(f'{path}: "chat_template" must be a template string (or a list holding "default")')
        return value, str(path)
    return default_template_text(), f"gemma3n/templates/{DEFAULT_TEMPLATE_NAME} (default)"


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Copy a conversation, turning OpenAI-style {"type": "image_url"} parts into {"type": "image", "url": ...}."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(f"message {i} must be a dict with a 'role' (and 'content'), got {message!r:.80}")
        message = dict(message)
        content = message.get("content")
        if isinstance(content, (list, tuple)):
            parts = []
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url" and "image_url" in part:
                    url = part["image_url"]
                    url = url.get("url", "") if isinstance(url, dict) else url
                    part = {"type": "image", "url": url}
                parts.append(part)
            message["content"] = parts
        out.append(message)
    return out


def chat_media(messages: Sequence[dict]) -> tuple[list[Any], list[Any]]:
    """The images and audio clips a conversation references, in the order the chat template places them.

    Image parts: ``{"type": "image", "image" | "url" | "path" | "base64": ...}``; audio parts: ``{"type": "audio",
    "audio" | "url" | "path": ...}`` (the same keys transformers reads). Values stay as given (PIL image, path, URL,
    array); the processor loads them.
    """
    images: list[Any] = []
    audio: list[Any] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        content = message.get("content")
        if not isinstance(content, (list, tuple)):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if kind == "image":
                found = [part[k] for k in ("image", "url", "path", "base64") if k in part]
                if not found:
                    raise ValueError(f"message {i}: an image part needs an 'image', 'url' or 'path' key: {part!r:.80}")
                images.extend(found)
            elif kind == "image_url" and "image_url" in part:
                url = part["image_url"]
                images.append(url.get("url") if isinstance(url, dict) else url)
            elif kind == "audio":
                found = [part[k] for k in ("audio", "url", "path") if k in part]
                if not found:
                    raise ValueError(f"message {i}: an audio part needs an 'audio', 'url' or 'path' key")
                audio.extend(found)
    return images, audio


class ChatTemplate:
    """A compiled chat template; `render` turns one conversation into prompt text."""

    def __init__(self, text: str, source: str = "chat template"):
        self.text = text
        self.source = source
        try:
            self._template = _compile(text)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{source}: invalid chat template (line {e.lineno}: {e.message})") from e

    def render(
        self,
        messages: list[dict],
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        **variables: Any,
    ) -> str:
        """Render one conversation. `variables` (bos_token, image_token, tools, ...) are visible to the template.

        With `continue_final_message`, the text ends right after the last message's content (no end-of-turn),
        so that generation continues that message.
        """
        messages = normalize_messages(messages)
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
            messages, final_text = _mark_final_message(messages)
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"{self.source}: rendering failed ({e})") from e
        if continue_final_message:
            cut = text.rfind(_CONTINUE_MARK)
            if cut < 0:
                raise ChatTemplateError(
                    f"{self.source}: continue_final_message is set but the template dropped the final message text"
                )
            text = text[:cut]
            if not text.endswith(final_text.strip()):  # the template trimmed the text; drop the trailing spaces too
                text = text.rstrip()
        return text


# A marker appended to the final message so that the rendered text can be cut right after it.
_CONTINUE_MARK = "\u2063CONTINUE\u2063"


def _mark_final_message(messages: list[dict]) -> tuple[list[dict], str]:
    if not messages:
        raise ValueError("continue_final_message is set but the conversation is empty")
    messages = copy.deepcopy(messages)
    final = messages[-1]
    content = final.get("content")
    if isinstance(content, str):
        final["content"] = content + _CONTINUE_MARK
        return messages, content
    if isinstance(content, list):
        for part in reversed(content):
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                original = part["text"]
                part["text"] = original + _CONTINUE_MARK
                return messages, original
    raise ValueError("continue_final_message is set but the final message has no text to continue")
