"""One way to name a model: every entry point (gemma3n.load, Processor.from_pretrained, pipeline(), the CLI) takes a
checkpoint directory, "tiny-random" or a hub id through gemma3n.model_names; wrong models and devices are named."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from pipeline_helpers import reference

import gemma3n
from gemma3n import model_names
from gemma3n.config import ConfigError


@pytest.fixture
def named(monkeypatch):
    """ "tiny-random" and the hub id "google/gemma-3n-E2B-it" both lead to the pipeline tests' tiny checkpoint."""
    import huggingface_hub

    import gemma3n.tiny_random

    path = reference().path
    hub_calls = []

    def snapshot_download(repo_id, **kwargs):
        hub_calls.append(repo_id)
        return str(path)

    monkeypatch.setattr(gemma3n.tiny_random, "ensure_tiny_random", lambda: path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return path, hub_calls


@pytest.mark.parametrize("name", ["tiny-random", "google/gemma-3n-E2B-it"])
def test_every_entry_point_takes_the_same_names(named, name):
    path, hub_calls = named
    model = gemma3n.load(name, text_only=True)
    assert model.path == path
    processor = gemma3n.Processor.from_pretrained(name)
    assert processor.audio_seq_length == 188 and processor.tokenizer.bos_token == "<bos>"
    pipe = gemma3n.pipeline("text-generation", model=name, device="cpu", max_new_tokens=2)
    assert pipe.model.path == path and isinstance(pipe("Hi")[0]["generated_text"], str)
    assert hub_calls == ([] if name == "tiny-random" else [name] * 3)


def test_hub_failure_recommends_the_current_login_command(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(model_names.ModelNotFoundError) as info:
        gemma3n.load("google/gemma-3n-E2B-it")
    message = str(info.value)
    assert "`hf auth login`" in message and "huggingface-cli" not in message and "network unreachable" in message


def test_a_checkpoint_of_another_model_type_is_named(tmp_path):
    """A Llama checkpoint written by transformers: the error says what it is and what is supported, before any
    tensor is looked at."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as info:
        gemma3n.load(tmp_path)
    message = str(info.value)
    assert (
        "model_type is 'llama'" in message and "supported model types: gemma3n, gemma3n_text, gemma, gemma2" in message
    )
    assert "missing" not in message


def test_a_device_torch_does_not_know_is_named(named):
    path, _ = named
    with pytest.raises(ValueError, match=r"^device='tpu' is not a device torch knows"):
        gemma3n.load(path, device="tpu")
    with pytest.raises(ValueError, match=r"^ple_device='gpu0' is not a device torch knows"):
        gemma3n.load(path, ple_device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda', but torch finds no CUDA device"):
            gemma3n.load(path, device="cuda")
    model = gemma3n.load(path, text_only=True)
    with pytest.raises(ValueError, match=r"^device='tpu'"):
        gemma3n.pipeline("text-generation", model=model, device="tpu")


def test_name_resolution_and_the_package_import_without_torch():
    code = "import sys, gemma3n, gemma3n.model_names, gemma3n.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
