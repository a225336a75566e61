"""The ``gemma3n`` command: caption images, transcribe audio, or chat with the model from a shell.

    gemma3n caption photos/ --model tiny-random --output captions.jsonl
    gemma3n transcribe talk.wav --model path/to/gemma-3n-E2B-it
    gemma3n generate --model google/gemma-3n-E2B-it --image cat.jpg "What is in this picture?"

caption / transcribe write one JSON line per file (``{"path", "caption"}`` / ``{"path", "text"}``, or ``{"path",
"error"}`` for a file that cannot be read or processed), flushed as soon as it is done. With ``--output``, a re-run
skips files that already have a result and retries the ones that failed. Exit status: 0 when every file succeeded,
1 when some failed, 2 for a usage error (bad arguments, a model that cannot be loaded).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff"})


class CliError(Exception):
    """A problem reported as one line on stderr (exit status 2), without a traceback."""


# ---- files ------------------------------------------------------------------------------------------------------


def find_files(paths: Iterable[str], extensions: frozenset[str]) -> list[Path]:
    """Files named directly (any extension) plus those under named folders (recursively, by extension), sorted per
    folder and without duplicates. A path that does not exist is kept: it becomes an error line."""
    found: dict[str, Path] = {}
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in extensions:
                    found.setdefault(os.path.abspath(child), child)
        else:
            found.setdefault(os.path.abspath(path), path)
    return list(found.values())


class ResultLog:
    """JSON-lines results: stdout, or a file that a re-run resumes.

    On opening an existing file, the lines that hold a result are kept and the rest (errors, a line cut short by a
    killed run) are dropped, so those files are retried. Every record is flushed as soon as it is written.
    """

    def __init__(self, output: str | None, result_key: str):
        self.result_key = result_key
        self.done: set[str] = set()
        self._file: TextIO | None = None
        self._stream: TextIO = sys.stdout
        if output is not None:
            path = Path(output)
            kept = self._read_results(path) if path.exists() else []
            if path.exists():
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
                os.replace(tmp, path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
            self.done = {os.path.abspath(r["path"]) for r in kept}
            self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            self._stream = self._file

    def _read_results(self, path: Path) -> list[dict]:
        kept = []
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as err:
            raise CliError(f"cannot read --output file {str(path)!r}: {err.strerror or err}") from None
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("path"), str) and self.result_key in record:
                kept.append(record)
        return kept

    def is_done(self, path: Path) -> bool:
        return os.path.abspath(path) in self.done

    def write(self, record: dict) -> None:
        self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# ---- model ------------------------------------------------------------------------------------------------------


def load_pipeline(task: str, args: argparse.Namespace, *, text_only: bool = False) -> Any:
    """Resolve ``--model`` and build the pipeline; every failure becomes a one-line CliError."""
    from .model import load
    from .pipelines import TASKS, ModelNotFoundError, default_device, resolve_checkpoint

    try:
        path = resolve_checkpoint(args.model)
    except ModelNotFoundError as err:
        raise CliError(str(err)) from None
    try:
        model = load(path, device=args.device or default_device(), dtype=args.dtype, text_only=text_only)
    except Exception as err:  # config, weights, device or dtype problems: all reported in one line
        raise CliError(f"cannot load model {args.model!r}: {_one_line(err)}") from None
    return TASKS[task](model, batch_size=getattr(args, "batch_size", 1), progress=False)


def _generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": True if getattr(args, "do_sample", False) else None,
        "temperature": getattr(args, "temperature", None),
        "top_k": getattr(args, "top_k", None),
        "top_p": getattr(args, "top_p", None),
        "seed": getattr(args, "seed", None),
    }
    return {k: v for k, v in settings.items() if v is not None}


def _progress(total: int, unit: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, file=sys.stderr, disable=not sys.stderr.isatty(), dynamic_ncols=True)


# ---- caption / transcribe ------------------------------------------------------------------------------------------


def _open_image(path: Path) -> Any:
    """Decode one image fully (so a corrupt file fails here, not inside a batch)."""
    from PIL import Image

    if not path.exists():
        raise FileNotFoundError(f"no such file: {str(path)!r}")
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def _run_files(
    files: list[Path],
    log: ResultLog,
    batch_size: int,
    decode: Callable[[Path], Any],
    run_batch: Callable[[list[Any]], list[dict]],
    unit: str,
) -> int:
    """Decode each file, run full batches of the decoded ones, write one line per file; return the failure count.

    A batch that fails as a whole is retried file by file, so one bad input cannot sink the others.
    """
    todo = [f for f in files if not log.is_done(f)]
    skipped = len(files) - len(todo)
    if skipped:
        print(f"skipping {skipped} file(s) already done in the output", file=sys.stderr)
    failures = 0
    with _progress(len(todo), unit) as bar:
        for group in _chunks(todo, batch_size):
            decoded: list[tuple[Path, Any]] = []
            for path in group:
                try:
                    decoded.append((path, decode(path)))
                except Exception as err:
                    log.write({"path": str(path), "error": _one_line(err)})
                    failures += 1
            if decoded:
                try:
                    results = run_batch([item for _, item in decoded])
                    pairs = list(zip(decoded, results, strict=True))
                except Exception:
                    pairs = []
                    for path, item in decoded:
                        try:
                            pairs.append(((path, item), run_batch([item])[0]))
                        except Exception as err:
                            pairs.append(((path, item), {"error": _one_line(err)}))
                for (path, _), result in pairs:
                    failures += "error" in result
                    log.write({"path": str(path), **result})
            bar.update(len(group))
    return failures


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass(frozen=True)
class FileJob:
    """What sets a file command (caption, transcribe) apart, besides how it decodes a file and runs a batch."""

    task: str  # pipeline task
    extensions: frozenset[str]  # files picked up in folders
    result_key: str  # the record key of a success (what a resumed run keeps)
    media: str  # "no {media} files found"
    unit: str  # progress bar unit; "every {unit} already has a {result_name} in the output"
    result_name: str


CAPTION = FileJob("image-to-text", IMAGE_EXTENSIONS, "caption", media="image", unit="image", result_name="caption")
TRANSCRIBE = FileJob(
    "automatic-speech-recognition", AUDIO_EXTENSIONS, "text", media="audio", unit="file", result_name="transcript"
)


def run_file_job(
    args: argparse.Namespace,
    job: FileJob,
    decode: Callable[[Any, Path], Any],
    run_batch: Callable[[Any, list[Any]], list[dict]],
) -> int:
    """Find the files, skip those done in ``--output``, load the model only if work is left, and run the rest.

    ``decode(pipeline, path)`` reads one file fully (so a bad file fails alone); ``run_batch(pipeline, inputs)``
    gives one result record per input. Returns the exit status: 1 when any file failed, else 0.
    """
    files = find_files(args.paths, job.extensions)
    if not files:
        raise CliError(f"no {job.media} files found in {', '.join(args.paths)}")
    log = ResultLog(args.output, job.result_key)
    try:
        if all(log.is_done(f) for f in files):
            print(f"every {job.unit} already has a {job.result_name} in the output", file=sys.stderr)
            return 0
        pipe = load_pipeline(job.task, args)
        decode_file, run = functools.partial(decode, pipe), functools.partial(run_batch, pipe)
        failures = _run_files(files, log, args.batch_size, decode_file, run, job.unit)
    finally:
        log.close()
    return 1 if failures else 0


def cmd_caption(args: argparse.Namespace) -> int:
    settings = _generation_settings(args)
    if args.prompt:
        settings["prompt"] = args.prompt

    def run_batch(pipe: Any, images: list[Any]) -> list[dict]:
        return [{"caption": r[0]["generated_text"]} for r in pipe(images, batch_size=len(images), **settings)]

    return run_file_job(args, CAPTION, lambda _pipe, path: _open_image(path), run_batch)


def cmd_transcribe(args: argparse.Namespace) -> int:
    settings = _generation_settings(args)
    if args.instruction:
        settings["instruction"] = args.instruction
    if args.timestamps:
        settings["return_timestamps"] = "chunk"

    def decode(pipe: Any, path: Path) -> dict:
        if not path.exists():
            raise FileNotFoundError(f"no such file: {str(path)!r}")
        extractor = pipe.processor.feature_extractor
        wave = extractor.prepare([str(path)])[0]
        # "path" makes the pipeline name the file in its warnings (e.g. a window that reached max_new_tokens)
        return {"array": wave, "sampling_rate": extractor.sampling_rate, "path": str(path)}

    def run_batch(pipe: Any, clips: list[dict]) -> list[dict]:
        results = pipe(clips, batch_size=len(clips), **settings)
        return [
            {"text": r["text"], **({"chunks": _jsonable_chunks(r["chunks"])} if "chunks" in r else {})} for r in results
        ]

    return run_file_job(args, TRANSCRIBE, decode, run_batch)


def _jsonable_chunks(chunks: list[dict]) -> list[dict]:
    return [{"text": c["text"], "timestamp": list(c["timestamp"])} for c in chunks]


# ---- generate ---------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    content: list[dict] = [{"type": "image", "image": p} for p in args.image]
    content += [{"type": "audio", "audio": p} for p in args.audio]
    for path in [*args.image, *args.audio]:
        if not Path(path).is_file() and not path.startswith(("http://", "https://")):
            raise CliError(f"no such file: {path!r}")
    content.append({"type": "text", "text": args.prompt})
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": args.system}]})
    messages.append({"role": "user", "content": content})
    text_only = not (args.image or args.audio)
    pipe = load_pipeline("text-generation" if text_only else "image-text-to-text", args, text_only=text_only)
    settings = _generation_settings(args)
    try:
        pieces = pipe.stream(messages, **settings) if text_only else pipe.stream(text=messages, **settings)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except (OSError, ValueError) as err:  # unreadable media, bad settings
        raise CliError(_one_line(err)) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


# ---- parser -----------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint directory, hub id (e.g. google/gemma-3n-E2B-it, needs huggingface_hub), or 'tiny-random'",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=_positive_int, default=None, help="limit on generated tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma3n",
        description="Gemma 3n from the command line: caption images, transcribe audio, or generate text.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gemma3n {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    caption = commands.add_parser("caption", help="caption image files / folders into JSON lines")
    caption.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    _add_model_options(caption)
    caption.add_argument("--prompt", default=None, help="what to ask about each image (default: a one-line caption)")
    caption.add_argument("--batch-size", type=_positive_int, default=4, help="images per batch (default: 4)")
    caption.add_argument("--output", default=None, help="JSON-lines file to write / resume (default: stdout)")
    caption.set_defaults(func=cmd_caption)

    transcribe = commands.add_parser("transcribe", help="transcribe audio files / folders into JSON lines")
    transcribe.add_argument("paths", nargs="+", metavar="AUDIO", help="audio files or folders (searched recursively)")
    _add_model_options(transcribe)
    transcribe.add_argument("--instruction", default=None, help="the request sent with each clip")
    transcribe.add_argument("--timestamps", action="store_true", help="add per-window chunks with (start, end) times")
    transcribe.add_argument("--batch-size", type=_positive_int, default=1, help="30 s windows per batch (default: 1)")
    transcribe.add_argument("--output", default=None, help="JSON-lines file to write / resume (default: stdout)")
    transcribe.set_defaults(func=cmd_transcribe)

    generate = commands.add_parser("generate", help="answer a prompt (with images / audio), streamed to stdout")
    generate.add_argument("prompt", metavar="PROMPT")
    _add_model_options(generate)
    generate.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    generate.add_argument("--audio", action="append", default=[], metavar="PATH", help="an audio file (repeatable)")
    generate.add_argument("--system", default=None, help="a system instruction")
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=None)
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None)
    generate.set_defaults(func=cmd_generate)

    from .matformer_cli import add_slice_command

    add_slice_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gemma3n`` console script and ``python -m gemma3n``; returns the exit status."""
    args = build_parser().parse_args(argv)
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"gemma3n {args.command}: warning: {message}\n"
    try:
        return args.func(args)
    except CliError as err:
        print(f"gemma3n {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gemma3n {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0
    finally:
        warnings.formatwarning = previous_format


if __name__ == "__main__":
    sys.exit(main())
