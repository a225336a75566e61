"""What caption and transcribe do with each input, shared by the ``gemma3n`` command and :mod:`gemma3n.ray`.

A job decodes each input on its own (a file that cannot be decoded becomes that input's ``{"error": ...}`` record),
runs the decoded ones through the pipeline as one batch, and, when that batch fails as a whole, runs them one by one
so one bad input cannot sink the others. Every function here returns one record per input: the result keys the
command writes (``{"caption"}``, ``{"text"[, "chunks"]}``) or ``{"error": one line}``.

Only the standard library is imported at module level (the CLI's ``--help`` stays quick).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

Decode = Callable[[Any, Any], tuple[Any, float]]  # (pipeline, source) -> (decoded input, its share of the progress)
RunBatch = Callable[[Any, list[Any], Callable[[float], None]], list[dict]]  # (pipeline, inputs, on_progress) -> records


def one_line(err: BaseException) -> str:
    """An exception as one line of text (its type name when it has no message)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def open_image(source: Any) -> Any:
    """An RGB PIL image from a path, encoded bytes, an [H, W, C] uint8 array or a PIL image, decoded fully (so a
    corrupt file fails here, not inside a batch)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(bytes(source))) as image:
                image.load()
                return image.convert("RGB")
        except Image.UnidentifiedImageError:  # its message would name a BytesIO object
            raise ValueError(f"cannot identify an image in {len(source)} bytes") from None
    if hasattr(source, "__array__") and not isinstance(source, (str, Path)):
        return Image.fromarray(source).convert("RGB")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def decode_image(_pipe: Any, source: Any) -> tuple[Any, float]:
    return open_image(source), 1.0


def fixed_batch_size(settings: dict[str, Any], batch_size: int) -> dict[str, int]:
    """``{"batch_size": batch_size}`` when ``settings`` ask for ``compile``, else ``{}``: compiled, every pipeline call
    runs at ``batch_size`` (the pipeline fills up a smaller last batch), so the compiled towers and decode steps keep
    the one shape they were compiled for; eager calls take each batch as it is."""
    return {"batch_size": batch_size} if settings.get("compile") else {}


def caption_batch(pipe: Any, images: list[Any], _on_progress: Callable[[float], None], **settings: Any) -> list[dict]:
    """``[{"caption": ...}]``, one per image; ``settings``: the pipeline's (prompt, max_new_tokens, ...; batch_size
    defaults to all the images at once)."""
    settings.setdefault("batch_size", len(images))
    return [{"caption": r[0]["generated_text"]} for r in pipe(images, **settings)]


def decode_audio(pipe: Any, source: Any) -> tuple[dict, float]:
    """A path or encoded bytes -> (the clip as the ASR pipeline takes it, its length in seconds)."""
    name = None
    if isinstance(source, (str, Path)):
        if not Path(source).exists():
            raise FileNotFoundError(f"no such file: {str(source)!r}")
        name = str(source)
    elif isinstance(source, memoryview):
        source = bytes(source)
    extractor = pipe.processor.feature_extractor
    wave = extractor.prepare([source])[0]
    clip = {"array": wave, "sampling_rate": extractor.sampling_rate}
    if name is not None:
        clip["path"] = name  # the pipeline names the file in its warnings (e.g. a window that hit max_new_tokens)
    return clip, wave.shape[-1] / extractor.sampling_rate


def transcribe_batch(
    pipe: Any, clips: list[dict], on_progress: Callable[[float], None], *, timestamps: bool = False, **settings: Any
) -> list[dict]:
    """``[{"text": ...[, "chunks": [{"text", "timestamp": [start, end]}]]}]``, one per clip; ``on_progress`` gets the
    seconds of audio of each generated batch of windows as it finishes."""

    def windows_done(prompts: list[Any]) -> None:  # each prompt's meta: (start, end, rate) of its window
        on_progress(sum((end - start) / rate for start, end, rate in (p.meta for p in prompts)))

    if timestamps:
        settings["return_timestamps"] = "chunk"
    settings.setdefault("batch_size", len(clips))
    results = pipe(clips, on_batch=windows_done, **settings)
    return [{"text": r["text"], **({"chunks": jsonable_chunks(r["chunks"])} if "chunks" in r else {})} for r in results]


def jsonable_chunks(chunks: list[dict]) -> list[dict]:
    return [{"text": c["text"], "timestamp": list(c["timestamp"])} for c in chunks]


def run_with_fallback(
    run_batch: Callable[[list[Any], Callable[[float], None]], list[dict]],
    items: list[Any],
    on_progress: Callable[[float], None],
    on_retry: Callable[[], None] = lambda: None,
) -> list[dict]:
    """One record per decoded item: the batch at once, or, when it fails as a whole, ``on_retry()`` and then each item
    alone (an item that fails alone gets ``{"error": ...}``)."""
    try:
        results = run_batch(items, on_progress)
        if len(results) != len(items):
            raise RuntimeError(f"the pipeline returned {len(results)} results for {len(items)} inputs")
        return results
    except Exception:
        on_retry()
    records = []
    for item in items:
        try:
            records.append(run_batch([item], on_progress)[0])
        except Exception as err:
            records.append({"error": one_line(err)})
    return records


def process(
    pipe: Any, sources: list[Any], decode: Decode, run_batch: RunBatch, labels: list[str | None] | None = None
) -> list[dict]:
    """One record per source, in order: each decoded alone (a failure is its error record), the rest run together
    with :func:`run_with_fallback`. ``labels[i]``, when given, prefixes a decode error that does not name it (for
    inputs given as bytes)."""
    records: list[dict | None] = [None] * len(sources)
    decoded: list[tuple[int, Any]] = []
    for i, source in enumerate(sources):
        try:
            decoded.append((i, decode(pipe, source)[0]))
        except Exception as err:
            message, label = one_line(err), labels[i] if labels else None
            records[i] = {"error": message if not label or label in message else f"{label}: {message}"}
    if decoded:
        items = [item for _, item in decoded]
        results = run_with_fallback(lambda batch, progress: run_batch(pipe, batch, progress), items, lambda _: None)
        for (i, _), record in zip(decoded, results, strict=True):
            records[i] = record
    return [r for r in records if r is not None]
