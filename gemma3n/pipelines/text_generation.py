"""The "text-generation" task: a prompt or a chat -> its continuation, shaped like transformers' pipeline output.

    pipe("Once upon a time")      -> [{"generated_text": "Once upon a time ..."}]
    pipe(["a", "b"])              -> [[{"generated_text": ...}], [{"generated_text": ...}]]
    pipe(messages)                -> [{"generated_text": messages + [{"role": "assistant", "content": ...}]}]
    pipe([chat_a, chat_b])        -> [[{...}], [{...}]]

Plain prompts get BOS and no chat template; chats go through the checkpoint's chat template.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .base import Generated, Pipeline, Prompt, chat_prompt, continue_final_message, is_chat, is_chat_batch
from .image_text_to_text import Chat, _continues


class TextGenerationPipeline(Pipeline):
    task = "text-generation"
    task_keys = frozenset({"return_full_text", "return_tensors", "continue_final_message", "skip_special_tokens"})

    def __call__(self, text_inputs: Any, **kwargs: Any) -> list[Any]:
        settings, gen = self._settings(kwargs)
        if isinstance(text_inputs, str) or is_chat(text_inputs):
            return self.run([_item(text_inputs)], settings, gen)[0]
        if is_chat_batch(text_inputs) or (
            isinstance(text_inputs, (list, tuple)) and text_inputs and all(isinstance(t, str) for t in text_inputs)
        ):
            return self.run([_item(t) for t in text_inputs], settings, gen)
        raise TypeError(
            "text-generation takes a string, a chat (list of {'role', 'content'} messages) or a list of either, "
            f"got {type(text_inputs).__name__}"
        )

    def preprocess(self, item: str | Chat, settings: dict[str, Any]) -> list[Prompt]:
        if isinstance(item, Chat):
            return [chat_prompt(self.processor, item.messages, continue_final_message=_continues(item, settings))]
        return [Prompt(item)]

    def postprocess(self, item: str | Chat, outputs: list[Generated], settings: dict[str, Any]) -> list[dict]:
        (out,) = outputs
        if settings.get("return_tensors"):
            return [{"generated_token_ids": out.prompt_ids + out.new_ids}]
        answer = self.decode(out.new_ids, settings.get("skip_special_tokens", True))
        if not settings.get("return_full_text", True):
            return [{"generated_text": answer}]
        if isinstance(item, str):
            return [{"generated_text": item + answer}]
        if _continues(item, settings):
            return [{"generated_text": continue_final_message(item.messages, answer)}]
        return [{"generated_text": list(item.messages) + [{"role": "assistant", "content": answer}]}]

    def stream(self, text_input: Any, **kwargs: Any) -> Iterator[str]:
        """Yield the continuation of one prompt or chat piece by piece as it is generated."""
        settings, gen = self._settings(kwargs)
        if not (isinstance(text_input, str) or is_chat(text_input)):
            raise TypeError("stream() takes one prompt string or one chat")
        (prompt,) = self.preprocess(_item(text_input), settings)
        yield from self._stream_prompt(prompt, gen)


def _item(value: Any) -> str | Chat:
    return Chat(value) if is_chat(value) else value
