"""gemma3n.ray and ``gemma3n caption / transcribe --ray`` on a local Ray instance (2 CPUs, no dashboard) with the
tiny-random checkpoint: results equal the single-process ones, bad files become error rows, re-runs add nothing, a
run whose driver is killed mid-job resumes without loss or duplicates, and a killed worker loses nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import soundfile
from pipeline_helpers import SAMPLING_RATE, make_audio

import gemma3n
from gemma3n import cli

pytest.importorskip("ray.data", reason='needs the ray extra: pip install -e ".[ray]"')
import ray  # noqa: E402
import ray.data  # noqa: E402

import gemma3n.ray as gemma3n_ray  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "images"
NEW_TOKENS = 6  # short captions / transcripts keep the tests quick; the same for both sides of every comparison


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance for the module (2 CPUs, no dashboard), with GEMMA3N_CACHE in a fresh folder."""
    root = tmp_path_factory.mktemp("gemma3n_cache")
    previous = os.environ.get("GEMMA3N_CACHE")
    os.environ["GEMMA3N_CACHE"] = str(root)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
    if previous is None:
        os.environ.pop("GEMMA3N_CACHE", None)
    else:
        os.environ["GEMMA3N_CACHE"] = previous


@pytest.fixture(scope="module")
def captioner(cluster):
    """The single-process pipeline, for expected captions."""
    return gemma3n.pipeline("image-to-text", model="tiny-random", device="cpu")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _image_folder(tmp_path: Path, copies: int = 1) -> Path:
    """Images (``copies`` of each), a corrupt PNG, a text file named .jpg, and a .txt the CLI does not pick up."""
    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for i in range(copies):
        suffix = "" if i == 0 else f"-{i}"
        shutil.copy(EXAMPLES / "house.png", folder / f"house{suffix}.png")
        shutil.copy(EXAMPLES / "sunset.jpg", folder / "nested" / f"sunset{suffix}.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    (folder / "fake.jpg").write_text("a text file with an image's name")
    (folder / "notes.txt").write_text("not an image")
    return folder


def _audio_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "talks"
    folder.mkdir()
    soundfile.write(folder / "long.wav", make_audio(2.0), SAMPLING_RATE)
    soundfile.write(folder / "short.flac", make_audio(1.0, seed=1), SAMPLING_RATE)
    (folder / "noise.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    return folder


def _expected_caption(captioner, path: Path) -> str:
    from PIL import Image

    return captioner(Image.open(path).convert("RGB"), max_new_tokens=NEW_TOKENS)[0]["generated_text"]


# ---- the Python API --------------------------------------------------------------------------------------------


def test_import_without_ray_names_the_extra():
    code = "import sys; sys.modules['ray'] = None\ntry:\n    import gemma3n.ray\nexcept ImportError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert 'pip install -e ".[ray]"' in out


def test_caption_api_from_paths_and_bytes(tmp_path, captioner):
    folder = _image_folder(tmp_path)
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file())
    by_path = gemma3n_ray.caption(
        ray.data.from_items([{"path": p} for p in paths]), model="tiny-random", batch_size=2, max_new_tokens=NEW_TOKENS
    )
    from_bytes = gemma3n_ray.caption(
        ray.data.read_binary_files(str(folder), include_paths=True),
        model="tiny-random",
        batch_size=3,  # one actor: the read task needs the other CPU
        max_new_tokens=NEW_TOKENS,
    )
    expected = {p: _expected_caption(captioner, Path(p)) for p in paths if p.endswith(("house.png", "sunset.jpg"))}
    for rows in (by_path.take_all(), from_bytes.take_all()):
        assert sorted(r["path"] for r in rows) == paths  # one row per input, none lost
        results = {r["path"]: (r["caption"], r["error"]) for r in rows}
        for path, caption in expected.items():
            assert results[path] == (caption, None)
        for name in ("broken.png", "fake.jpg", "notes.txt"):  # each an error row naming its file
            caption, error = results[str(folder / name)]
            assert caption is None and error and name in error


@pytest.mark.filterwarnings("ignore:the transcript of")  # tiny-random never ends a transcript by itself
def test_transcribe_api_from_paths_and_bytes(tmp_path, cluster):
    folder = _audio_folder(tmp_path)
    paths = sorted(str(p) for p in folder.iterdir())
    asr = gemma3n.pipeline("automatic-speech-recognition", model="tiny-random", device="cpu")
    expected = {p: asr(p, return_timestamps="chunk", max_new_tokens=NEW_TOKENS) for p in paths if "noise" not in p}
    datasets = (
        ray.data.from_items([{"path": p} for p in paths]),
        ray.data.read_binary_files(str(folder), include_paths=True),
    )
    for ds in datasets:
        rows = gemma3n_ray.transcribe(ds, model="tiny-random", batch_size=2, max_new_tokens=NEW_TOKENS).take_all()
        assert sorted(r["path"] for r in rows) == paths
        results = {r["path"]: r for r in rows}
        for path, want in expected.items():
            row = results[path]
            assert row["error"] is None and row["text"] == want["text"]
            assert [(c["text"], list(c["timestamp"])) for c in row["chunks"]] == [
                (c["text"], list(c["timestamp"])) for c in want["chunks"]
            ]
        bad = results[str(folder / "noise.wav")]
        assert bad["text"] is None and bad["chunks"] is None and "noise.wav" in bad["error"]


# ---- the CLI ------------------------------------------------------------------------------------------------------


def test_local_ray_instance_prestarts_no_idle_workers():
    """The CLI's own Ray instance starts only the processes it uses: Ray's default prestarts one idle worker per CPU
    for the driver (each importing Ray), which slowed the start of a 2-core run by seconds."""
    calls: list[dict] = []

    class FakeRay:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**options) -> None:
            calls.append(options)

    assert cli._start_ray(FakeRay, None) is True
    (options,) = calls
    assert options["_system_config"] == {"prestart_worker_first_driver": False}
    assert options["include_dashboard"] is False and options["num_cpus"] == (os.cpu_count() or 1)
    calls.clear()
    assert cli._start_ray(FakeRay, "auto") is True  # a cluster keeps its own settings
    assert "_system_config" not in calls[0] and calls[0]["address"] == "auto"


def test_ray_driver_does_not_import_torch(cluster, captioner):
    """The driver of ``--ray`` resolves the model and builds the Ray Data plan without torch (1-2 s of import on the
    critical path); the actors import it. tiny-random is already built here (by the captioner fixture)."""
    code = (
        "import sys\n"
        "from gemma3n import cli, ray as gemma3n_ray\n"
        "from gemma3n.model_names import resolve_model_name\n"
        "resolve_model_name('tiny-random', announce=False)\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_caption_on_ray_equals_the_plain_run_and_resumes(tmp_path, cluster, capsys):
    folder = _image_folder(tmp_path)
    plain, on_ray = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    common = ["caption", str(folder), "--model", "tiny-random", "--max-new-tokens", str(NEW_TOKENS)]
    assert cli.main([*common, "--output", str(plain), "--batch-size", "2"]) == 1
    capsys.readouterr()
    assert cli.main([*common, "--output", str(on_ray), "--ray", "--workers", "2", "--batch-size", "2"]) == 1
    assert on_ray.read_bytes() == plain.read_bytes()  # the same rows in the same order
    rows = _lines(on_ray)
    assert [Path(r["path"]).name for r in rows if "error" in r] == ["broken.png", "fake.jpg"]
    err = capsys.readouterr().err
    assert f"gemma3n caption: failed: {folder / 'broken.png'}: " in err
    assert f"gemma3n caption: 2 done, 0 skipped (already in the output), 2 failed; output: {on_ray}" in err
    # A re-run skips the finished files and retries the failed ones: the same rows, none added.
    assert cli.main([*common, "--output", str(on_ray), "--ray"]) == 1
    again = _lines(on_ray)
    assert len(again) == len(rows) and sorted(again, key=lambda r: r["path"]) == sorted(rows, key=lambda r: r["path"])
    assert "gemma3n caption: 0 done, 2 skipped (already in the output), 2 failed" in capsys.readouterr().err


def test_cli_model_that_cannot_load_on_the_workers_is_a_one_line_error(tmp_path, cluster, capsys):
    model = tmp_path / "broken-model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "gemma3n", "text_config": 5}')
    out = tmp_path / "captions.jsonl"
    assert cli.main(["caption", str(EXAMPLES / "cat.png"), "--model", str(model), "--output", str(out), "--ray"]) == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert line.startswith(f"gemma3n caption: error: cannot load model {str(model)!r}: ") and "text_config" in line
    assert not out.exists()


@pytest.mark.filterwarnings("ignore:the transcript of")
def test_cli_transcribe_on_ray_equals_the_plain_run(tmp_path, cluster, capsys):
    folder = _audio_folder(tmp_path)
    plain, on_ray = tmp_path / "plain.jsonl", tmp_path / "ray.jsonl"
    common = ["transcribe", str(folder), "--model", "tiny-random", "--max-new-tokens", str(NEW_TOKENS), "--timestamps"]
    assert cli.main([*common, "--output", str(plain)]) == 1
    assert cli.main([*common, "--output", str(on_ray), "--ray"]) == 1
    assert on_ray.read_bytes() == plain.read_bytes()
    (bad,) = [r for r in _lines(on_ray) if "error" in r]
    assert bad["path"] == str(folder / "noise.wav")
    assert "1 failed" in capsys.readouterr().err


def _workers_of_this_cluster(cache: str) -> list[int]:
    """Pids of the Ray Data actors of the test's Ray instance: they carry its GEMMA3N_CACHE in their environment."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(b"ray::MapWorker"):
                if f"GEMMA3N_CACHE={cache}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
        except OSError:  # gone meanwhile
            continue
    return pids


killed: list[int] = []


def _kill_a_worker_after(out: Path, rows: int, cache: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if out.read_text(encoding="utf-8").count("\n") >= rows:
            for pid in _workers_of_this_cluster(cache)[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return
        time.sleep(0.02)


def test_cli_run_killed_mid_job_resumes_without_loss_or_duplicates(tmp_path, cluster, captioner):
    """The driver (a separate process attached to the test's Ray instance) is killed once some rows are written;
    the re-run, whose worker is killed mid-job too, writes each remaining file once."""
    cluster_cache = os.environ["GEMMA3N_CACHE"]
    folder = _image_folder(tmp_path, copies=5)
    for name in ("broken.png", "fake.jpg"):
        (folder / name).unlink()
    images = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    out = tmp_path / "captions.jsonl"
    args = ["caption", str(folder), "--model", "tiny-random", "--max-new-tokens", str(NEW_TOKENS), "--batch-size", "1"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "gemma3n", *args, "--output", str(out), "--ray-address", cluster],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if out.exists() and out.read_text(encoding="utf-8").count("\n") >= 2:
            break
        time.sleep(0.02)
    assert driver.poll() is None, driver.stderr.read().decode()  # still running: killed mid-job
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    done_before = out.read_text(encoding="utf-8").count("\n")  # complete rows (a cut one may follow)
    assert 2 <= done_before < len(images) - 2
    # The re-run (in this process, on the test's Ray instance) loses its worker once a row more is written: Ray
    # restarts the actor and re-runs its batch.
    killer = threading.Thread(target=_kill_a_worker_after, args=(out, done_before + 1, cluster_cache), daemon=True)
    killer.start()
    assert cli.main([*args, "--output", str(out), "--ray"]) == 0
    killer.join()
    assert killed, "no worker was killed"
    rows = _lines(out)
    assert sorted(r["path"] for r in rows) == [str(p) for p in images]  # every image once: no loss, no duplicates
    expected = {name: _expected_caption(captioner, EXAMPLES / name) for name in ("house.png", "sunset.jpg")}
    for row in rows:
        original = "house.png" if Path(row["path"]).name.startswith("house") else "sunset.jpg"
        assert row["caption"] == expected[original]


@pytest.mark.parametrize("api", ["caption", "transcribe"])
def test_compile_runs_every_batch_at_the_batch_size(api, monkeypatch):
    """With compile=True each actor call asks the pipeline for batch_size rows (a short last batch is filled up), so
    compiled towers and decode steps never compile again for it; eager calls keep each batch as it is."""
    calls = []

    def record(_ds, _task, _columns, _decode, run_batch, *_args, **_kwargs):
        calls.append(run_batch)

    monkeypatch.setattr(gemma3n_ray, "_map", record)
    getattr(gemma3n_ray, api)(None, model="tiny-random", batch_size=3, compile=True)
    getattr(gemma3n_ray, api)(None, model="tiny-random", batch_size=3)
    assert calls[0].keywords["batch_size"] == 3 and calls[0].keywords["compile"] is True
    assert "batch_size" not in calls[1].keywords
