"""Startup of the ``gemma3n`` command: help and usage errors import no heavy module; ``--timings`` tells where a cold
caption's time goes; a command that owns its process keeps the garbage collector off the imported objects and ends
the process without the interpreter's teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / "examples" / "images" / "cat.png"
# What a help or usage-error path must not import (each costs 0.1 s to seconds on 2 cores).
HEAVY = ("torch", "timm", "torchvision", "numpy", "PIL", "tokenizers", "safetensors", "jinja2", "librosa", "tqdm")


def _python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter from an empty folder (this checkout on PYTHONPATH)."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
    )


def test_help_and_usage_errors_import_no_heavy_module(tmp_path):
    code = (
        "import contextlib, io, json, sys\n"
        "from gemma3n import cli\n"
        "cases = [['--help'], ['caption', '--help'], ['transcribe', '--help'], ['generate', '--help'],\n"
        "         ['caption'], ['caption', 'x.png', '--model', 'm', '--batch-size', '0'], ['nonsense']]\n"
        "for argv in cases:\n"
        "    out, err = io.StringIO(), io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):\n"
        "        cli.main(argv)\n"
        "    print(json.dumps([out.getvalue(), err.getvalue()]))\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    *outputs, imported = [json.loads(line) for line in result.stdout.splitlines()]
    assert imported == []
    for out, err in outputs[:4]:  # the help texts
        assert out.startswith("usage: gemma3n") and err == ""
    for out, err in outputs[4:]:  # the usage errors: argparse's message, exit 2
        assert out == "" and "error: " in err


def test_module_help_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gemma3n", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert all(command in result.stdout for command in ("caption", "transcribe", "generate"))


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    """A GEMMA3N_CACHE holding tiny-random (built once for this module)."""
    from gemma3n.tiny_random import build_tiny_random

    root = tmp_path_factory.mktemp("startup_cache")
    build_tiny_random(root / "tiny-random")
    return root


def test_cold_caption_timings_and_frozen_imports(tmp_path, tiny_cache):
    """A fresh process runs the command as the ``gemma3n`` script does (``main()``, arguments from sys.argv)."""
    out = tmp_path / "captions.jsonl"
    argv = ["gemma3n", "caption", str(IMAGE), "--model", "tiny-random", "--output", str(out), "--timings"]
    code = (
        "import atexit, gc, sys\n"
        "from gemma3n import cli\n"
        f"sys.argv = {argv!r}\n"
        "atexit.register(lambda: print('atexit', gc.get_freeze_count() > 0, gc.isenabled()))\n"
        "cli.main()\n"
        "print('main returned')\n"
    )
    result = _python(code, tmp_path, GEMMA3N_CACHE=str(tiny_cache), PYTHONUNBUFFERED="")  # stdout block-buffered
    assert result.returncode == 0, result.stderr
    # the command ends the process it owns (no interpreter teardown), after the atexit handlers and with stdout
    # flushed; the objects of the imports and the load were frozen, and collection is on again
    assert result.stdout.split() == ["atexit", "True", "True"]
    (row,) = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert row["path"] == str(IMAGE) and row["caption"]

    (line,) = [line for line in result.stderr.splitlines() if "timings (s): " in line]
    assert line.startswith("gemma3n caption: timings (s): {")
    timings = json.loads(line.split("timings (s): ", 1)[1])
    phases = ["imports", "load", "processor", "read", "preprocess", "vision", "decode"]
    assert all(timings[name] > 0 for name in phases), timings  # each ran, and took measurable time
    assert "audio" not in timings  # no audio in a caption: the audio tower never ran
    assert timings["startup"] >= 0 and timings["other"] >= 0
    in_phases = sum(timings[name] for name in [*phases, "other"])
    assert abs(in_phases - timings["total"]) <= 0.01, timings  # the phases partition the command's time (rounding)


def test_in_process_command_leaves_the_heap_alone(tmp_path, tiny_cache, monkeypatch):
    """``main(argv)`` (a caller's process: a notebook, a test) must not freeze the caller's objects."""
    import gc

    from gemma3n import cli

    monkeypatch.setenv("GEMMA3N_CACHE", str(tiny_cache))
    frozen = gc.get_freeze_count()
    argv = ["caption", str(IMAGE), "--model", "tiny-random", "--output", str(tmp_path / "o.jsonl"), "--timings"]
    assert cli.main(argv) == 0
    assert gc.get_freeze_count() == frozen and gc.isenabled()


def test_owned_process_exit_keeps_piped_output_and_status(tmp_path, tiny_cache):
    """The fast exit (no interpreter teardown) still flushes rows written to a pipe and exits with the command's
    status: 1 when a file failed."""
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    argv = ["gemma3n", "caption", str(IMAGE), str(bad), "--model", "tiny-random", "--max-new-tokens", "4"]
    code = f"import sys\nfrom gemma3n import cli\nsys.argv = {argv!r}\ncli.main()\nprint('main returned')\n"
    result = _python(code, tmp_path, GEMMA3N_CACHE=str(tiny_cache), PYTHONUNBUFFERED="")  # stdout block-buffered
    assert result.returncode == 1, result.stderr
    rows = {row["path"]: row for row in map(json.loads, result.stdout.splitlines())}
    assert sorted(rows) == sorted([str(IMAGE), str(bad)])
    assert rows[str(IMAGE)]["caption"] and "error" in rows[str(bad)]
    assert "1 done, 0 skipped (already in the output), 1 failed" in result.stderr
