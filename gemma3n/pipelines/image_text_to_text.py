"""The "image-text-to-text" task: chats with images (and audio), or images plus a text prompt -> generated text.

Calls and outputs follow transformers' ``ImageTextToTextPipeline``:

    pipe(text=messages)                      -> [{"input_text": messages, "generated_text": messages + [answer]}]
    pipe(text=[chat_a, chat_b])              -> [[{...}], [{...}]]
    pipe(images=image, text="Describe it.")  -> [{"input_text": "Describe it.", "generated_text": "Describe it. ..."}]
    pipe(images=[a, b], text=["...", "..."]) -> [{...}, {...}]

``return_full_text=False`` gives only the new text; for a chat ending in an assistant message, the answer continues
that message (``continue_final_message``). A plain text prompt without ``<image_soft_token>`` gets its images placed
before the text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .base import Generated, Pipeline, Prompt, chat_prompt, continue_final_message, is_chat, is_chat_batch


@dataclass
class Chat:
    """A conversation given as input, kept as the caller's list of messages."""

    messages: list[dict]


@dataclass
class TextInput:
    """A plain text prompt and its images."""

    text: str
    images: list[Any] = field(default_factory=list)


def _image_list(images: Any) -> list[Any]:
    return list(images) if isinstance(images, (list, tuple)) else [images]


class ImageTextToTextPipeline(Pipeline):
    task = "image-text-to-text"
    task_keys = frozenset({"return_full_text", "return_tensors", "continue_final_message", "skip_special_tokens"})

    def __call__(self, images: Any = None, text: Any = None, **kwargs: Any) -> list[Any]:
        settings, gen = self._settings(kwargs)
        chats = None
        if is_chat(text) or is_chat_batch(text):
            if images is not None:
                raise ValueError(
                    "images were passed beside a chat: put them inside the messages instead, e.g. "
                    "{'type': 'image', 'image': ...} in a message's content"
                )
            chats = text
        elif text is None and (is_chat(images) or is_chat_batch(images)):
            chats = images
        if chats is not None:
            if is_chat(chats):
                return self.run([Chat(chats)], settings, gen)[0]
            return self.run([Chat(c) for c in chats], settings, gen)
        if images is None and text is None:
            raise ValueError("give text (a prompt or a chat), images with a text prompt, or both")
        if text is None and _is_dict_input(images):  # {"images": ..., "text": ...} or a list of such dicts
            if isinstance(images, dict):
                return self._run_flat(_pair(images.get("images", images.get("image")), images["text"]), settings, gen)
            return [self._run_flat(_pair(d.get("images", d.get("image")), d["text"]), settings, gen) for d in images]
        return self._run_flat(_pair(images, text), settings, gen)

    def _run_flat(self, items: list[TextInput], settings: dict[str, Any], gen: dict[str, Any]) -> list[dict]:
        return [records[0] for records in self.run(items, settings, gen)]

    # ---- steps ------------------------------------------------------------------------------------------------
    def preprocess(self, item: Chat | TextInput, settings: dict[str, Any]) -> list[Prompt]:
        if isinstance(item, Chat):
            return [chat_prompt(self.processor, item.messages, continue_final_message=_continues(item, settings))]
        token = self.processor.tokenizer.image_token
        marks = item.text.count(token)
        text = item.text
        if marks == 0 and item.images:
            text = token * len(item.images) + text
        elif marks != len(item.images):
            raise ValueError(
                f"the prompt {item.text[:60]!r} has {marks} {token} placeholders for {len(item.images)} images"
            )
        return [Prompt(text, list(item.images))]

    def postprocess(self, item: Chat | TextInput, outputs: list[Generated], settings: dict[str, Any]) -> list[dict]:
        (out,) = outputs
        input_text: Any = item.messages if isinstance(item, Chat) else item.text
        if settings.get("return_tensors"):
            import torch

            return [{"input_text": input_text, "generated_token_ids": torch.tensor(out.prompt_ids + out.new_ids)}]
        skip = settings.get("skip_special_tokens", True)
        # As transformers does: decode prompt and prompt+answer the same way, then cut the prompt off the front.
        full = self.decode(out.prompt_ids + out.new_ids, skip)
        prompt = self.decode(out.prompt_ids, skip)
        start = full.find(prompt)
        answer = full[start + len(prompt) :] if 0 <= start <= 2 else full
        if not settings.get("return_full_text", True):
            return [{"input_text": input_text, "generated_text": answer}]
        if isinstance(item, TextInput):
            return [{"input_text": input_text, "generated_text": item.text + answer}]
        if _continues(item, settings):
            return [{"input_text": input_text, "generated_text": continue_final_message(item.messages, answer)}]
        answer_message = {"role": "assistant", "content": answer}
        return [{"input_text": input_text, "generated_text": list(item.messages) + [answer_message]}]

    # ---- streaming --------------------------------------------------------------------------------------------
    def stream(self, images: Any = None, text: Any = None, **kwargs: Any) -> Iterator[str]:
        """Yield the answer to one input (a chat, or images + one prompt) piece by piece as it is generated."""
        settings, gen = self._settings(kwargs)
        if is_chat(text) or (text is None and is_chat(images)):
            item: Chat | TextInput = Chat(text if text is not None else images)
        else:
            items = _pair(images, text)
            if len(items) != 1:
                raise ValueError("stream() takes one input at a time")
            item = items[0]
        (prompt,) = self.preprocess(item, settings)
        yield from self._stream_prompt(prompt, gen)


def _continues(chat: Chat, settings: dict[str, Any]) -> bool:
    """Continue the final message when asked, or by default when the chat ends with an assistant message."""
    flag = settings.get("continue_final_message")
    return chat.messages[-1].get("role") == "assistant" if flag is None else bool(flag)


def _pair(images: Any, text: Any) -> list[TextInput]:
    """Plain prompts with their images: one prompt takes all images; n prompts take n images (or image lists)."""
    if text is None:
        raise ValueError("a text prompt is needed with the images (or pass a chat as text=...)")
    if isinstance(text, str):
        return [TextInput(text, [] if images is None else _image_list(images))]
    if not isinstance(text, (list, tuple)) or not all(isinstance(t, str) for t in text):
        raise TypeError(f"text must be a string, a list of strings or a chat, got {type(text).__name__}")
    if images is None:
        return [TextInput(t) for t in text]
    groups = _image_list(images)
    if len(groups) != len(text):
        raise ValueError(f"got {len(text)} text prompts but {len(groups)} images (or image lists); pair them 1:1")
    return [TextInput(t, _image_list(g)) for t, g in zip(text, groups, strict=True)]


def _is_dict_input(value: Any) -> bool:
    def one(v: Any) -> bool:
        return isinstance(v, dict) and "text" in v and ("images" in v or "image" in v)

    return one(value) or (isinstance(value, (list, tuple)) and bool(value) and all(one(v) for v in value))
