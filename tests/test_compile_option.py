"""The compiled decode step is reachable from the pipelines (``compile=True``) and the CLI (``--compile``)."""

from __future__ import annotations

import pytest

import gemma3n
from gemma3n import cli


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
