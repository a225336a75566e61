"""Generation: prefill, single-token decode steps, sampling, stopping and streaming.

Flat functions in the gpt-fast spirit: ``prefill`` fills the preallocated cache and returns the last logits,
``decode_step`` runs one token per row, ``generate`` loops. Sampling draws with exponential noise and an argmax
(no ``torch.multinomial`` host round trip). Greedy decoding equals transformers' ``generate`` token for token.
"""

from __future__ import annotations

import itertools
import json
import math
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from .compile_policy import AUTO, resolve_compile
from .cuda_graphs import CudaGraphDecodeStep, cuda_graphs_supported
from .row_kernels import prepare_row_kernel
from .text_model import KVCache
from .text_model.linear import few_row_bf16_kernel, measure_fused_row_product
from .text_model.packed_weights import pack_if_pays

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass
class GenerationConfig:
    """Decoding settings; defaults come from the checkpoint's ``generation_config.json``."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int = 0
    stop_strings: list[str] = field(default_factory=list)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path | None, eos_fallback: list[int], pad_fallback: int | None
    ) -> GenerationConfig:
        data: dict[str, Any] = {}
        file = Path(path) / "generation_config.json" if path is not None else None
        if file is not None and file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as err:
                raise ValueError(f"{file} is not valid JSON: {err}") from None
        eos = data.get("eos_token_id", eos_fallback)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        pad = data.get("pad_token_id", pad_fallback)
        config = cls(
            do_sample=bool(data.get("do_sample", False)),
            temperature=float(data.get("temperature", 1.0)),
            top_k=data.get("top_k"),
            top_p=data.get("top_p"),
            eos_token_ids=eos,
            pad_token_id=pad if pad is not None else (eos[0] if eos else 0),
        )
        if data.get("max_new_tokens"):
            config.max_new_tokens = int(data["max_new_tokens"])
        return config

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with the non-None ``overrides`` applied, validated."""
        names = {f.name for f in fields(self)}
        aliases = {"eos_token_id": "eos_token_ids"}
        clean = {}
        for key, value in overrides.items():
            key = aliases.get(key, key)
            if key not in names:
                raise TypeError(f"unknown generation setting {key!r}; known: {', '.join(sorted(names))}")
            if value is not None:
                clean[key] = value
        if isinstance(clean.get("eos_token_ids"), int):
            clean["eos_token_ids"] = [clean["eos_token_ids"]]
        if isinstance(clean.get("stop_strings"), str):
            clean["stop_strings"] = [clean["stop_strings"]]
        config = replace(self, **clean)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the setting when a value cannot work (wrong type, NaN / infinite, out of range)."""
        if not _is_integer(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _is_finite_number(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_p is not None and (not _is_finite_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and (not _is_integer(self.top_k) or self.top_k < 0):
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def _is_integer(value: Any) -> bool:
    """An int (numpy ints too), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    """A real, finite number (int or float, numpy scalars too), but not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_context(prompt_length: int, max_new_tokens: int, context: int | None) -> None:
    """Raise ValueError when the prompt plus ``max_new_tokens`` cannot fit the model's context (positions)."""
    if context is None or prompt_length + max_new_tokens <= context:
        return
    if prompt_length >= context:
        raise ValueError(
            f"the prompt has {prompt_length} tokens, but the model's context is {context} tokens "
            "(max_position_embeddings): shorten the prompt"
        )
    raise ValueError(
        f"prompt length {prompt_length} + max_new_tokens {max_new_tokens} = {prompt_length + max_new_tokens} "
        f"tokens exceeds the model's context of {context} tokens (max_position_embeddings); "
        f"use max_new_tokens <= {context - prompt_length}"
    )


def sample_next_token(
    logits: torch.Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Next token per row from logits [B, V] (float32): greedy, or temperature -> top-k -> top-p sampling."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k:
        k = min(config.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative <= 1 - config.top_p
        drop_sorted[..., -1] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / noise).argmax(dim=-1)


def prefill(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    cache: KVCache,
    **modal_inputs: Any,
) -> torch.Tensor:
    """Process the prompt into ``cache``; return the float32 logits of its last position [B, V]."""
    out = model(
        input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        cache=cache,
        start=0,
        logits_to_keep=1,
        **modal_inputs,
    )
    return out.logits[:, -1].float()


def decode_step(
    model: Any, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: torch.Tensor
) -> torch.Tensor:
    """One token per row: tokens [B, 1] at rope positions [B, 1], cache slot ``start`` (0-d tensor) -> logits [B, V]."""
    return model(tokens, position_ids=positions, cache=cache, start=start).logits[:, -1].float()


_COMPILED_CACHE_MULTIPLE = 256  # compiled decoding rounds the cache length up: fewer shapes, fewer recompiles


def cache_length_for(model: Any, prompt_length: int, max_new_tokens: int, compile: bool) -> int:
    """KV-cache positions to allocate: what generation can fill (prompt + new tokens), never past the context.

    Compiled decoding rounds up to a multiple of 256 (fewer distinct buffer shapes, fewer recompiles), still capped.
    """
    needed = prompt_length + max_new_tokens
    if compile:
        needed = -(-needed // _COMPILED_CACHE_MULTIPLE) * _COMPILED_CACHE_MULTIPLE
    return max(prompt_length, min(needed, model.config.text.max_position_embeddings))


def compiled_decode_step(model: Any) -> Callable[..., torch.Tensor]:
    """:func:`decode_step` through ``torch.compile`` (one per model, reused across calls).

    Fuses the small per-layer ops of a step (about 1.3-1.5x on CPU for a small model; needs a C++ compiler there).
    The first call with a new batch size, cache length or attention bucket compiles (seconds to minutes; inductor
    caches the result on disk for later processes). fp32: the same tokens as eager steps. bf16: fused kernels would
    keep float32 intermediates where eager rounds every op to bf16; ``emulate_precision_casts`` rounds as eager does
    (identical logits over the first steps in ``benchmarks/compiled_vs_eager_bf16.py``), and the differences left
    (a few hundredths on logits of magnitude ~30) can still flip greedy near-ties, which random weights have many of.
    """
    step = getattr(model, "_compiled_decode_step", None)
    if step is None:
        if next(model.parameters()).device.type == "cpu":  # measured now if at all, not while the step is traced
            dtypes = {t.dtype for t in itertools.chain(model.parameters(), model.buffers())}
            if torch.bfloat16 in dtypes:  # the probes only serve bf16 and int8 weights (fp32 models skip them)
                prepare_row_kernel()  # built and loaded now: a traced step cannot build it
                few_row_bf16_kernel()
            if dtypes & {torch.bfloat16, torch.int8}:
                measure_fused_row_product()
        step = torch.compile(decode_step, dynamic=False, options={"emulate_precision_casts": True})
        model._compiled_decode_step = step
    return step


def enable_compiled_prefill(model: Any) -> int:
    """Turn on the compiled prefill of a Gemma 3n text model (the layers' element-wise work through
    ``torch.compile``, see :meth:`gemma3n.text_model.TextModel.enable_compiled_prefill`); it stays on for the model,
    like the compiled towers. Other models are left as they are. Returns how many layers take that path."""
    enable = getattr(getattr(model, "language_model", None), "enable_compiled_prefill", None)
    return enable(True) if enable is not None else 0


class StopStringMatcher:
    """Finds stop strings in each row's decoded continuation."""

    def __init__(self, stop_strings: list[str], decode: Callable[[list[int]], str]):
        self.stop_strings = stop_strings
        self.decode = decode

    def hit(self, tokens: list[int]) -> bool:
        text = self.decode(tokens)
        return any(s in text for s in self.stop_strings)


class TextStreamer:
    """Turns a growing token list into text pieces, holding back incomplete multi-byte characters."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.tokens: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.decode(self.tokens)
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece

    def flush(self) -> str:
        text = self.decode(self.tokens)
        piece, self.emitted = text[self.emitted :], len(text)
        return piece


def _tokenizer_decode(model: Any, tokenizer: Any) -> Callable[[list[int]], str]:
    tok = tokenizer if tokenizer is not None else model.processor
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    input_features: torch.Tensor | None = None,
    input_features_mask: torch.Tensor | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    do_sample: bool | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    stop_strings: str | list[str] | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    streamer: Any = None,
    tokenizer: Any = None,
    generation_config: GenerationConfig | None = None,
    compile: bool | str = AUTO,
    cuda_graphs: bool | None = None,
) -> torch.Tensor:
    """Generate continuations; returns full sequences [B, prompt + new] like transformers' ``generate``.

    Rows that finish (an end id or a stop string) are padded with ``pad_token_id`` while the others go on; the loop
    ends when all rows finished or ``max_new_tokens`` were produced. ``streamer`` is a callable taking text pieces
    (batch 1), or an object with ``put(token_ids)`` / ``end()`` like transformers' streamers (``put`` gets the prompt
    [B, T] first, then each step's tokens [B]). ``compile=True`` runs the decode steps through
    :func:`compiled_decode_step` (same tokens; pays off over many steps with recurring shapes) and, for Gemma 3n on
    the CPU, turns on :func:`enable_compiled_prefill` (fused prefill; bf16 differs from eager in the last bits).
    ``compile="auto"`` (the default) does so on the CPU when ``max_new_tokens`` steps are enough for the compile to
    pay (:mod:`gemma3n.compile_policy`; thousands of steps at E2B), else runs eager steps.
    On CUDA the decode steps are replayed from CUDA graphs (:mod:`gemma3n.cuda_graphs`; same tokens as eager steps)
    unless ``cuda_graphs=False`` or ``compile=True``.
    ``token_type_ids`` (from the processor) is accepted so that ``generate(**inputs)`` works, and ignored: the
    placeholder ids already mark where images and audio go, as in the reference.
    """
    del token_type_ids
    for piece in _generate_iter(
        model,
        input_ids,
        attention_mask,
        pixel_values,
        input_features,
        input_features_mask,
        config_overrides=dict(
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            stop_strings=stop_strings,
            eos_token_ids=eos_token_id,
            pad_token_id=pad_token_id,
        ),
        seed=seed,
        generator=generator,
        streamer=streamer,
        tokenizer=tokenizer,
        generation_config=generation_config,
        compile=compile,
        cuda_graphs=cuda_graphs,
    ):
        if isinstance(piece, torch.Tensor):
            return piece
    raise RuntimeError("generation ended without a result")  # unreachable


def stream_generate(model: Any, input_ids: torch.Tensor, **kwargs: Any) -> Iterator[str]:
    """Like :func:`generate` for one prompt, but yields decoded text pieces as tokens arrive."""
    pieces: list[str] = []
    kwargs["streamer"] = pieces.append
    tokenizer = kwargs.pop("tokenizer", None)
    generation_config = kwargs.pop("generation_config", None)
    names = ("attention_mask", "pixel_values", "input_features", "input_features_mask")
    modal = [kwargs.pop(n, None) for n in names]
    seed, generator, streamer = kwargs.pop("seed", None), kwargs.pop("generator", None), kwargs.pop("streamer")
    compile_steps = kwargs.pop("compile", AUTO)
    cuda_graphs = kwargs.pop("cuda_graphs", None)
    kwargs.pop("token_type_ids", None)  # processor output; unused, as in generate
    if "eos_token_id" in kwargs:
        kwargs["eos_token_ids"] = kwargs.pop("eos_token_id")
    for item in _generate_iter(
        model,
        input_ids,
        *modal,
        config_overrides=kwargs,
        seed=seed,
        generator=generator,
        streamer=streamer,
        tokenizer=tokenizer,
        generation_config=generation_config,
        compile=compile_steps,
        cuda_graphs=cuda_graphs,
    ):
        while pieces:
            yield pieces.pop(0)
        if isinstance(item, torch.Tensor):
            return


def _generate_iter(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
    input_features: torch.Tensor | None,
    input_features_mask: torch.Tensor | None,
    *,
    config_overrides: dict[str, Any],
    seed: int | None,
    generator: torch.Generator | None,
    streamer: Any,
    tokenizer: Any,
    generation_config: GenerationConfig | None,
    compile: bool | str = AUTO,
    cuda_graphs: bool | None = None,
) -> Iterator[Any]:
    """Yields None after each step (so streams can flush) and finally the sequences tensor."""
    base = generation_config or GenerationConfig.from_checkpoint(
        getattr(model, "path", None), model.config.text.eos_token_ids, model.config.text.pad_token_id
    )
    config = base.updated(**config_overrides)
    device = model.device
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    check_context(T, config.max_new_tokens, getattr(model.config.text, "max_position_embeddings", None))
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.to(device).bool()
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if callable(streamer) and B != 1:
        raise ValueError("a text streamer (a callable) works on one prompt at a time")
    if not config.greedy and generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else torch.seed())

    compile = bool(resolve_compile(model, compile, config.max_new_tokens))  # "decode" is True here: no towers
    if device.type == "cpu":
        pack_if_pays(model, B, config.max_new_tokens, compile)  # oneDNN-packed bf16 weights, when they pay
    positions = (mask.long().cumsum(-1) - 1).masked_fill(~mask, 0)  # rope positions skip left padding
    cache_length, step_fn = cache_length_for(model, T, config.max_new_tokens, compile), decode_step
    if compile:
        step_fn = compiled_decode_step(model)
        enable_compiled_prefill(model)
    cache = KVCache(model.config.text, B, cache_length, dtype=model.dtype, device=device)
    if cuda_graphs is None:
        cuda_graphs = not compile and cuda_graphs_supported(model)
    elif cuda_graphs and (compile or not cuda_graphs_supported(model)):
        raise ValueError("cuda_graphs=True needs a Gemma 3n model with every weight on a CUDA device, and no compile")
    if cuda_graphs:
        step_fn = CudaGraphDecodeStep(model, cache, B)
    modal = dict(pixel_values=pixel_values, input_features=input_features, input_features_mask=input_features_mask)
    with torch.inference_mode():
        logits = prefill(model, input_ids, mask, positions, cache, **modal)

    decode = _tokenizer_decode(model, tokenizer) if (config.stop_strings or callable(streamer)) else None
    stop_matcher = StopStringMatcher(config.stop_strings, decode) if config.stop_strings else None
    text_streamer = TextStreamer(decode) if callable(streamer) else None
    if streamer is not None and not callable(streamer):
        streamer.put(input_ids.cpu())

    eos = torch.tensor(config.eos_token_ids or [-1], device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    new_tokens: list[torch.Tensor] = []
    next_pos = positions[:, -1:] + 1
    produced: list[list[int]] = [[] for _ in range(B)]
    for step in range(config.max_new_tokens):
        token = sample_next_token(logits, config, generator)
        token = torch.where(finished, torch.full_like(token, config.pad_token_id), token)
        new_tokens.append(token)
        newly_done = torch.isin(token, eos) & ~finished
        if stop_matcher is not None:
            for b, t in enumerate(token.tolist()):
                if not finished[b]:
                    produced[b].append(t)
                    if stop_matcher.hit(produced[b]):
                        newly_done[b] = True
        finished |= newly_done
        if text_streamer is not None:
            piece = text_streamer.push(int(token[0])) if not bool(torch.isin(token, eos).any()) else ""
            if piece:
                streamer(piece)
        elif streamer is not None:
            streamer.put(token.cpu())
        yield None
        if bool(finished.all()) or step == config.max_new_tokens - 1:
            break
        cache.prepare_decode(T + step)  # attend over a bucket covering the filled prefix, not the whole buffer
        with torch.inference_mode():
            logits = step_fn(model, token[:, None], next_pos, cache, torch.tensor(T + step, device=device))
        next_pos = next_pos + 1

    if text_streamer is not None:
        tail = text_streamer.flush()
        if tail:
            streamer(tail)
    elif streamer is not None:
        streamer.end()
    yield torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
