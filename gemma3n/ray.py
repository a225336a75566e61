"""Captioning and transcription as Ray Data stages, for datasets larger than one machine.

    import ray, gemma3n.ray
    ds = ray.data.read_images("s3://bucket/photos/", include_paths=True)
    gemma3n.ray.caption(ds, model="path/to/gemma-3n-E2B-it", concurrency=4, num_gpus=1).write_parquet("s3://bucket/out")

    ds = ray.data.read_binary_files("/data/talks/", include_paths=True)
    gemma3n.ray.transcribe(ds, model="tiny-random", batch_size=2).write_json("/data/transcripts")

Each function returns the dataset with result columns added: ``caption`` / ``text`` (and ``chunks``: each audio
window's text and ``timestamp`` [start, end] in seconds) plus ``error``, where exactly one of the result and the
error is null. An input that cannot be decoded or run becomes an error row; the job goes on. The input of a row is its
``image`` / ``audio`` column (encoded bytes, or an [H, W, C] array as ``read_images`` gives), else ``bytes`` (as
``read_binary_files`` gives), else ``path``: a local path or a URI read through pyarrow's file systems (``s3://``,
``gs://``, ...); ``column=`` picks another.

The model is loaded once per actor of a pool of ``concurrency`` actors (not per batch); on one node the actors share
the memory-mapped weights through the page cache. ``num_gpus`` GPUs per actor (the model then goes on ``cuda``).
Generation is the pipelines' (greedy unless ``do_sample=True``), with the same per-item handling as the ``gemma3n``
command (:mod:`gemma3n.file_items`), so a row's result equals the single-process one.
"""

from __future__ import annotations

try:
    import ray
    import ray.data
except ImportError as err:  # the optional extra is not installed
    raise ImportError(
        'gemma3n.ray needs Ray Data, an optional extra: pip install -e ".[ray]" (or pip install "ray[data]")'
    ) from err

import functools
from collections.abc import Callable
from typing import Any

from .file_items import (
    Decode,
    RunBatch,
    caption_batch,
    decode_audio,
    decode_image,
    fixed_batch_size,
    process,
    transcribe_batch,
)

IMAGE_COLUMNS = ("image", "bytes", "path")
AUDIO_COLUMNS = ("audio", "bytes", "path")


class ModelLoadError(RuntimeError):
    """An actor could not load the model (raised from the stage, which then fails: no row can succeed)."""


def read_uri(uri: str) -> bytes:
    """The bytes of a URI that pyarrow's file systems know (``s3://``, ``gs://``, ``file://``, ...)."""
    import pyarrow.fs

    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def _source(value: Any) -> Any:
    """A row's input as the decoders take it: local paths stay paths (errors name them), URIs are read to bytes."""
    if isinstance(value, str) and "://" in value:
        return read_uri(value)
    return value


class _Stage:
    """The callable class Ray Data instantiates once per actor: loads the model, then maps batches of rows."""

    def __init__(
        self,
        task: str,
        result_columns: tuple[str, ...],
        decode: Decode,
        run_batch: RunBatch,
        candidates: tuple[str, ...],
        column: str | None,
        model: str,
        device: str,
        dtype: str | None,
        quantize: str | None,
        batch_size: int,
    ):
        from .model import load
        from .pipelines import TASKS

        options: dict[str, Any] = {"device": device, "dtype": dtype}
        if quantize is not None:
            options["quantize"] = quantize
        self.load_error: str | None = None
        try:
            self.pipe = TASKS[task](load(model, **options), batch_size=batch_size, progress=False)
        except Exception as err:  # reported from __call__, where Ray Data surfaces it as the stage's failure
            self.load_error = f"cannot load model {model!r}: {type(err).__name__}: {err}"
        self.result_columns, self.decode, self.run_batch = result_columns, decode, run_batch
        self.candidates, self.column = candidates, column

    def _input_column(self, batch: dict[str, Any]) -> str:
        if self.column is not None:
            if self.column not in batch:
                raise KeyError(f"column {self.column!r} is not in the dataset (columns: {', '.join(batch)})")
            return self.column
        for name in self.candidates:
            if name in batch:
                return name
        raise KeyError(
            f"no input column: expected one of {', '.join(self.candidates)} (columns: {', '.join(batch)}); "
            "name yours with column="
        )

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.load_error is not None:
            raise ModelLoadError(self.load_error)
        column = self._input_column(batch)
        values = list(batch[column])
        paths = list(batch["path"]) if "path" in batch else [None] * len(values)
        sources: list[Any] = []
        failed: dict[int, str] = {}
        for i, value in enumerate(values):
            try:
                sources.append(_source(value))
            except Exception as err:  # an unreadable URI is that row's error
                failed[i] = f"cannot read {value!r}: {type(err).__name__}: {err}"
                sources.append(None)
        labels = [None if isinstance(s, str) else p for s, p in zip(sources, paths, strict=True)]
        readable = [i for i in range(len(values)) if i not in failed]
        records = process(self.pipe, [sources[i] for i in readable], self.decode, self.run_batch, labels)
        by_row = dict(zip(readable, records, strict=True)) | {i: {"error": e} for i, e in failed.items()}
        out = dict(batch)
        for name in (*self.result_columns, "error"):
            out[name] = [by_row[i].get(name) for i in range(len(values))]
        return out


def _map(
    ds: ray.data.Dataset,
    task: str,
    result_columns: tuple[str, ...],
    decode: Decode,
    run_batch: Callable[..., list[dict]],
    candidates: tuple[str, ...],
    *,
    model: str,
    column: str | None,
    batch_size: int,
    concurrency: int | tuple[int, int],
    num_gpus: float,
    num_cpus: float,
    device: str | None,
    dtype: str | None,
    quantize: str | None,
) -> ray.data.Dataset:
    from .model_names import resolve_model_name

    path = str(resolve_model_name(model))  # on the driver: a bad name fails here, and tiny-random is built once
    device = device or ("cuda" if num_gpus else "cpu")
    if isinstance(concurrency, tuple):
        pool = ray.data.ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
    else:
        pool = ray.data.ActorPoolStrategy(size=concurrency)
    return ds.map_batches(
        _Stage,
        fn_constructor_args=(task, result_columns, decode, run_batch, candidates, column)
        + (path, device, dtype, quantize, batch_size),
        batch_size=batch_size,
        compute=pool,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        batch_format="numpy",
    )


def caption(
    ds: ray.data.Dataset,
    *,
    model: str,
    prompt: str | None = None,
    batch_size: int = 4,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    column: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    **generate_kwargs: Any,
) -> ray.data.Dataset:
    """``ds`` with ``caption`` and ``error`` columns: each row's image captioned by the "image-to-text" pipeline.

    model: a checkpoint directory (the same path on every node), a hub id or "tiny-random". batch_size: rows per
    call and images generated together. concurrency: actors (each loads the model once), or (min, max) to autoscale.
    num_gpus / num_cpus: per actor (Ray gives an actor as many torch threads as CPUs). quantize: passed to
    :func:`gemma3n.load` when given. generate_kwargs: max_new_tokens, do_sample, temperature, ...
    """
    settings = {**generate_kwargs, **({"prompt": prompt} if prompt else {})}
    settings |= fixed_batch_size(generate_kwargs, batch_size)
    return _map(
        ds,
        "image-to-text",
        ("caption",),
        decode_image,
        functools.partial(caption_batch, **settings),
        IMAGE_COLUMNS,
        model=model,
        column=column,
        batch_size=batch_size,
        concurrency=concurrency,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        device=device,
        dtype=dtype,
        quantize=quantize,
    )


def transcribe(
    ds: ray.data.Dataset,
    *,
    model: str,
    instruction: str | None = None,
    batch_size: int = 1,
    concurrency: int | tuple[int, int] = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    column: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    quantize: str | None = None,
    **generate_kwargs: Any,
) -> ray.data.Dataset:
    """``ds`` with ``text``, ``chunks`` (each window's ``text`` and ``timestamp`` [start, end] s) and ``error``
    columns: each row's audio transcribed by the "automatic-speech-recognition" pipeline (windows of at most 30 s).

    Arguments as for :func:`caption`; instruction: the request sent with each clip.
    """
    settings = {**generate_kwargs, **({"instruction": instruction} if instruction else {})}
    settings |= fixed_batch_size(generate_kwargs, batch_size)
    return _map(
        ds,
        "automatic-speech-recognition",
        ("text", "chunks"),
        decode_audio,
        functools.partial(transcribe_batch, timestamps=True, **settings),
        AUDIO_COLUMNS,
        model=model,
        column=column,
        batch_size=batch_size,
        concurrency=concurrency,
        num_gpus=num_gpus,
        num_cpus=num_cpus,
        device=device,
        dtype=dtype,
        quantize=quantize,
    )


__all__ = ["ModelLoadError", "caption", "read_uri", "transcribe"]
