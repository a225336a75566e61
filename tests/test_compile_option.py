"""The compiled decode step is reachable from the pipelines (``compile=True``) and the CLI (``--compile``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch._inductor import config as inductor_config

import gemma3n
from gemma3n import cli, compile_policy
from gemma3n.encoders.fixed_batch import run_in_fixed_batches


@pytest.fixture(scope="module")
def pipe():
    return gemma3n.pipeline("text-generation", model="tiny-random", device="cpu", max_new_tokens=2)


def _record_generate(pipe, monkeypatch) -> list[dict]:
    calls: list[dict] = []
    original = pipe.model.generate

    def generate(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **{**kwargs, "compile": False})  # the compiled path itself: test_decode_speed.py

    monkeypatch.setattr(pipe.model, "generate", generate)
    return calls


def test_pipeline_passes_compile_to_generate(pipe, monkeypatch):
    calls = _record_generate(pipe, monkeypatch)
    first = pipe("Hello")[0]["generated_text"]
    second = pipe("Hello", compile=True)[0]["generated_text"]
    assert [c["compile"] for c in calls] == [False, True]
    assert first == second


def test_pipeline_compile_default_from_construction(monkeypatch):
    pipe = gemma3n.pipeline("text-generation", model="tiny-random", device="cpu", max_new_tokens=2, compile=True)
    calls = _record_generate(pipe, monkeypatch)
    pipe("Hello")
    pipe("Hello", compile=False)
    assert [c["compile"] for c in calls] == [True, False]


@pytest.mark.parametrize("flag", [[], ["--compile"]])
def test_cli_compile_flag(flag):
    args = cli.build_parser().parse_args(["caption", "--model", "tiny-random", *flag, "a.png"])
    assert cli._generation_settings(args).get("compile", False) is bool(flag)


# ---- the towers: compile=True / --compile also compile the encoder a batch uses, at one batch size ----------------


class CompileRecorder:
    """Stands in for ``torch.compile``: records what was compiled and the batch of every call, and runs it eagerly
    (the real compiled towers are checked against the reference in test_vision_encoder / test_audio_encoder)."""

    def __init__(self):
        self.compiled: list[tuple[str, dict]] = []
        self.batches: dict[str, list[int]] = {}
        self.freezing: dict[str, list[bool]] = {}  # inductor's freezing setting during each call (when it compiles)

    def __call__(self, fn, **options):
        name = getattr(fn, "__name__", repr(fn))
        self.compiled.append((name, options))

        def run(*args, **kwargs):
            first = next(a for a in args if isinstance(a, torch.Tensor))  # decode_step takes the model first
            self.batches.setdefault(name, []).append(first.shape[0])
            self.freezing.setdefault(name, []).append(inductor_config.freezing)
            return fn(*args, **kwargs)

        return run


@pytest.fixture
def recorder(monkeypatch) -> CompileRecorder:
    recorder = CompileRecorder()
    monkeypatch.setattr(torch, "compile", recorder)
    return recorder


def _images(n: int):
    return [Image.fromarray(np.full((40 + 8 * i, 56, 3), 30 * i, dtype=np.uint8)) for i in range(n)]


def test_run_in_fixed_batches_fills_and_drops():
    calls = []

    def rowwise(x, mask):
        calls.append(x.shape[0])
        return x * 2, mask & (x.sum(dim=1) > 0)

    x, mask = torch.arange(1.0, 15.0).reshape(7, 2), torch.tensor([True, False, True, True, False, True, True])
    out, kept = run_in_fixed_batches(rowwise, 3, x, mask)
    assert calls == [3, 3, 3]  # 3 + 3 + 1 filled up to 3
    assert torch.equal(out, x * 2) and torch.equal(kept, mask)
    assert torch.equal(run_in_fixed_batches(lambda t: t + 1, 4, x[:2]), x[:2] + 1)  # one filled chunk, a tensor out
    calls.clear()
    out, kept = run_in_fixed_batches(rowwise, 3, x, mask, fill=False)  # any-batch functions: the last chunk as it is
    assert calls == [3, 3, 1] and torch.equal(out, x * 2) and torch.equal(kept, mask)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run_in_fixed_batches(rowwise, 0, x, mask)


def test_pipeline_compile_compiles_the_vision_tower_once_for_one_image_per_call(recorder):
    pipe = gemma3n.pipeline("image-to-text", model="tiny-random", device="cpu", max_new_tokens=2, batch_size=2)
    tower = pipe.model.vision_tower
    assert not tower.compile_enabled  # compiled only when a compiled call needs it
    image = _images(1)
    compiled = pipe(image, compile=True)  # one prompt, filled up to the batch of 2 with a copy of itself
    names = [name for name, _ in recorder.compiled]
    assert names.count("forward_features") == 1 and names.count("decode_step") == 1
    assert set(recorder.freezing["forward_features"]) == {True}  # weights frozen into the compiled tower
    # On CPU the tower runs image by image (VisionTower.cpu_images_per_call), so it is compiled for batches of 1:
    # the prompt batch of 2 (the image and its filler copy) takes two calls.
    assert recorder.batches["forward_features"] == [1, 1] and tower.compiled_batch_size == 1
    assert set(recorder.batches["decode_step"]) == {2}  # the compiled shapes: no recompilation for a short batch
    # Eager decoding of the image alone (batch 1) with the same compiled tower; the filler row changed nothing for the
    # real one (fp32, same prompt, no padding: only kernel blocking could differ).
    assert pipe(image, batch_size=1) == compiled
    assert recorder.batches["forward_features"] == [1, 1, 1] and len(recorder.compiled) == len(names)  # no new compile


def test_cli_compile_compiles_the_tower_at_the_batch_size(recorder, tmp_path, capsys):
    _images(1)[0].save(tmp_path / "a.png")
    args = [
        "caption",
        str(tmp_path),
        "--model",
        "tiny-random",
        "--compile",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "2",
    ]
    assert cli.main(args) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert [name for name, _ in recorder.compiled].count("forward_features") == 1
    assert recorder.batches["forward_features"] == [1, 1]  # the one file filled up to --batch-size, image by image
    assert set(recorder.batches["decode_step"]) == {2}


@pytest.mark.filterwarnings("ignore:the transcript of")  # tiny-random never ends a transcript by itself
def test_pipeline_compile_compiles_the_audio_encoder_at_its_batch_size(recorder):
    pipe = gemma3n.pipeline("asr", model="tiny-random", device="cpu", max_new_tokens=2, batch_size=2)
    wave = np.random.default_rng(0).uniform(-0.5, 0.5, 16_000).astype(np.float32)  # 1 s: one window
    pipe(wave, compile=True)  # the one window filled up to the batch of 2
    assert [name for name, _ in recorder.compiled].count("encode") == 1
    assert recorder.batches["encode"] == [2] and pipe.model.audio_tower.compiled_batch_size == 2
    assert not pipe.model.vision_tower.compile_enabled  # only the tower the batch uses


# ---- compile="auto" (the default): the decode steps compile when the planned decoding pays for it -------------------


def test_e2b_decode_weight_bytes_and_break_even_steps():
    """E2B (meta device, bf16): a decode step reads 4.84 GB (the benchmark's figure), so "auto" compiles a job from
    ceil(PAYS_AFTER_BYTES / 4.84 GB) planned steps on, and not one step earlier."""
    from gemma3n.config import Gemma3nConfig
    from gemma3n.model import Gemma3n
    from gemma3n.presets import preset_config_dict

    with torch.device("meta"):
        model = Gemma3n(Gemma3nConfig.from_dict(preset_config_dict("e2b"))).to(torch.bfloat16)
    step_bytes = compile_policy.decode_weight_bytes(model)
    assert abs(step_bytes / 1e9 - 4.84) < 0.01
    assert compile_policy.weight_format(model) == "bf16"
    assert not compile_policy.compile_pays(model, 10**6)  # on the meta device: never (only the CPU compiles)
    break_even = -(-int(compile_policy.PAYS_AFTER_BYTES["bf16"]) // step_bytes)
    assert 500 < break_even < 2000  # minutes of compile against ~0.2 s saved per step (README, CPU decoding)


@pytest.fixture
def cheap_compile(monkeypatch):
    """Thresholds low enough for tiny-random: ``"auto"`` pays from ``steps`` planned steps on."""

    def set_steps(model, steps: int) -> None:
        size = compile_policy.decode_weight_bytes(model)
        fmt = compile_policy.weight_format(model)
        assert fmt is not None, "float32 models never compile under 'auto'"
        monkeypatch.setitem(compile_policy.PAYS_AFTER_BYTES, fmt, steps * size)

    return set_steps


def test_auto_decides_from_planned_steps_weight_format_and_device(cheap_compile):
    model = gemma3n.load("tiny-random", device="cpu", dtype=torch.bfloat16, text_only=True)
    cheap_compile(model, 8)
    assert compile_policy.planned_decode_steps(5, 2, 4) == 12
    assert not compile_policy.compile_pays(model, 7) and compile_policy.compile_pays(model, 8)
    assert compile_policy.resolve_compile(model, "auto", 7) is False
    assert compile_policy.resolve_compile(model, "auto", 8) == "decode"
    assert compile_policy.resolve_compile(model, True, 1) is True
    assert compile_policy.resolve_compile(model, False, 9) is False
    fp32 = gemma3n.load("tiny-random", device="cpu", dtype=torch.float32, text_only=True)
    assert compile_policy.weight_format(fp32) is None and not compile_policy.compile_pays(fp32, 10**9)
    with pytest.raises(ValueError, match="compile must be True, False, 'auto' or 'decode', got 'yes'"):
        compile_policy.check_compile_option("yes")


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_weight_format_of_quantized_models(quantize):
    model = gemma3n.load("tiny-random", device="cpu", dtype=torch.bfloat16, text_only=True, quantize=quantize)
    assert compile_policy.weight_format(model) == quantize


def test_generate_auto_compiles_only_when_max_new_tokens_pay(recorder, cheap_compile):
    model = gemma3n.load("tiny-random", device="cpu", dtype=torch.bfloat16, text_only=True)
    cheap_compile(model, 6)
    ids = torch.tensor([[2, 10, 11, 12]])
    short = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert recorder.compiled == []  # default "auto", 5 steps: eager
    model.generate(ids, max_new_tokens=6, do_sample=False)
    assert [name for name, _ in recorder.compiled].count("decode_step") == 1  # (and the kernel probes, once)
    assert model.generate(ids, max_new_tokens=5, do_sample=False, compile=False).tolist() == short.tolist()


def test_pipeline_auto_compiles_the_decode_steps_of_a_long_job_but_not_the_towers(recorder, cheap_compile):
    pipe = gemma3n.pipeline(
        "image-to-text", model="tiny-random", device="cpu", dtype="bfloat16", max_new_tokens=2, batch_size=2
    )
    cheap_compile(pipe.model, 4)  # 2 images at batch 2: 2 steps, eager; 3 images: 2 batches, 4 steps, compiled
    pipe(_images(2))
    assert recorder.compiled == []
    pipe(_images(3))
    assert [name for name, _ in recorder.compiled].count("decode_step") == 1
    assert set(recorder.batches["decode_step"]) == {2}  # the last batch of one image is filled up to 2
    assert not pipe.model.vision_tower.compile_enabled  # towers compile only with compile=True


def test_cli_compile_auto_decides_once_for_the_job(recorder, cheap_compile, tmp_path, capsys, monkeypatch):
    for i, image in enumerate(_images(3)):
        image.save(tmp_path / f"{i}.png")
    base = ["caption", str(tmp_path), "--model", "tiny-random", "--dtype", "bfloat16", "--batch-size", "2"]
    base += ["--max-new-tokens", "2"]
    loaded = []
    original = cli.load_pipeline

    def load_pipeline(task, args, **kwargs):
        pipe = original(task, args, **kwargs)
        cheap_compile(pipe.model, 4)  # 3 files at batch 2, 2 new tokens: 4 planned steps
        loaded.append(pipe)
        return pipe

    monkeypatch.setattr(cli, "load_pipeline", load_pipeline)
    assert cli.main([*base, "--no-compile", "--output", str(tmp_path / "off.jsonl")]) == 0
    assert recorder.compiled == []
    assert cli.main([*base, "--output", str(tmp_path / "auto.jsonl")]) == 0  # the default: "auto"
    assert "compiling the decode steps (4 planned steps pay for it" in capsys.readouterr().err
    assert [name for name, _ in recorder.compiled].count("decode_step") == 1
    assert set(recorder.batches["decode_step"]) == {2} and not loaded[-1].model.vision_tower.compile_enabled
    assert cli._generation_settings(cli.build_parser().parse_args([*base, "--no-compile"]))["compile"] is False
