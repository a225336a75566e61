"""The ``gemma3n`` command line on the tiny-random checkpoint: caption (bad files, resume), transcribe, generate
(streaming), and one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile
from pipeline_helpers import SAMPLING_RATE, make_audio

import gemma3n
from gemma3n import cli

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """GEMMA3N_CACHE pointing at a fresh folder; the first command builds tiny-random there."""
    root = tmp_path_factory.mktemp("gemma3n_cache")
    previous = os.environ.get("GEMMA3N_CACHE")
    os.environ["GEMMA3N_CACHE"] = str(root)
    yield root
    if previous is None:
        os.environ.pop("GEMMA3N_CACHE", None)
    else:
        os.environ["GEMMA3N_CACHE"] = previous


@pytest.fixture(scope="module")
def captioner(cache):
    """The image-to-text pipeline the CLI runs (same checkpoint, default settings), for expected captions."""
    return gemma3n.pipeline("image-to-text", model="tiny-random", device="cpu")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _image_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    shutil.copy(EXAMPLES / "house.png", folder / "house.png")
    shutil.copy(EXAMPLES / "sunset.jpg", folder / "nested" / "sunset.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_caption_folder_with_a_corrupt_file(tmp_path, captioner, capsys):
    folder = _image_folder(tmp_path)
    out = tmp_path / "captions.jsonl"
    status = cli.main(["caption", str(folder), "--model", "tiny-random", "--output", str(out), "--batch-size", "3"])
    assert status == 1
    records = {Path(r["path"]).name: r for r in _lines(out)}
    assert set(records) == {"house.png", "sunset.jpg", "broken.png"}  # notes.txt is not an image
    assert set(records["broken.png"]) == {"path", "error"} and "broken.png" in records["broken.png"]["error"]
    from PIL import Image

    for name, path in (("house.png", folder / "house.png"), ("sunset.jpg", folder / "nested" / "sunset.jpg")):
        expected = captioner(Image.open(path).convert("RGB"))[0]["generated_text"]
        assert records[name] == {"path": str(path), "caption": expected}
    assert "meaningless" in capsys.readouterr().err


def test_caption_resumes_an_interrupted_run(tmp_path, captioner, monkeypatch):
    folder = _image_folder(tmp_path)
    (folder / "broken.png").unlink()
    shutil.copy(EXAMPLES / "cat.png", folder / "cat.png")
    out = tmp_path / "captions.jsonl"
    # A run killed mid-way: one caption done, one error, and a line cut off while being written.
    out.write_text(
        json.dumps({"path": str(folder / "house.png"), "caption": "written before the interruption"})
        + "\n"
        + json.dumps({"path": str(folder / "cat.png"), "error": "out of memory"})
        + "\n"
        + '{"path": "'
        + str(folder / "nested" / "sunset.jpg")
        + '", "capt'
    )
    opened = []
    original = cli._open_image
    monkeypatch.setattr(cli, "_open_image", lambda path: opened.append(path.name) or original(path))
    status = cli.main(["caption", str(folder), "--model", "tiny-random", "--output", str(out)])
    assert status == 0
    assert sorted(opened) == ["cat.png", "sunset.jpg"]  # the finished image is skipped, the others (re)done
    records = _lines(out)
    assert [Path(r["path"]).name for r in records] == ["house.png", "cat.png", "sunset.jpg"]
    assert records[0]["caption"] == "written before the interruption"
    assert all("caption" in r and "error" not in r for r in records)
    # A second re-run has nothing left to do.
    opened.clear()
    assert cli.main(["caption", str(folder), "--model", "tiny-random", "--output", str(out)]) == 0
    assert opened == [] and _lines(out) == records


def test_caption_to_stdout_and_prompt(tmp_path, cache, capsys, captioner):
    image = EXAMPLES / "shapes.png"
    args = ["caption", str(image), "--model", "tiny-random", "--prompt", "Count the shapes.", "--max-new-tokens", "5"]
    assert cli.main(args) == 0
    (line,) = capsys.readouterr().out.splitlines()
    from PIL import Image

    expected = captioner(Image.open(image).convert("RGB"), prompt="Count the shapes.", max_new_tokens=5)
    assert json.loads(line) == {"path": str(image), "caption": expected[0]["generated_text"]}


@pytest.mark.filterwarnings("ignore:the transcript of")  # tiny-random never ends a transcript by itself
def test_transcribe(tmp_path, cache, capsys):
    good = tmp_path / "speech.wav"
    soundfile.write(good, make_audio(2.0), SAMPLING_RATE)
    bad = tmp_path / "noise.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    out = tmp_path / "transcripts.jsonl"
    args = ["transcribe", str(good), str(bad), "--model", "tiny-random", "--output", str(out), "--timestamps"]
    with pytest.warns(UserWarning, match=re.escape(f"0.00-2.00 s of {str(good)!r} reached max_new_tokens")):
        assert cli.main(args) == 1
    good_record, bad_record = _lines(out)
    assert bad_record["path"] == str(bad) and "noise.wav" in bad_record["error"]
    asr = gemma3n.pipeline("automatic-speech-recognition", model="tiny-random", device="cpu")
    expected = asr(str(good), return_timestamps="chunk")
    assert good_record == {
        "path": str(good),
        "text": expected["text"],
        "chunks": [{"text": expected["text"], "timestamp": [0.0, 2.0]}],
    }


class _Recorder:
    """A stdout stand-in that remembers each write and flush."""

    def __init__(self):
        self.events: list[str] = []

    def write(self, text: str) -> int:
        self.events.append(text)
        return len(text)

    def flush(self) -> None:
        self.events.append("<flush>")


def test_generate_streams(cache, monkeypatch):
    image = EXAMPLES / "cat.png"
    recorder = _Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    args = ["generate", "--model", "tiny-random", "--image", str(image), "--max-new-tokens", "8", "What animal is it?"]
    assert cli.main(args) == 0
    pieces = [e for e in recorder.events if e != "<flush>"]
    assert len(pieces) > 2 and recorder.events.count("<flush>") >= len(pieces)  # written piece by piece
    pipe = gemma3n.pipeline("image-text-to-text", model="tiny-random", device="cpu")
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "image": str(image)}, {"type": "text", "text": "What animal is it?"}],
        }
    ]
    answer = pipe(text=chat, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    assert "".join(pieces) == answer + "\n"


def _run(*args: str, cache: Path, executable: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "GEMMA3N_CACHE": str(cache)}
    return subprocess.run([*executable, *args], capture_output=True, text=True, env=env, timeout=120)


def test_bad_model_is_a_one_line_error(tmp_path, cache):
    python = [sys.executable, "-m", "gemma3n"]
    result = _run("caption", str(EXAMPLES), "--model", str(tmp_path / "missing"), cache=cache, executable=python)
    assert result.returncode == 2 and result.stdout == ""
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "neither a local checkpoint directory nor a hub id" in result.stderr
    (tmp_path / "empty").mkdir()
    message = cli.main(["generate", "--model", str(tmp_path / "empty"), "hi"])
    assert message == 2


def test_console_script(cache):
    script = shutil.which("gemma3n")
    assert script is not None, "the gemma3n console script is not installed (pip install -e .)"
    result = _run("--version", cache=cache, executable=[script])
    assert result.returncode == 0 and result.stdout.strip() == f"gemma3n {gemma3n.__version__}"
