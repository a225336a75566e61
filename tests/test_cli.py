"""The ``gemma3n`` command line on the tiny-random checkpoint: caption (bad files, resume), transcribe, generate
(streaming), and one-line errors."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import soundfile
from pipeline_helpers import SAMPLING_RATE, fewer_audio_tokens, make_audio

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
    err = capsys.readouterr().err
    assert "meaningless" in err
    # the failure is named as it happens, and the run ends with a summary that says where the output is
    assert f"gemma3n caption: failed: {folder / 'broken.png'}: " in err
    assert f"gemma3n caption: 2 done, 0 skipped (already in the output), 1 failed; output: {out}" in err
    named = [line for line in err.splitlines() if f"failed: {folder / 'broken.png'}: " in line]
    assert len(named) == 2  # once as it failed, once in the summary's list of failures


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
    # A second re-run has nothing left to do, also from another directory with the paths typed differently, and
    # through a symlink to the folder: finished work is keyed on the resolved path.
    opened.clear()
    before = out.read_bytes()
    assert cli.main(["caption", str(folder), "--model", "tiny-random", "--output", str(out)]) == 0
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(folder)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert (
        cli.main(["caption", "../photos", "../link/cat.png", "--model", "tiny-random", "--output", "../captions.jsonl"])
        == 0
    )
    assert opened == [] and out.read_bytes() == before


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


# ---- output files that are not this job's, output that cannot be written, failed loads ----------------------------


def _caption_rows(folder: Path, n: int = 3) -> str:
    return "".join(
        json.dumps({"path": str(folder / f"img{i}.png"), "caption": f"caption {i}"}) + "\n" for i in range(n)
    )


@pytest.mark.parametrize(
    ("command", "content", "reason"),
    [
        ("transcribe", None, 'line 1 has no "text" or "error"'),  # a caption file given to transcribe
        ("caption", "# Notes\n\nSome text.\n", "line 1 is not JSON"),
        ("caption", '{"path": "a.png", "caption": "x"}\n[1, 2]\n', 'line 2 is not a JSON object with a "path"'),
        ("caption", '{"path": "a.png", "caption": "x"}\nnot json\n{"path": "b.png", "caption": "y"}\n', "line 2"),
        ("caption", b"\xff\xfe binary", "not UTF-8"),
        ("caption", "one line of text without a newline", "line 1 is not JSON"),  # not a row cut short
    ],
)
def test_output_that_is_not_this_jobs_results_is_refused_and_unchanged(tmp_path, command, content, reason):
    out = tmp_path / "existing.jsonl"
    data = _caption_rows(tmp_path).encode() if content is None else content
    out.write_bytes(data.encode() if isinstance(data, str) else data)
    before = out.read_bytes()
    clip = tmp_path / "x.wav"
    soundfile.write(clip, make_audio(0.5), SAMPLING_RATE)
    inputs = str(clip) if command == "transcribe" else str(EXAMPLES / "cat.png")
    python = [sys.executable, "-m", "gemma3n"]
    result = _run(
        command,
        inputs,
        "--model",
        str(tmp_path / "never loaded"),
        "--output",
        str(out),
        cache=tmp_path,
        executable=python,
    )
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"gemma3n {command}: error: --output {str(out)!r} is not a {command} results file")
    assert reason in line and "--overwrite" in line
    assert out.read_bytes() == before


def test_overwrite_starts_over(tmp_path, cache):
    out = tmp_path / "notes.md"
    out.write_text("# not captions\n")
    image = EXAMPLES / "cat.png"
    args = ["caption", str(image), "--model", "tiny-random", "--max-new-tokens", "2", "--output", str(out)]
    assert cli.main(args) == 2 and out.read_text() == "# not captions\n"
    assert cli.main([*args, "--overwrite"]) == 0
    (record,) = _lines(out)
    assert record["path"] == str(image) and "caption" in record


def test_a_resumed_file_keeps_every_row_it_does_not_redo(tmp_path, cache, monkeypatch, capsys):
    """Rows of files not in this run (results and errors) stay byte for byte; only the error row of a file this run
    retries and a half-written last line give way. Paths typed relative are written absolute, so a re-run from
    another directory (into a new output folder the first time) finds them done."""
    folder = tmp_path / "photos"
    folder.mkdir()
    image = folder / "cat.png"
    shutil.copy(EXAMPLES / "cat.png", image)
    other = '{"path": "/elsewhere/a.png", "caption": "kept",  "extra": 1}\n{"path": "/elsewhere/b.png", "error": "e"}\n'
    retried = json.dumps({"path": str(image), "error": "out of memory"}) + "\n"
    out = tmp_path / "out" / "captions.jsonl"
    out.parent.mkdir()
    out.write_text(other + retried + '{"path": "/elsewhere/c.png", "capt')
    monkeypatch.chdir(folder)
    args = [
        "caption",
        "cat.png",
        "--model",
        "tiny-random",
        "--max-new-tokens",
        "2",
        "--output",
        "../out/captions.jsonl",
    ]
    assert cli.main(args) == 0
    text = out.read_text()
    assert text.startswith(other) and retried not in text and "c.png" not in text
    assert [r["path"] for r in _lines(out)] == ["/elsewhere/a.png", "/elsewhere/b.png", str(image)]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["caption", "photos", "--model", "tiny-random", "--output", "out/captions.jsonl"]) == 0
    assert out.read_text() == text
    assert "every file already has a caption in out/captions.jsonl" in capsys.readouterr().err


def test_output_folder_that_cannot_be_created(tmp_path, cache):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    python = [sys.executable, "-m", "gemma3n"]
    out = blocker / "sub" / "captions.jsonl"
    result = _run(
        "caption",
        str(EXAMPLES / "cat.png"),
        "--model",
        "tiny-random",
        "--output",
        str(out),
        cache=cache,
        executable=python,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if "error" in ln]
    assert line.startswith("gemma3n caption: error: cannot create --output") and str(blocker) in line
    assert "meaningless" not in result.stderr  # refused before the model is loaded


def test_failed_load_leaves_no_output_file(tmp_path, cache):
    out = tmp_path / "new" / "captions.jsonl"
    (tmp_path / "empty").mkdir()
    for model in (tmp_path / "missing", tmp_path / "empty"):
        assert cli.main(["caption", str(EXAMPLES / "cat.png"), "--model", str(model), "--output", str(out)]) == 2
    bad = tmp_path / "bad-config"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 8}))
    assert cli.main(["caption", str(EXAMPLES / "cat.png"), "--model", str(bad), "--output", str(out)]) == 2
    assert not out.exists() and not out.parent.exists()


def test_device_that_torch_does_not_know_is_named(cache, capsys):
    assert cli.main(["generate", "--model", "tiny-random", "--device", "tpu", "hi"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("gemma3n generate: error: cannot load model 'tiny-random': device='tpu' is not a device")


# ---- progress ------------------------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    """A stderr stand-in that says it is a terminal, so the progress bar is drawn into it."""

    def isatty(self) -> bool:
        return True


def test_transcribe_progress_advances_with_audio_and_warnings_do_not_break_it(tmp_path, cache, monkeypatch):
    from gemma3n.tiny_random import ensure_tiny_random

    # 12 soft tokens per clip hold 1.952 s of audio: a 5 s file is transcribed in three windows.
    model = fewer_audio_tokens(ensure_tiny_random(), tmp_path / "short-audio", 12)
    clip = tmp_path / "talk.wav"
    soundfile.write(clip, make_audio(5.0), SAMPLING_RATE)
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    def show_warning(message, category, filename, lineno, file=None, line=None):  # Python's default, not pytest's
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show_warning)
    args = ["transcribe", str(clip), "--model", str(model), "--max-new-tokens", "2", "--output", str(tmp_path / "o")]
    assert cli.main(args) == 0
    segments = [seg.strip() for seg in re.split(r"[\r\n]", terminal.getvalue()) if seg.strip()]
    counts = [m.group(1) for seg in segments if (m := re.search(r"\| (\d+)/5 s of audio", seg))]
    assert counts[0] == "0" and counts[-1] == "5"
    assert len({c for c in counts if 0 < int(c) < 5}) >= 2  # it moved within the one file, window by window
    warned = [seg for seg in segments if "reached max_new_tokens" in seg]
    assert warned and all(seg.startswith("gemma3n transcribe: warning: the transcript of") for seg in warned)
    (record,) = _lines(tmp_path / "o")
    assert record["text"]


# ---- help ----------------------------------------------------------------------------------------------------------


def test_help_does_not_import_torch_and_shows_defaults():
    code = (
        "import sys, contextlib, io\n"
        "from gemma3n import cli\n"
        "commands = ['caption', 'transcribe', 'generate', 'slice']\n"
        "for argv in [['--help']] + [[c, '--help'] for c in commands]:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        cli.main(argv)\n"
        "    print(out.getvalue())\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("torch imported: False")
    from gemma3n.generation import DEFAULT_MAX_NEW_TOKENS, GenerationConfig
    from gemma3n.pipelines.automatic_speech_recognition import DEFAULT_INSTRUCTION
    from gemma3n.pipelines.image_to_text import DEFAULT_PROMPT

    helps: dict[str, str] = {}  # "command --option" -> its help text with the default
    for name, sub in cli.build_parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest not in ("help", "model"):
                helps[f"{name} {action.option_strings[-1]}"] = sub._get_formatter()._get_help_string(action)
    assert all("(default: " in text for text in helps.values()), helps
    assert helps["generate --max-new-tokens"].endswith(f"generation_config.json, else {DEFAULT_MAX_NEW_TOKENS})")
    assert helps["generate --temperature"].endswith(f"else {GenerationConfig.temperature})")
    assert helps["caption --prompt"].endswith(f"(default: {DEFAULT_PROMPT!r})")
    assert helps["transcribe --instruction"].endswith(f"(default: {DEFAULT_INSTRUCTION!r})")
    assert helps["caption --batch-size"] == "images per batch (default: %(default)s)"
    text = " ".join(result.stdout.split())
    assert "images per batch (default: 4)" in text
