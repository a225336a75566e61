"""What every task pipeline shares: generation settings, batching, device placement and progress.

A task turns each input into one or more :class:`Prompt` s (``preprocess``), the base runs those prompts through the
processor and ``model.generate`` in real left-padded batches of ``batch_size`` (``forward``), and the task turns the
generated tokens of each input back into the user-facing result (``postprocess``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch

from ..compile_policy import AUTO, check_compile_option, planned_decode_steps, resolve_compile
from ..generation import GenerationConfig, stream_generate
from ..processors.chat import chat_media
from ..text_model.packed_weights import pack_if_pays
from .towers import compile_towers

# Keywords that go to generation rather than to the task (GenerationConfig fields and generate()'s extras).
GENERATION_KEYS = frozenset(
    {f.name for f in fields(GenerationConfig)} | {"eos_token_id", "seed", "generator", "compile"}
)
# Keywords every pipeline call accepts besides its task's own.
COMMON_KEYS = frozenset({"batch_size", "progress", "on_batch", "generate_kwargs", "stop_sequence"})


@dataclass
class Prompt:
    """One generation request: prompt text (one placeholder per image / audio clip) and the media, in order."""

    text: str
    images: list[Any] = field(default_factory=list)
    audio: list[Any] = field(default_factory=list)
    meta: Any = None  # whatever the task needs back in postprocess (e.g. a window's time span)


@dataclass
class Generated:
    """The tokens of one prompt after generation: the prompt (padding removed) and the new tokens (up to the end id)."""

    prompt: Prompt
    prompt_ids: list[int]
    new_ids: list[int]
    finished: bool  # an end id was produced
    limit_reached: bool  # generation stopped at max_new_tokens (the text may be cut short)


def is_chat(value: Any) -> bool:
    """A conversation: a list of message dicts (``{"role": ..., "content": ...}``)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def is_chat_batch(value: Any) -> bool:
    """A list of conversations."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(is_chat(v) for v in value)


def chat_prompt(
    processor: Any, messages: Sequence[dict], *, continue_final_message: bool = False, meta: Any = None
) -> Prompt:
    """Render a conversation with the chat template (generation prompt added unless continuing the last message)."""
    text = processor.apply_chat_template(
        list(messages),
        add_generation_prompt=not continue_final_message,
        continue_final_message=continue_final_message,
        tokenize=False,
    )
    images, audio = chat_media(messages)
    return Prompt(text, images, audio, meta)


def continue_final_message(messages: Sequence[dict], answer: str) -> list[dict]:
    """The conversation with ``answer`` appended to its last message (to its final text part for content lists)."""
    messages = list(messages)
    last = dict(messages[-1])
    content = last.get("content")
    if isinstance(content, str):
        last["content"] = content + answer
    else:
        final_part = dict(content[-1])
        final_part["text"] = final_part.get("text", "") + answer
        last["content"] = list(content[:-1]) + [final_part]
    return messages[:-1] + [last]


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Pipeline:
    """Base of the task pipelines. Subclasses set ``task`` and ``task_keys`` and implement ``__call__``,
    ``preprocess`` and ``postprocess``; generation settings are accepted at construction and on every call, as
    keywords (``max_new_tokens=32``) or as ``generate_kwargs={...}``."""

    task: ClassVar[str] = ""
    task_keys: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        batch_size: int = 1,
        progress: bool | None = None,
        **defaults: Any,
    ):
        check_model_task(model, self.task)
        self.model = model
        self._processor = processor
        self.batch_size = _check_batch_size(batch_size)
        self.progress = progress
        self._task_defaults, gen = self._split_kwargs(defaults)
        self.generation_config = self._base_generation_config().updated(**_config_part(gen))
        self._generate_defaults = {k: v for k, v in gen.items() if k in ("seed", "generator", "compile")}

    # ---- settings -----------------------------------------------------------------------------------------------
    @property
    def processor(self) -> Any:
        if self._processor is None:
            self._processor = self.model.processor
        return self._processor

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _base_generation_config(self) -> GenerationConfig:
        config = self.model.config
        eos = list(config.text.eos_token_ids)
        top_eos = config.extra.get("eos_token_id")  # the published top level also lists <end_of_turn> (106)
        for i in [top_eos] if isinstance(top_eos, int) else list(top_eos or []):
            if i not in eos:
                eos.append(i)
        return GenerationConfig.from_checkpoint(getattr(self.model, "path", None), eos, config.text.pad_token_id)

    def _split_kwargs(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Split call keywords into (task settings, generation settings); unknown names raise TypeError."""
        kwargs = dict(kwargs)
        gen = dict(kwargs.pop("generate_kwargs", None) or {})
        for key in ("tokenizer", "streamer", "return_dict_in_generate"):
            gen.pop(key, None)  # handled by the pipeline itself
        stop = kwargs.pop("stop_sequence", None)
        if stop is not None:
            gen["stop_strings"] = [stop] if isinstance(stop, str) else list(stop)
        task: dict[str, Any] = {}
        for key, value in kwargs.items():
            if key in GENERATION_KEYS:
                if key in gen:
                    raise ValueError(f"{key!r} is given twice, once in generate_kwargs and once as a keyword")
                gen[key] = value
            elif key in self.task_keys or key in ("batch_size", "progress", "on_batch"):
                task[key] = value
            else:
                known = sorted(self.task_keys | GENERATION_KEYS | COMMON_KEYS)
                raise TypeError(f"{self.task} pipeline got an unknown argument {key!r}; known: {', '.join(known)}")
        for key in gen:
            if key not in GENERATION_KEYS:
                known = ", ".join(sorted(GENERATION_KEYS))
                raise TypeError(f"unknown generation setting {key!r} in generate_kwargs; known: {known}")
        return task, gen

    def _settings(self, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """Per-call settings merged over the construction defaults: (task settings, generation settings)."""
        task, gen = self._split_kwargs(kwargs)
        merged = {**self._task_defaults, **task}
        _check_batch_size(merged.get("batch_size", self.batch_size))
        return merged, {**self._generate_defaults, **gen}

    # ---- the three steps --------------------------------------------------------------------------------------
    def preprocess(self, item: Any, settings: dict[str, Any]) -> list[Prompt]:
        raise NotImplementedError

    def postprocess(self, item: Any, outputs: list[Generated], settings: dict[str, Any]) -> Any:
        raise NotImplementedError

    def _generate_arguments(self, inputs: dict[str, Any], config: GenerationConfig, gen: dict[str, Any]) -> dict:
        """Keyword arguments for generate / stream_generate shared by batched and streamed runs."""
        return dict(
            attention_mask=inputs.get("attention_mask"),
            pixel_values=inputs.get("pixel_values"),
            input_features=inputs.get("input_features"),
            input_features_mask=inputs.get("input_features_mask"),
            generation_config=config,
            seed=gen.get("seed"),
            generator=gen.get("generator"),
            tokenizer=self.processor,
            compile=bool(gen["compile"]),
        )

    def forward(self, prompts: Sequence[Prompt], gen: dict[str, Any], batch_size: int | None = None) -> list[Generated]:
        """Generate for a batch of prompts at once: one processor call (left padding) and one ``generate``.

        With ``gen["compile"]`` True the towers the batch uses are compiled too, for ``batch_size`` images or clips at
        a time (default: this batch's prompt count). Compiled (True, or ``"decode"``: the decode steps only), a smaller
        batch (the last of a job) is filled up to ``batch_size`` with copies of its last prompt, whose outputs are
        dropped: compiled towers and decode steps see the batch size they were compiled for instead of compiling
        again (minutes per shape at E2B). ``"auto"`` (the default) is decided here for this batch alone; a pipeline
        call decides it once for its whole job.
        """
        real = len(prompts)
        gen = self._decided_compile(gen, real, batch_size or real)
        if gen["compile"] and batch_size is not None and real < batch_size:
            prompts = list(prompts) + [prompts[-1]] * (batch_size - real)
        inputs = self.model_inputs(prompts)
        if gen["compile"] is True:
            compile_towers(self.model, inputs, batch_size or real)
        input_ids = inputs["input_ids"]
        config = self.generation_config.updated(**_config_part(gen))
        sequences = self.model.generate(
            input_ids,
            **self._generate_arguments(inputs, config, gen),
        )
        mask = inputs["attention_mask"].bool().cpu()
        new = sequences[:, input_ids.shape[1] :].cpu()
        end_ids = set(config.eos_token_ids)
        results = []
        for row in range(real):
            tokens = new[row].tolist()
            ends = [i for i, t in enumerate(tokens) if t in end_ids]
            finished = bool(ends)
            if finished:
                tokens = tokens[: ends[0] + 1]
            # A row stopped by a stop string is padded while the others go on: that is not the limit.
            limit_reached = not finished and len(tokens) >= config.max_new_tokens and tokens[-1] != config.pad_token_id
            results.append(Generated(prompts[row], input_ids[row][mask[row]].tolist(), tokens, finished, limit_reached))
        return results

    def model_inputs(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Processor outputs for a batch of prompts, on the model's device (floating tensors in its dtype)."""
        images = [image for p in prompts for image in p.images]
        audio = [clip for p in prompts for clip in p.audio]
        bos = self.processor.tokenizer.bos_token
        # Each prompt carries its own BOS (chat templates write it): never add a second one.
        texts = [p.text if p.text.startswith(bos) else bos + p.text for p in prompts]
        inputs = self.processor(
            text=texts,
            images=images or None,
            audio=audio or None,
            add_special_tokens=False,
            padding=True,
            return_tensors="pt",
        )
        return inputs.to(self.device, self.model.dtype)

    # ---- driving ----------------------------------------------------------------------------------------------
    def run(self, items: Sequence[Any], settings: dict[str, Any], gen: dict[str, Any]) -> list[Any]:
        """Results for ``items`` in order (preprocess -> batched forward -> postprocess)."""
        return [result for _, result in self.iter_results(items, settings, gen)]

    def iter_results(
        self, items: Iterable[Any], settings: dict[str, Any], gen: dict[str, Any]
    ) -> Iterator[tuple[int, Any]]:
        """Yield ``(index, result)`` per input, in order, as soon as all its prompts are generated.

        Prompts are collected across inputs into batches of ``batch_size`` (an input can give several prompts, e.g.
        the windows of a long recording), so the model always sees full batches. ``settings["on_batch"]``, when
        given, is called with the prompts of each generated batch (e.g. to advance a progress bar by the audio
        their windows cover, whose span is in each prompt's ``meta``).
        """
        batch_size = settings.get("batch_size", self.batch_size)
        on_batch = settings.get("on_batch")
        total = len(items) if isinstance(items, Sized) else None
        gen = self._decided_compile(gen, total or 1, batch_size)
        with self._progress_bar(total, batch_size, settings.get("progress", self.progress)) as bar:
            pending: list[tuple[int, Prompt]] = []
            waiting: dict[int, tuple[Any, int]] = {}  # index -> (item, number of prompts)
            outputs: dict[int, list[Generated]] = {}
            next_index = 0

            def finished_items() -> Iterator[tuple[int, Any]]:
                nonlocal next_index
                while next_index in waiting and len(outputs.get(next_index, [])) == waiting[next_index][1]:
                    item, _ = waiting.pop(next_index)
                    result = self.postprocess(item, outputs.pop(next_index, []), settings)
                    bar.update(1)
                    yield next_index, result
                    next_index += 1

            for index, item in enumerate(items):
                prompts = self.preprocess(item, settings)
                waiting[index] = (item, len(prompts))
                pending.extend((index, p) for p in prompts)
                while len(pending) >= batch_size:
                    batch, pending = pending[:batch_size], pending[batch_size:]
                    self._run_batch(batch, gen, outputs, on_batch, batch_size)
                    yield from finished_items()
            if pending:
                self._run_batch(pending, gen, outputs, on_batch, batch_size)
            yield from finished_items()

    def _run_batch(
        self,
        batch: list[tuple[int, Prompt]],
        gen: dict[str, Any],
        outputs: dict,
        on_batch: Callable[[list[Prompt]], None] | None = None,
        batch_size: int | None = None,
    ) -> None:
        results = self.forward([p for _, p in batch], gen, batch_size)
        for (index, _), result in zip(batch, results, strict=True):
            outputs.setdefault(index, []).append(result)
        if on_batch is not None:
            on_batch([p for _, p in batch])

    def _decided_compile(self, gen: dict[str, Any], prompts: int, batch_size: int) -> dict[str, Any]:
        """``gen`` with ``"compile"`` decided for a job of ``prompts`` prompts: True (decode steps and towers),
        ``"decode"`` (the decode steps only) or False; ``"auto"`` (the default) is ``"decode"`` when the job's
        planned decode steps pay for the compile (:mod:`gemma3n.compile_policy`), else False."""
        value = gen.get("compile", AUTO)
        max_new_tokens = self.generation_config.updated(**_config_part(gen)).max_new_tokens
        steps = planned_decode_steps(prompts, batch_size, max_new_tokens)
        if value == AUTO:
            value = resolve_compile(self.model, AUTO, steps)
        value = check_compile_option(value)
        if self.device.type == "cpu":  # the job's steps decide the weight layout too (packed_weights)
            pack_if_pays(self.model, min(batch_size, prompts), steps, compiled=bool(value))
        return {**gen, "compile": value}

    def _progress_bar(self, total: int | None, batch_size: int, progress: bool | None) -> Any:
        return progress_bar(self.task, total, batch_size, progress)

    # ---- streaming ----------------------------------------------------------------------------------------------
    def _stream_prompt(self, prompt: Prompt, gen: dict[str, Any]) -> Iterator[str]:
        """Text pieces of the answer to one prompt, as they are generated."""
        inputs = self.model_inputs([prompt])
        gen = self._decided_compile(gen, 1, 1)
        if gen["compile"] is True:
            compile_towers(self.model, inputs, 1)
        config = self.generation_config.updated(**_config_part(gen))
        yield from stream_generate(
            self.model,
            inputs["input_ids"],
            **self._generate_arguments(inputs, config, gen),
        )

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.processor.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        path = getattr(self.model, "path", None)
        return f"{type(self).__name__}(task={self.task!r}, model={str(path) if path else 'in memory'!r})"


def progress_bar(task: str, total: int | None, batch_size: int, progress: bool | None) -> Any:
    """A tqdm bar over inputs on stderr; by default shown on a terminal when there is more than one batch."""
    from tqdm.auto import tqdm

    show = progress if progress is not None else (_stderr_is_tty() and (total is None or total > batch_size))
    return tqdm(total=total, disable=not show, desc=task, unit="input", file=sys.stderr, leave=False)


def model_task(model: Any) -> str:
    """What a loaded model does: its ``task`` ("text-generation", "text-classification", "token-classification"),
    or "multimodal" for a Gemma 3n model (generation from text, images and audio)."""
    return getattr(model, "task", None) or "multimodal"


def architecture(model: Any) -> str:
    """The checkpoint's architecture name (config.json "architectures"), else the model class name."""
    config = getattr(model, "config", None)
    names = getattr(config, "architectures", None) or getattr(config, "extra", {}).get("architectures")
    if isinstance(names, (list, tuple)) and names:
        return str(names[0])
    return str(names) if isinstance(names, str) else type(model).__name__


# The model tasks each pipeline task accepts, and the checkpoint it needs otherwise (for the error message).
_ACCEPTS = {
    "text-generation": ({"text-generation", "multimodal"}, "a causal LM (...ForCausalLM) or Gemma 3n checkpoint"),
    "text-classification": ({"text-classification"}, "a ...ForSequenceClassification checkpoint"),
    "token-classification": ({"token-classification"}, "a ...ForTokenClassification checkpoint"),
}


def check_model_task(model: Any, task: str) -> None:
    """A one-line error when the model's head does not fit the pipeline task (e.g. a sequence classifier given to
    "text-generation", or a text-only Gemma 2 to "image-text-to-text")."""
    accepted, needed = _ACCEPTS.get(task, ({"multimodal"}, "a Gemma 3n checkpoint (text-only models take no media)"))
    found = model_task(model)
    if found not in accepted:
        where = getattr(model, "path", None)
        name = f"{where} ({architecture(model)})" if where else architecture(model)
        raise ValueError(f"the {task} pipeline needs {needed}, but {name} is a {found} model")


def _config_part(gen: dict[str, Any]) -> dict[str, Any]:
    """The GenerationConfig fields of a generation-settings dict (seed, generator and compile go to generate)."""
    return {k: v for k, v in gen.items() if k not in ("seed", "generator", "compile")}


def _check_batch_size(batch_size: Any) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size
