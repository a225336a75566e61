"""Chat templates: find one in a checkpoint (or use the default shipped in gemma3n/templates) and render it.

Templates that come with checkpoints are untrusted code, so they run in Jinja's ImmutableSandboxedEnvironment with
the conventions chat templates are written for: `trim_blocks` / `lstrip_blocks`, the loop-controls extension, a
`raise_exception(message)` global, a `strftime_now(format)` global, a `tojson` filter that does not HTML-escape and
the `{% generation %}...{% endgeneration %}` tag that marks assistant text (for assistant-token masks).

Conversations are checked before rendering: every message has a role and content, every content part has one of the
types Gemma 3n takes (text, image, audio); anything else is an error naming the message and part, never dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
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


# Render-time variable holding the (start, end) marker strings that wrap {% generation %} output, when tracked.
_GENERATION_MARKS = "__gemma3n_generation_marks"


class GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: outputs its body unchanged. When a render passes marker strings
    (see :meth:`ChatTemplate.render_with_generation_spans`), the body is wrapped in them, so that the spans of
    assistant text can be found in the rendered prompt wherever the block sits (loops, macros, set blocks)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(
            self.call_method("_wrap", [jinja2.nodes.ContextReference()]), [], [], body
        ).set_lineno(lineno)

    def _wrap(self, context: jinja2.runtime.Context, caller: Any) -> str:
        text = caller()
        marks = context.get(_GENERATION_MARKS)
        return f"{marks[0]}{text}{marks[1]}" if marks else text


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, GenerationTag]
    )
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
    """Return (template text, where it came from) for a checkpoint directory: the checkpoint's own template (see
    :func:`checkpoint_template`), else the Gemma 3n default shipped with gemma3n."""
    found = checkpoint_template(directory)
    if found is not None:
        return found
    return default_template_text(), f"gemma3n/templates/{DEFAULT_TEMPLATE_NAME} (default)"


def checkpoint_template(directory: Path) -> tuple[str, str] | None:
    """(template text, file) of the chat template a checkpoint directory holds, or None.

    Order: chat_template.jinja, chat_template.json ({"chat_template": ...}), tokenizer_config.json["chat_template"].
    A list of named templates picks the one named "default".
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
    return None


SUPPORTED_PART_TYPES = ("text", "image", "audio")  # what Gemma 3n's processor and chat template take


def _as_message_dict(message: Any, index: int) -> dict:
    """A message as a dict: dicts are copied; dataclasses and other objects with ``role`` / ``content`` attributes
    (as templates read them) become dicts of their fields / attributes."""
    if isinstance(message, dict):
        return dict(message)
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    if hasattr(message, "role") and hasattr(message, "content"):
        data = {k: v for k, v in getattr(message, "__dict__", {}).items() if not k.startswith("_")}
        return {**data, "role": message.role, "content": message.content}
    raise ValueError(
        f"message {index} must be a dict (or an object) with 'role' and 'content', got {type(message).__name__}"
    )


def _check_part(part: Any, message_index: int, part_index: int) -> dict:
    """One content part, validated; OpenAI-style {"type": "image_url"} becomes {"type": "image", "url": ...}."""
    where = f"message {message_index}, part {part_index}"
    supported = ", ".join(SUPPORTED_PART_TYPES)
    if not isinstance(part, dict):
        raise ValueError(f"{where}: a content part must be a dict with a 'type' ({supported}), got {part!r:.80}")
    kind = part.get("type")
    if kind == "image_url" and "image_url" in part:
        url = part["image_url"]
        return {"type": "image", "url": url.get("url", "") if isinstance(url, dict) else url}
    if kind is None:
        raise ValueError(f"{where} has no 'type'; supported types: {supported} (part: {part!r:.80})")
    if kind not in SUPPORTED_PART_TYPES:
        raise ValueError(f"{where} has unsupported type {kind!r}; supported types: {supported}")
    if kind == "text" and not isinstance(part.get("text"), str):
        raise ValueError(f"{where}: a text part needs a 'text' string, got {part.get('text')!r:.80}")
    return part


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """Check and copy a conversation: every message a dict with 'role' and 'content' (message objects are turned
    into dicts), content a string (or None, left to the template) or a list of parts of a supported type.

    Raises ValueError naming the message (and part) otherwise, so that no input is silently dropped.
    """
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"a conversation must be a list of messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        message = _as_message_dict(message, i)
        if "role" not in message:
            raise ValueError(f"message {i} has no 'role': {message!r:.80}")
        if "content" not in message:
            raise ValueError(f"message {i} ({message['role']!r}) has no 'content'")
        content = message["content"]
        if isinstance(content, (list, tuple)):
            message["content"] = [_check_part(part, i, j) for j, part in enumerate(content)]
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        out.append(message)
    return out


def chat_media(messages: Sequence[dict]) -> tuple[list[Any], list[Any]]:
    """The images and audio clips of a conversation (checked by :func:`normalize_messages`), in template order.

    Image parts: ``{"type": "image", "image" | "url" | "path" | "base64": ...}``; audio parts: ``{"type": "audio",
    "audio" | "url" | "path": ...}`` (the same keys transformers reads). Values stay as given (PIL image, path, URL,
    array); the processor loads them.
    """
    images: list[Any] = []
    audio: list[Any] = []
    for i, message in enumerate(normalize_messages(messages)):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part["type"]
            if kind == "image":
                found = [part[k] for k in ("image", "url", "path", "base64") if k in part]
                if not found:
                    raise ValueError(
                        f"message {i}, part {j}: an image part needs an 'image', 'url', 'path' or 'base64' key"
                    )
                images.extend(found)
            elif kind == "audio":
                found = [part[k] for k in ("audio", "url", "path") if k in part]
                if not found:
                    raise ValueError(f"message {i}, part {j}: an audio part needs an 'audio', 'url' or 'path' key")
                audio.extend(found)
    return images, audio


def _check_tools_and_documents(tools: Any, documents: Any) -> None:
    if tools is not None:
        if not isinstance(tools, (list, tuple)):
            raise TypeError(f"tools must be a list of JSON-schema dicts, got {type(tools).__name__}")
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                raise TypeError(f"tools[{i}] must be a JSON-schema dict, got {type(tool).__name__}")
    if documents is not None:
        if not isinstance(documents, (list, tuple)):
            raise TypeError(f"documents must be a list of dicts, got {type(documents).__name__}")
        for i, document in enumerate(documents):
            if not isinstance(document, dict):
                raise TypeError(
                    f"documents[{i}] must be a dict (e.g. 'title' and 'text'), got {type(document).__name__}"
                )


class ChatTemplate:
    """A compiled chat template; `render` turns one conversation into prompt text."""

    def __init__(self, text: str, source: str = "chat template"):
        self.text = text
        self.source = source
        try:
            self._template = _compile(text)
        except jinja2.TemplateSyntaxError as e:
            raise ChatTemplateError(f"{source}: invalid chat template (line {e.lineno}: {e.message})") from e

    @property
    def variables(self) -> frozenset[str]:
        """The names the template reads from outside (messages, add_generation_prompt, tools, custom ones, ...)."""
        return _template_variables(self.text)

    @property
    def has_generation_tag(self) -> bool:
        return _has_generation_tag(self.text)

    def render(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **variables: Any,
    ) -> str:
        """Render one conversation. `variables` (bos_token, image_token, custom ones, ...) are visible to the
        template, as are `tools` and `documents` (None when not given, as in the reference).

        With `continue_final_message`, the text ends right after the last message's content (no end-of-turn),
        so that generation continues that message.
        """
        text, _ = self._render(
            messages, add_generation_prompt, continue_final_message, tools, documents, None, variables
        )
        return text

    def render_with_generation_spans(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **variables: Any,
    ) -> tuple[str, list[tuple[int, int]]]:
        """Render one conversation and return the [start, end) character spans of the text the template wrapped in
        ``{% generation %}`` blocks (the assistant's words)."""
        token = uuid.uuid4().hex
        marks = (f"\x00<gen:{token}>", f"\x00</gen:{token}>")
        text, _ = self._render(messages, add_generation_prompt, False, tools, documents, marks, variables)
        spans: list[tuple[int, int]] = []
        pieces: list[str] = []
        length = 0
        rest = text
        while True:
            start = rest.find(marks[0])
            if start < 0:
                break
            end = rest.find(marks[1], start)
            if end < 0:  # cannot happen: every block writes both marks
                raise ChatTemplateError(f"{self.source}: unbalanced generation block")
            before, inside = rest[:start], rest[start + len(marks[0]) : end]
            pieces.append(before)
            length += len(before)
            spans.append((length, length + len(inside)))
            pieces.append(inside)
            length += len(inside)
            rest = rest[end + len(marks[1]) :]
        pieces.append(rest)
        clean = "".join(pieces)
        if token in clean.lower():  # the template changed a generation block's text after the fact (e.g. | upper)
            raise ChatTemplateError(f"{self.source}: a {{% generation %}} block's output was altered by the template")
        return clean, spans

    def _render(
        self,
        messages: Sequence[Any],
        add_generation_prompt: bool,
        continue_final_message: bool,
        tools: Any,
        documents: Any,
        generation_marks: tuple[str, str] | None,
        variables: dict[str, Any],
    ) -> tuple[str, str | None]:
        messages = normalize_messages(messages)
        _check_tools_and_documents(tools, documents)
        final_text = None
        if continue_final_message:
            if add_generation_prompt:
                raise ValueError("continue_final_message and add_generation_prompt cannot both be set")
            messages, final_text = _mark_final_message(messages)
        context = {**variables, "tools": tools, "documents": documents}
        if generation_marks is not None:
            context[_GENERATION_MARKS] = generation_marks
        try:
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
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
        return text, final_text


@lru_cache(maxsize=16)
def _template_variables(text: str) -> frozenset[str]:
    return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(text)))


@lru_cache(maxsize=16)
def _has_generation_tag(text: str) -> bool:
    """Whether the template has a ``{% generation %}`` block (its first name after a block start)."""
    kinds = [(kind, value) for _, kind, value in _environment().lex(text) if kind != "whitespace"]
    pairs = zip(kinds[:-1], kinds[1:], strict=True)
    return any(kind == "block_begin" and nxt == ("name", "generation") for (kind, _), nxt in pairs)


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
