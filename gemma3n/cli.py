"""The ``gemma3n`` command: caption images, transcribe audio, or chat with the model from a shell.

    gemma3n caption photos/ --model tiny-random --output captions.jsonl
    gemma3n transcribe talk.wav --model path/to/gemma-3n-E2B-it
    gemma3n generate --model google/gemma-3n-E2B-it --image cat.png "What is in this picture?"

caption / transcribe write one JSON line per file (``{"path", "caption"}`` / ``{"path", "text"}``, or ``{"path",
"error"}`` for a file that cannot be read or processed; "path" is the file's absolute path), flushed as soon as it is
done; each failure is also named on stderr, and a summary (done / skipped / failed, the first failures, where the
output is) ends the run. With ``--output``, a re-run from any directory skips files that already have a result and
retries the ones that failed; no row is ever dropped, and a file that holds anything but this command's rows is
refused unless ``--overwrite`` says to start over. The output is opened only once the model is loaded. Exit status:
0 when every file succeeded, 1 when some failed, 2 for a usage error (bad arguments, an output that cannot be
written, a model that cannot be loaded).

Only the standard library is imported until a command runs, so ``gemma3n --help`` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from .cli_timings import PhaseTimer
from .file_items import caption_batch, decode_audio, fixed_batch_size, run_with_fallback, transcribe_batch
from .file_items import one_line as _one_line
from .file_items import open_image as _open_image

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff"})


class CliError(Exception):
    """A problem reported as one line on stderr (exit status 2), without a traceback."""


# ---- files ------------------------------------------------------------------------------------------------------


def resolved(path: str | Path) -> str:
    """The key of a file in a results file: its absolute path with symlinks resolved (the same from any cwd)."""
    return os.path.realpath(path)


def find_files(paths: Iterable[str], extensions: frozenset[str]) -> list[Path]:
    """Files named directly (any extension) plus those under named folders (recursively, by extension), sorted per
    folder and without duplicates (by resolved path). A path that does not exist is kept: it becomes an error line."""
    found: dict[str, Path] = {}
    for name in paths:
        path = Path(name)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in extensions:
                    found.setdefault(resolved(child), child)
        else:
            found.setdefault(resolved(path), path)
    return list(found.values())


@dataclass(frozen=True)
class FileJob:
    """What sets a file command (caption, transcribe) apart, besides how it decodes a file and runs a batch."""

    command: str  # CLI command name
    task: str  # pipeline task
    extensions: frozenset[str]  # files picked up in folders
    result_key: str  # the record key of a success (what a resumed run keeps)
    media: str  # "no {media} files found"
    result_name: str  # "every file already has a {result_name} in the output"
    unit: str  # progress bar unit


CAPTION = FileJob("caption", "image-to-text", IMAGE_EXTENSIONS, "caption", "image", "caption", unit="image")
TRANSCRIBE = FileJob(
    "transcribe", "automatic-speech-recognition", AUDIO_EXTENSIONS, "text", "audio", "transcript", unit="s of audio"
)


ROW_START = '{"path": '  # how every row written here begins (json.dumps of a dict whose first key is "path")


class ResultLog:
    """JSON-lines results: stdout, or an ``--output`` file that a re-run resumes.

    Nothing in an existing file is lost. A file is resumed only when every row is one of this job's (a JSON object
    with "path" and the job's result key or "error"); anything else is refused with a one-line error and left as it
    is, unless ``overwrite`` says to start over. Finished work is keyed on the resolved path, so a re-run from
    another directory skips it too. Nothing is written before :meth:`open` (called once the model is loaded); it
    drops only a line cut short by a killed run and the error rows of the files this run retries.
    """

    def __init__(self, output: str | None, job: FileJob, *, overwrite: bool = False):
        self.job = job
        self.path = None if output is None else Path(output)
        self.overwrite = overwrite
        self.done: set[str] = set()  # resolved paths that already have a result
        self._lines: list[str] = []  # the existing file's complete lines, as they are
        self._errors: dict[str, list[int]] = {}  # resolved path -> indexes of its error rows in _lines
        self._cut_line = False  # the file ends in a half-written line
        self._stream: TextIO | None = None
        if self.path is not None:
            self._check_writable(self.path)
            if self.path.exists() and not overwrite:
                self._read(self.path)

    @property
    def where(self) -> str:
        return "stdout" if self.path is None else str(self.path)

    def _check_writable(self, path: Path) -> None:
        """Refuse (before anything is loaded) an output that cannot be a file we write."""
        if path.is_dir():
            raise CliError(f"--output {str(path)!r} is a directory; name a file")
        if path.exists():
            if not os.access(path, os.W_OK):
                raise CliError(f"--output {str(path)!r} is not writable")
            return
        parent = path.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise CliError(f"cannot create --output {str(path)!r}: {str(parent)!r} is not a writable directory")

    def _refuse(self, reason: str) -> CliError:
        return CliError(
            f"--output {str(self.path)!r} is not a {self.job.command} results file ({reason}); it was left unchanged: "
            "name another file, or pass --overwrite to replace it"
        )

    def _read(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise CliError(f"cannot read --output file {str(path)!r}: {err.strerror or err}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise self._refuse("it is not UTF-8 text") from None
        lines = text.split("\n")
        last = lines.pop()  # "" when the file ends with a newline
        if last.strip():
            try:
                json.loads(last)
                lines.append(last)  # a complete row without its newline: kept, the newline is added on open()
            except json.JSONDecodeError:
                if not last.startswith(ROW_START):  # not the start of a row we write: someone else's text
                    lines.append(last)  # refused below
                else:
                    self._cut_line = True  # the row a killed run was writing: its file is simply redone
        for number, line in enumerate(lines, 1):
            if line.strip():
                self._take(number, line)
        self._lines = lines

    def _take(self, number: int, line: str) -> None:
        key, kinds = self.job.result_key, f'"{self.job.result_key}" or "error"'
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise self._refuse(f"line {number} is not JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("path"), str):
            raise self._refuse(f'line {number} is not a JSON object with a "path"')
        if key in record:
            self.done.add(resolved(record["path"]))
        elif "error" in record:
            self._errors.setdefault(resolved(record["path"]), []).append(number - 1)
        else:
            raise self._refuse(f"line {number} has no {kinds}")

    def is_done(self, path: Path) -> bool:
        return resolved(path) in self.done

    def open(self, retried: Iterable[Path]) -> None:
        """Start writing: keep every existing row except the error rows of ``retried`` files (their new rows
        follow) and a half-written last line; create the folder if needed."""
        if self.path is None:
            self._stream = sys.stdout
            return
        drop = {i for f in retried for i in self._errors.get(resolved(f), [])}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.overwrite or not self.path.exists():
                self._stream = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
                return
            if drop or self._cut_line or (self._lines and not self.path.read_bytes().endswith(b"\n")):
                kept = [line for i, line in enumerate(self._lines) if i not in drop]
                tmp = self.path.with_name(self.path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
                os.replace(tmp, self.path)
            self._stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        except OSError as err:
            raise CliError(f"cannot write --output {str(self.path)!r}: {err.strerror or err}") from None

    def write(self, record: dict) -> None:
        assert self._stream is not None, "open() first"
        self._stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._stream.flush()

    def close(self) -> None:
        if self._stream is not None and self._stream is not sys.stdout:
            self._stream.close()


# ---- model ------------------------------------------------------------------------------------------------------


def load_pipeline(task: str, args: argparse.Namespace, *, text_only: bool = False) -> Any:
    """Resolve ``--model`` and build the pipeline; every failure becomes a one-line CliError."""
    model = load_model(args, text_only=text_only)
    from .pipelines import TASKS

    try:
        pipe = TASKS[task](model, batch_size=getattr(args, "batch_size", 1), progress=False)
    except ValueError as err:  # the checkpoint's head does not fit the task
        raise CliError(_one_line(err)) from None
    timer = _timer(args)
    if timer.enabled:
        with timer.phase("processor"):
            pipe.processor  # noqa: B018 - loaded here (else on first use) so that its time is told apart
        timer.watch_model(model)
        timer.wrap(pipe, "preprocess", "preprocess")
        timer.wrap(pipe, "model_inputs", "preprocess")
    return pipe


def load_model(args: argparse.Namespace, *, text_only: bool = False) -> Any:
    """Resolve ``--model`` and load it; every failure becomes a one-line CliError."""
    from .model_names import ModelNotFoundError, resolve_model_name

    timer = _timer(args)
    try:
        path = resolve_model_name(args.model)
    except ModelNotFoundError as err:
        raise CliError(str(err)) from None
    long_lived = _long_lived_objects() if getattr(args, "owns_process", False) else contextlib.nullcontext()
    with long_lived:
        with timer.phase("imports"):
            from .model import load
            from .pipelines import default_device

            _import_towers(path, text_only)
        try:
            with timer.phase("load"):
                model = load(
                    path,
                    device=args.device or default_device(),
                    dtype=args.dtype,
                    text_only=text_only,
                    quantize=getattr(args, "quantize", None),
                )
        except Exception as err:  # config, weights, device or dtype problems: all reported in one line
            raise CliError(f"cannot load model {args.model!r}: {_one_line(err)}") from None
    return model


@contextlib.contextmanager
def _long_lived_objects() -> Iterator[None]:
    """No garbage collection while the block runs, then its objects are moved out of the collector's sight.

    Importing torch and timm and building the model create millions of objects (modules, functions, classes) that
    live until the process exits. Left to the collector, each full collection during the imports walks all of them
    again, and so do the collections at interpreter exit (on 2 cores: about 1 s less import time, exit 1.5 s -> 0.4 s;
    a cold tiny-random caption 9.2 s -> 5.7 s in ``benchmarks/results/startup_cpu.md``). ``gc.freeze()`` moves
    everything alive into the permanent generation, which no collection scans; collection is on again for the objects
    the run itself creates. The cost: reference cycles that became garbage inside the block are never freed. Only
    a command that owns its process does this (``main()`` with no ``argv``: the ``gemma3n`` script, ``python -m
    gemma3n``); the library and in-process calls leave their caller's heap alone.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _import_towers(path: Path, text_only: bool) -> None:
    """Import the encoder modules the checkpoint's config asks for (the vision tower's pulls in timm), so that
    ``--timings`` tells import time from load time; a config that cannot be read is left to the loader to report."""
    if text_only:
        return
    from .config import read_config_json

    try:
        config = read_config_json(path)
    except Exception:
        return
    if config.get("vision_config"):
        from .encoders import vision  # noqa: F401
    if config.get("audio_config"):
        from .encoders import audio  # noqa: F401


def _timer(args: argparse.Namespace) -> PhaseTimer:
    """The command's phase timer (set by :func:`main`; a disabled one when a command is called directly)."""
    timer = getattr(args, "timer", None)
    return timer if isinstance(timer, PhaseTimer) else PhaseTimer(enabled=False)


def _generation_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": True if getattr(args, "do_sample", False) else None,
        "temperature": getattr(args, "temperature", None),
        "top_k": getattr(args, "top_k", None),
        "top_p": getattr(args, "top_p", None),
        "seed": getattr(args, "seed", None),
        "compile": getattr(args, "compile", None),  # None: "auto", decided for the job
    }
    return {k: v for k, v in settings.items() if v is not None}


# ---- progress and the run summary ----------------------------------------------------------------------------------


class Progress:
    """A progress bar on stderr (when it is a terminal) that messages and warnings are written around, not into."""

    def __init__(self, total: float, unit: str):
        from tqdm.auto import tqdm

        self._tqdm = tqdm
        self.bar = tqdm(
            total=total,
            unit=unit,
            file=sys.stderr,
            disable=not _isatty(sys.stderr),
            dynamic_ncols=True,
            mininterval=0.0,  # updates come per batch, a few per second at most: show each
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} " + unit + " [{elapsed}<{remaining}]",
        )

    def advance(self, amount: float) -> None:
        if amount:
            self.bar.update(amount)

    def grow(self, amount: float) -> None:
        """Add work found on the way (e.g. audio whose length was unknown until it was decoded)."""
        self.bar.total += amount
        self.bar.refresh()

    def rewind(self, to: float) -> None:
        self.bar.n = to
        self.bar.refresh()

    @property
    def count(self) -> float:
        return self.bar.n

    def write(self, line: str) -> None:
        self._tqdm.write(line, file=sys.stderr)

    def __enter__(self) -> Progress:
        import logging

        from tqdm.contrib.logging import logging_redirect_tqdm

        self._show_warning = warnings.showwarning
        show = self._show_warning
        external_write_mode = self._tqdm.external_write_mode

        def show_warning(*args: Any, **kwargs: Any) -> None:
            with external_write_mode(file=sys.stderr):  # clear the bar, write, redraw it below
                show(*args, **kwargs)

        warnings.showwarning = show_warning
        self._logging = logging_redirect_tqdm([logging.getLogger()])
        self._logging.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._logging.__exit__(*exc)
        warnings.showwarning = self._show_warning
        self.bar.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


@dataclass
class Tally:
    """What a file job did, for the summary."""

    done: int = 0
    skipped: int = 0
    failures: list[tuple[Path, str]] = field(default_factory=list)

    SHOWN = 5  # failures listed in the summary

    def summary(self, command: str, where: str) -> list[str]:
        lines = [
            f"gemma3n {command}: {self.done} done, {self.skipped} skipped (already in the output), "
            f"{len(self.failures)} failed; output: {where}"
        ]
        for path, reason in self.failures[: self.SHOWN]:
            lines.append(f"  failed: {path}: {reason}")
        if len(self.failures) > self.SHOWN:
            lines.append(f'  ... and {len(self.failures) - self.SHOWN} more (rows with "error" in the output)')
        return lines


# ---- caption / transcribe ------------------------------------------------------------------------------------------


@dataclass
class FileRunner:
    """Runs a file job's pending files through the pipeline in batches, one result row per file.

    decode(path) -> (input, size): the decoded file and its share of the progress bar (1 per image, seconds of
    audio); run_batch(inputs, on_progress) -> one result record per input, calling ``on_progress(amount)`` as parts of
    the work finish. A batch that fails as a whole is retried file by file, so one bad input cannot sink the others.
    """

    job: FileJob
    log: ResultLog
    batch_size: int
    decode: Callable[[Path], tuple[Any, float]]
    run_batch: Callable[[list[Any], Callable[[float], None]], list[dict]]
    measure: Callable[[Path], float | None]  # the size before decoding, when cheap to know (else None)

    def run(self, todo: list[Path], tally: Tally) -> None:
        sizes = {path: self.measure(path) for path in todo}
        with Progress(sum(s for s in sizes.values() if s is not None), self.job.unit) as progress:
            for group in _chunks(todo, self.batch_size):
                decoded: list[tuple[Path, Any, float]] = []
                for path in group:
                    try:
                        item, size = self.decode(path)
                    except Exception as err:
                        self._failed(progress, tally, path, {"error": _one_line(err)})
                        progress.advance(sizes[path] or 0)
                        continue
                    if sizes[path] is None:
                        progress.grow(size)
                    decoded.append((path, item, size if sizes[path] is None else sizes[path]))  # its bar share
                if decoded:
                    self._run_group(decoded, progress, tally)

    def _run_group(self, decoded: list[tuple[Path, Any, float]], progress: Progress, tally: Tally) -> None:
        start = progress.count
        items = [item for _, item, _ in decoded]
        results = run_with_fallback(self.run_batch, items, progress.advance, lambda: progress.rewind(start))
        for (path, _, _), result in zip(decoded, results, strict=True):
            if "error" in result:
                self._failed(progress, tally, path, result)
            else:
                self.log.write({"path": os.path.abspath(path), **result})
                tally.done += 1
        progress.rewind(start + sum(size for _, _, size in decoded))  # whatever the batch did not report

    def _failed(self, progress: Progress, tally: Tally, path: Path, result: dict) -> None:
        record_failure(self.job, self.log, progress, tally, path, result["error"])


def record_failure(job: FileJob, log: ResultLog, progress: Progress, tally: Tally, path: Path, error: str) -> None:
    """Write a file's error row, count it, and name it on stderr as it happens."""
    log.write({"path": os.path.abspath(path), "error": error})
    tally.failures.append((path, error))
    progress.write(f"gemma3n {job.command}: failed: {path}: {error}")


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_file_job(
    args: argparse.Namespace,
    job: FileJob,
    decode: Callable[[Any, Path], tuple[Any, float]],
    run_batch: Callable[[Any, list[Any], Callable[[float], None]], list[dict]],
    measure: Callable[[Path], float | None],
    settings: dict[str, Any],
) -> int:
    """Find the files, check ``--output``, skip the files done there, load the model only if work is left, then
    open the output and run the rest (here with ``decode`` / ``run_batch``, or with ``--ray`` on Ray Data with the
    pipeline ``settings``); a summary goes to stderr.

    Returns the exit status: 1 when any file failed, else 0.
    """
    files = find_files(args.paths, job.extensions)
    if not files:
        raise CliError(f"no {job.media} files found in {', '.join(args.paths)}")
    log = ResultLog(args.output, job, overwrite=args.overwrite)
    todo = [f for f in files if not log.is_done(f)]
    tally = Tally(skipped=len(files) - len(todo))
    if not todo:
        print(f"gemma3n {job.command}: every file already has a {job.result_name} in {log.where}", file=sys.stderr)
        return 0
    if args.ray or args.ray_address is not None:
        return run_on_ray(args, job, settings, log, todo, tally)
    pipe = load_pipeline(job.task, args)
    # decided once for the whole job: the compile setting (unless --compile / --no-compile) and the weight layout
    run_batch = functools.partial(run_batch, **_job_settings(pipe, job, len(todo), args.batch_size, settings))
    timer = _timer(args)
    log.open(todo)
    try:
        runner = FileRunner(
            job,
            log,
            args.batch_size,
            timer.wrap_callable(functools.partial(decode, pipe), "read"),
            functools.partial(run_batch, pipe),
            measure,
        )
        runner.run(todo, tally)
    finally:
        log.close()
        for line in tally.summary(job.command, log.where):
            print(line, file=sys.stderr)
        if timer.enabled:
            print(timer.report_line(job.command), file=sys.stderr)
    return 1 if tally.failures else 0


def _job_settings(pipe: Any, job: FileJob, files: int, batch_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings decided once for a job of ``files`` files. Without ``--compile`` / ``--no-compile`` ("auto"): the
    pipeline settings that compile its decode steps (at ``batch_size``) when its planned steps pay for that
    (:mod:`gemma3n.compile_policy`), else eager ones. On the CPU the same planned steps decide whether the model's
    bf16 weights are packed for oneDNN (:mod:`gemma3n.text_model.packed_weights`), which each batch's call alone
    would not see."""
    from .compile_policy import AUTO, planned_decode_steps, resolve_compile
    from .text_model.packed_weights import pack_if_pays

    max_new_tokens = settings.get("max_new_tokens") or pipe.generation_config.max_new_tokens
    steps = planned_decode_steps(files, batch_size, max_new_tokens)
    given = settings.get("compile", AUTO)
    compiles = bool(resolve_compile(pipe.model, given, steps))
    if pipe.device.type == "cpu":
        pack_if_pays(pipe.model, min(batch_size, files), steps, compiled=compiles)
    if given != AUTO:
        return {}
    if not compiles:
        return {"compile": False}
    print(
        f"gemma3n {job.command}: compiling the decode steps ({steps} planned steps pay for it; --no-compile skips)",
        file=sys.stderr,
    )
    return {"compile": "decode", "batch_size": batch_size}


# ---- the same on Ray Data ----------------------------------------------------------------------------------------


def run_on_ray(
    args: argparse.Namespace, job: FileJob, settings: dict[str, Any], log: ResultLog, todo: list[Path], tally: Tally
) -> int:
    """Run ``todo`` through :mod:`gemma3n.ray` and write each row here, on the driver, as it streams back (in file
    order), so a killed run loses nothing that was written and a re-run skips it; a row seen twice is written once.
    The output is opened with the first row (a model that cannot load leaves it untouched)."""
    try:
        import ray
        import ray.data

        from . import ray as gemma3n_ray
    except ImportError as err:
        raise CliError(f'--ray needs Ray Data: pip install -e ".[ray]" ({_one_line(err)})') from None
    from .model_names import ModelNotFoundError, resolve_model_name

    try:
        model = str(resolve_model_name(args.model))
    except ModelNotFoundError as err:
        raise CliError(str(err)) from None
    started = _start_ray(ray, args.ray_address)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # rows come back in file order, as in a plain run
    context.enable_progress_bars = False  # ours counts files as they are written
    logging.getLogger("ray.data").setLevel(logging.CRITICAL)  # its notices and tracebacks: ours is one line
    local = args.ray_address is None
    # locally one core stays with the driver and Ray's own processes: a 2-CPU actor on 2 cores ran 3x slower
    cpus = args.cpus_per_worker or (max(1, ((os.cpu_count() or 1) - 1) // args.workers) if local else 1)
    names = {os.path.abspath(path): path for path in todo}
    dataset = getattr(gemma3n_ray, job.command)(
        ray.data.from_items([{"path": key} for key in names]),
        model=model,
        batch_size=args.batch_size,
        concurrency=args.workers,
        num_cpus=cpus,
        num_gpus=args.gpus_per_worker,
        device=args.device,
        dtype=args.dtype,
        quantize=getattr(args, "quantize", None),  # --quantize, where the command has it
        **settings,
    )
    timestamps = getattr(args, "timestamps", False)
    written: set[str] = set()
    try:
        with Progress(len(todo), "file") as progress:
            for row in dataset.iter_rows():
                key = row["path"]
                if key not in names or key in written:
                    continue
                if not written:
                    log.open(todo)
                written.add(key)
                if row["error"] is not None:
                    record_failure(job, log, progress, tally, names[key], row["error"])
                else:
                    log.write({"path": key, **_ray_result(job, row, timestamps)})
                    tally.done += 1
                progress.advance(1)
    except Exception as err:
        if isinstance(err, (KeyboardInterrupt, CliError)):
            raise
        raise CliError(_ray_failure(err, gemma3n_ray.ModelLoadError)) from None
    finally:
        log.close()
        if written or not isinstance(sys.exc_info()[1], CliError):
            for line in tally.summary(job.command, log.where):
                print(line, file=sys.stderr)
        if started:
            ray.shutdown()
    return 1 if tally.failures else 0


def _start_ray(ray: Any, address: str | None) -> bool:
    """Connect to Ray: the running instance in this process, the cluster at ``address``, or a new local instance
    (no dashboard). Returns whether this call started it (and so shuts it down)."""
    if ray.is_initialized():
        return False
    try:
        if address is not None:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # no idle workers prestarted for this driver (one per CPU, each importing Ray): the actors start their own
            ray.init(
                num_cpus=os.cpu_count() or 1,
                include_dashboard=False,
                logging_level=logging.WARNING,
                _system_config={"prestart_worker_first_driver": False},
            )
    except Exception as err:  # no cluster at the address, a port in use, ...
        raise CliError(f"cannot start Ray{'' if address is None else f' at {address!r}'}: {_one_line(err)}") from None
    return True


def _ray_result(job: FileJob, row: dict, timestamps: bool) -> dict:
    """A row of the Ray stage as the record a plain run writes."""
    if job is CAPTION:
        return {"caption": row["caption"]}
    record = {"text": row["text"]}
    if timestamps:
        chunks = row["chunks"]
        record["chunks"] = [{"text": c["text"], "timestamp": [float(t) for t in c["timestamp"]]} for c in chunks]
    return record


def _ray_failure(err: BaseException, load_error: type[Exception]) -> str:
    """One line for a Ray job that failed as a whole: the model's load error when that is the cause, else the first
    exception the remote traceback names (Ray sends the worker's traceback as text)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, load_error):
            return str(seen)
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    lines = [line.strip() for line in str(err).splitlines()]
    marker = f"{load_error.__module__}.{load_error.__name__}: "
    for line in lines:
        if line.startswith(marker):
            return line[len(marker) :]
    named = [line for line in lines if re.match(r"[\w.]+(Error|Exception): ", line) and "ray.exceptions" not in line]
    return f"the Ray job failed: {named[0] if named else _one_line(err)}"


def cmd_caption(args: argparse.Namespace) -> int:
    settings = _generation_settings(args)
    if args.prompt:
        settings["prompt"] = args.prompt

    run_batch = functools.partial(caption_batch, **settings, **fixed_batch_size(settings, args.batch_size))
    decode = lambda _pipe, path: (_open_image(path), 1.0)  # noqa: E731 - looked up at call time (tests patch it)
    return run_file_job(args, CAPTION, decode, run_batch, lambda _path: 1.0, settings)


def _audio_seconds(path: Path) -> float | None:
    """A file's duration from its header (no decoding), or None when that is not cheap to know."""
    try:
        import soundfile

        return float(soundfile.info(str(path)).duration)
    except Exception:
        return None


def cmd_transcribe(args: argparse.Namespace) -> int:
    settings = _generation_settings(args)
    if args.instruction:
        settings["instruction"] = args.instruction
    run_batch = functools.partial(
        transcribe_batch, timestamps=args.timestamps, **settings, **fixed_batch_size(settings, args.batch_size)
    )
    return run_file_job(args, TRANSCRIBE, decode_audio, run_batch, _audio_seconds, settings)


# ---- generate ---------------------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    for path in [*args.image, *args.audio]:
        if not Path(path).is_file() and not path.startswith(("http://", "https://")):
            raise CliError(f"no such file: {path!r}")
    text_only = not (args.image or args.audio)
    messages: list[dict] = []
    if text_only:  # plain-string content: what the text-only (Gemma, Gemma 2) chat templates read
        if args.system:
            messages.append({"role": "system", "content": args.system})
        messages.append({"role": "user", "content": args.prompt})
    else:
        content: list[dict] = [{"type": "image", "image": p} for p in args.image]
        content += [{"type": "audio", "audio": p} for p in args.audio]
        content.append({"type": "text", "text": args.prompt})
        if args.system:
            messages.append({"role": "system", "content": [{"type": "text", "text": args.system}]})
        messages.append({"role": "user", "content": content})
    model = load_model(args, text_only=text_only)
    _check_generates(model, args)
    from .pipelines import TASKS

    pipe = TASKS["text-generation" if text_only else "image-text-to-text"](model, progress=False)
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


def _check_generates(model: Any, args: argparse.Namespace) -> None:
    """A model that cannot answer this request (a classifier; images / audio for a text-only model) is a CliError."""
    from .pipelines.base import architecture, model_task

    task = model_task(model)
    if task not in ("text-generation", "multimodal"):
        raise CliError(
            f"{args.model} is a {task} checkpoint ({architecture(model)}); generate needs a causal language model "
            "(...ForCausalLM) or a Gemma 3n checkpoint"
        )
    media = [option for option, given in (("--image", args.image), ("--audio", args.audio)) if given]
    if media and task != "multimodal":
        raise CliError(
            f"{' and '.join(media)} need a Gemma 3n checkpoint, but {args.model} is a text-only model "
            f"({architecture(model)}); drop {' / '.join(media)} or use a Gemma 3n checkpoint"
        )


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
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available, else cpu)"
    )
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument(
        "--max-new-tokens",
        type=_positive_int,
        default=None,
        help="limit on generated tokens (default: the checkpoint's generation_config.json, else 256)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="weight-only quantized text decoder and LM head, CPU or CUDA (default: none, the checkpoint's precision)",
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="--compile: compile the decode step, the prefill's per-layer work and the vision / audio tower with "
        "torch.compile, for --batch-size (a smaller last batch is filled up): minutes once (cached on disk for later "
        "runs), then faster decoding and towers on CPU. --no-compile: eager. Neither (the default): compile the decode "
        "steps alone when the job's planned decode steps pay for it on the CPU (thousands of steps at E2B)",
    )


def _add_output_options(parser: argparse.ArgumentParser, batch_help: str, batch_default: int) -> None:
    parser.add_argument("--batch-size", type=_positive_int, default=batch_default, help=batch_help)
    parser.add_argument(
        "--output",
        default=None,
        help="JSON-lines file to write; a re-run resumes it (skips files done, retries failed ones). An existing file "
        "that is not this command's results is refused (default: stdout)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="start over: replace an existing --output file (default: resume it)"
    )
    parser.add_argument(
        "--timings",
        action="store_true",
        help="end with one stderr line of seconds per phase (imports, load, towers, decoding, ...) as JSON",
    )


def _add_ray_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('Ray (needs the ray extra: pip install -e ".[ray]")')
    group.add_argument(
        "--ray", action="store_true", help="run on Ray Data: a local Ray instance, or the cluster of --ray-address"
    )
    group.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="join this Ray cluster ('auto': the one started with `ray start` on this machine); implies --ray "
        "(default: start a local instance)",
    )
    group.add_argument("--workers", type=_positive_int, default=1, help="Ray actors, each loading the model once")
    group.add_argument(
        "--cpus-per-worker",
        type=_positive_int,
        default=None,
        help="CPUs (and torch threads) per actor (default: (this machine's cores - 1) / --workers, at least 1; 1 on a "
        "cluster)",
    )
    group.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per actor (the model then runs on cuda)")


class _DefaultsHelpFormatter(argparse.HelpFormatter):
    """Ends every option's help with its default, unless the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "(default" in text or not action.option_strings or action.required or action.default is argparse.SUPPRESS:
            return text
        if action.nargs == 0 and action.default is False:  # a switch
            shown = "off"
        elif action.default in (None, []):
            shown = "none"
        else:
            shown = "%(default)s"
        return f"{text} (default: {shown})"


def _command_parser(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help_text, description=help_text, formatter_class=_DefaultsHelpFormatter)


def add_caption_parser(commands: Any) -> None:
    caption = _command_parser(commands, "caption", "caption image files / folders into JSON lines")
    caption.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    _add_model_options(caption)
    caption.add_argument(
        "--prompt",
        default=None,
        help="what to ask about each image (default: 'Write a one-sentence caption for this image.')",
    )
    _add_output_options(caption, "images per batch", 4)
    _add_ray_options(caption)
    caption.set_defaults(func=cmd_caption)


def add_transcribe_parser(commands: Any) -> None:
    transcribe = _command_parser(commands, "transcribe", "transcribe audio files / folders into JSON lines")
    transcribe.add_argument("paths", nargs="+", metavar="AUDIO", help="audio files or folders (searched recursively)")
    _add_model_options(transcribe)
    transcribe.add_argument(
        "--instruction", default=None, help="the request sent with each clip (default: 'Transcribe this audio.')"
    )
    transcribe.add_argument("--timestamps", action="store_true", help="add per-window chunks with (start, end) times")
    _add_output_options(transcribe, "audio windows (up to 30 s each) per batch", 1)
    _add_ray_options(transcribe)
    transcribe.set_defaults(func=cmd_transcribe)


def add_generate_parser(commands: Any) -> None:
    generate = _command_parser(commands, "generate", "answer a prompt (with images / audio), streamed to stdout")
    generate.add_argument("prompt", metavar="PROMPT", help="the question or instruction")
    _add_model_options(generate)
    generate.add_argument(
        "--image", action="append", default=[], metavar="PATH", help="an image (repeatable; Gemma 3n checkpoints)"
    )
    generate.add_argument(
        "--audio", action="append", default=[], metavar="PATH", help="an audio file (repeatable; Gemma 3n checkpoints)"
    )
    generate.add_argument(
        "--system", default=None, help="a system instruction (the Gemma / Gemma 2 chat templates refuse one)"
    )
    generate.add_argument(
        "--do-sample",
        action="store_true",
        help="sample instead of greedy decoding (default: the checkpoint's generation_config.json, else greedy)",
    )
    checkpoint = "the checkpoint's generation_config.json"
    generate.add_argument(
        "--temperature", type=float, default=None, help=f"sampling temperature (default: {checkpoint}, else 1.0)"
    )
    generate.add_argument(
        "--top-k", type=int, default=None, help=f"sample among the k likeliest tokens (default: {checkpoint}, else all)"
    )
    generate.add_argument(
        "--top-p", type=float, default=None, help=f"nucleus sampling mass (default: {checkpoint}, else 1.0: off)"
    )
    generate.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    generate.set_defaults(func=cmd_generate)


def build_parser() -> argparse.ArgumentParser:
    """The ``gemma3n`` parser: one function per subcommand adds its own parser."""
    parser = argparse.ArgumentParser(
        prog="gemma3n",
        description="Gemma 3n from the command line: caption images, transcribe audio, or generate text.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gemma3n {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_caption_parser(commands)
    add_transcribe_parser(commands)
    add_generate_parser(commands)

    from .matformer_cli import add_slice_command

    add_slice_command(commands, _DefaultsHelpFormatter)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gemma3n`` console script and ``python -m gemma3n``; returns the exit status.

    Called without ``argv`` (the arguments are the process's), the command owns the process and keeps the garbage
    collector off the objects of the imports and the model (see :func:`_long_lived_objects`).
    """
    timer = PhaseTimer(enabled=False)  # the command's time counts from here, parsing included
    args = build_parser().parse_args(argv)
    args.owns_process = argv is None
    if getattr(args, "timings", False):
        args.timer = timer.enable()
    previous_format = warnings.formatwarning
    warnings.formatwarning = lambda message, *_args, **_kwargs: f"gemma3n {args.command}: warning: {message}\n"
    try:
        status = args.func(args)
    except CliError as err:
        print(f"gemma3n {args.command}: error: {err}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt:
        print(f"gemma3n {args.command}: interrupted", file=sys.stderr)
        status = 130
    except BrokenPipeError:  # e.g. piped into `head`
        with contextlib.suppress(Exception):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        status = 0
    finally:
        warnings.formatwarning = previous_format
    if args.owns_process:
        _exit_now(status)
    return status


def _exit_now(status: int) -> None:
    """End the process that the command owns without the interpreter's teardown.

    After a caption or transcription, tearing down the interpreter (every module of torch and timm, the model's
    tensors) took 0.3-0.4 s of a cold one-image caption's ~5 s on 2 cores; the process is ending, so the operating
    system frees all of it at once. What must still happen does: the ``atexit`` handlers run (torch's, logging's,
    Ray's), then stdout and stderr are flushed. The command's own files are closed by then (``with`` blocks and
    ``finally`` in each command).
    """
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken pipe: nothing more can be written anyway
            stream.flush()
    os._exit(status if isinstance(status, int) else 0)  # as sys.exit(None)


if __name__ == "__main__":
    sys.exit(main())
