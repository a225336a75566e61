"""Task pipelines with transformers' call signatures and output keys, so scripts port by changing one import.

    import gemma3n
    pipe = gemma3n.pipeline("image-text-to-text", model="path/to/gemma-3n-E2B-it", device="cuda", dtype="bfloat16")
    pipe(text=[{"role": "user", "content": [{"type": "image", "url": "cat.jpg"}, {"type": "text", "text": "Hi"}]}])

Tasks: "image-text-to-text", "automatic-speech-recognition", "text-generation", "image-to-text" (Gemma 3n);
"text-generation" on Gemma / Gemma 2 causal LMs; "text-classification" and "token-classification" on Gemma / Gemma 2
sequence and token classifiers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .automatic_speech_recognition import AutomaticSpeechRecognitionPipeline
from .base import Pipeline, check_model_task
from .checkpoints import ModelNotFoundError, resolve_checkpoint, resolve_model_name
from .forward_base import ForwardPipeline
from .image_text_to_text import ImageTextToTextPipeline
from .image_to_text import ImageToTextPipeline
from .text_classification import TextClassificationPipeline
from .text_generation import TextGenerationPipeline
from .token_classification import TokenClassificationPipeline

TASKS: dict[str, type[Pipeline] | type[ForwardPipeline]] = {
    "image-text-to-text": ImageTextToTextPipeline,
    "automatic-speech-recognition": AutomaticSpeechRecognitionPipeline,
    "text-generation": TextGenerationPipeline,
    "image-to-text": ImageToTextPipeline,
    "text-classification": TextClassificationPipeline,
    "token-classification": TokenClassificationPipeline,
}
ALIASES = {
    "asr": "automatic-speech-recognition",
    "captioning": "image-to-text",
    "sentiment-analysis": "text-classification",
    "ner": "token-classification",
}
# Tasks that use only the text decoder (a Gemma 3n checkpoint loads without its vision and audio towers).
TEXT_ONLY_TASKS = frozenset({"text-generation", "text-classification", "token-classification"})


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pipeline(
    task: str,
    model: Any = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int = 1,
    processor: Any = None,
    progress: bool | None = None,
    quantize: str | None = None,
    **defaults: Any,
) -> Pipeline | ForwardPipeline:
    """A ready-to-call pipeline for ``task``.

    model: a checkpoint directory, a hub id (via huggingface_hub's cache), ``"tiny-random"``, or an already loaded
        model (moved to ``device`` / ``dtype`` when those are given): :class:`gemma3n.Gemma3n` for every generation
        task, a Gemma / Gemma 2 causal LM for "text-generation", a sequence / token classifier for
        "text-classification" / "token-classification". A model whose head does not fit the task is an error.
    device: default CUDA when available, else CPU. dtype: default the checkpoint's own (bfloat16 as published).
    batch_size: prompts generated together in one left-padded batch (texts classified together, padded on the
        tokenizer's side or ``padding_side``).
    quantize: "int8" or "int4" loads the text decoder with weight-only quantized linear layers (CPU or CUDA; a
        checkpoint path or hub id only, not an already loaded model).
    defaults: generation settings (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``,
        ``stop_strings``, ``seed``, ``generate_kwargs={...}``) and task settings (``return_full_text``, ``prompt``,
        ``instruction``; ``top_k`` / ``function_to_apply`` for text classification, ``aggregation_strategy`` /
        ``ignore_labels`` for token classification, ...) used by every call unless the call overrides them.

    Every call also takes ``batch_size``, ``progress`` and ``on_batch``: a callable given the :class:`Prompt` s of
    each generated batch (their ``meta`` says which part of the input they cover, e.g. an audio window's span).
    """
    name = ALIASES.get(task, task)
    if name not in TASKS:
        raise ValueError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if model is None:
        raise ValueError(f"pipeline({task!r}) needs model=: a checkpoint directory, a hub id or 'tiny-random'")
    if isinstance(model, (str, Path)):
        from ..model import load  # resolves the name (gemma3n.model_names), as every entry point does

        model = load(
            model,
            device=device or default_device(),
            dtype=dtype,
            text_only=name in TEXT_ONLY_TASKS,
            quantize=quantize,
        )
        check_model_task(model, name)  # before moving on: the error names the checkpoint and the task
    elif isinstance(model, torch.nn.Module):
        if quantize is not None:
            raise ValueError("quantize= applies when loading; pass a checkpoint path, or load(path, quantize=...)")
        if device is not None or dtype is not None:
            from ..devices import resolve_device, resolve_dtype

            model = model.to(device=None if device is None else resolve_device(device), dtype=resolve_dtype(dtype))
    else:
        raise TypeError(f"model must be a path, a hub id or a loaded gemma3n model, got {type(model).__name__}")
    return TASKS[name](model, processor, batch_size=batch_size, progress=progress, **defaults)


__all__ = [
    "AutomaticSpeechRecognitionPipeline",
    "ForwardPipeline",
    "ImageTextToTextPipeline",
    "ImageToTextPipeline",
    "ModelNotFoundError",
    "Pipeline",
    "TASKS",
    "TextClassificationPipeline",
    "TextGenerationPipeline",
    "TokenClassificationPipeline",
    "pipeline",
    "resolve_checkpoint",
    "resolve_model_name",
]
