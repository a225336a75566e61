"""The "image-to-text" task (captioning): images -> ``[{"generated_text": caption}]`` like transformers' pipeline.

    pipe(image)                        -> [{"generated_text": "..."}]
    pipe([a, b], prompt="What is it?") -> [[{"generated_text": ...}], [{"generated_text": ...}]]

Each image is asked ``prompt`` (default: a request for a one-sentence caption) in a one-turn chat; the caption is the
answer with surrounding whitespace removed.
"""

from __future__ import annotations

from typing import Any

from .base import Generated, Pipeline, Prompt, chat_prompt

DEFAULT_PROMPT = "Write a one-sentence caption for this image."


class ImageToTextPipeline(Pipeline):
    task = "image-to-text"
    task_keys = frozenset({"prompt"})

    def __call__(self, images: Any, **kwargs: Any) -> list[Any]:
        settings, gen = self._settings(kwargs)
        if isinstance(images, (list, tuple)):
            return self.run(list(images), settings, gen)
        return self.run([images], settings, gen)[0]

    def preprocess(self, image: Any, settings: dict[str, Any]) -> list[Prompt]:
        if image is None:
            raise ValueError("image-to-text got None instead of an image")
        prompt = settings.get("prompt") or DEFAULT_PROMPT
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": prompt}]}]
        return [chat_prompt(self.processor, messages)]

    def postprocess(self, image: Any, outputs: list[Generated], settings: dict[str, Any]) -> list[dict]:
        (out,) = outputs
        return [{"generated_text": self.decode(out.new_ids).strip()}]
