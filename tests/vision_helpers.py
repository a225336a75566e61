"""A tiny transformers Gemma 3n checkpoint (built once per process) and loaders for our vision pieces.

The vision tower is the real ``mobilenetv5_300m_enc`` architecture with channels scaled by 1/4 and
a 4x4 fusion grid (16 soft tokens). A 192x192 image gives a 12x12 stride-16 map that the fusion adapter
average-pools by 3, the same path as the published 768 -> 48x48 -> 16x16.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from audio_helpers import TINY_AUDIO
from torch import nn

from gemma3n.checkpoint import read_checkpoint_tensors
from gemma3n.config import Gemma3nConfig
from gemma3n.encoders.embedder import MultimodalEmbedder
from gemma3n.encoders.vision import VisionTower

IMAGE_SIZE = 192
SOFT_TOKENS = 16
VISION_MODEL_ARGS = {"channel_multiplier": 0.25, "msfa_output_resolution": 4}


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread for a while.

    The test machine's 2 cores are shared with other jobs; with 2 OpenMP threads an oversubscribed
    convolution net can run 10-30x slower than with 1 (measured here), so these tests use one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _perturb_constant_params(module: nn.Module, generator: torch.Generator) -> None:
    """Replace constant-initialised tensors (norm weights = 1, layer scales = 1e-5, zero biases) by random ones.

    With default init, norms and layer scales are near-identities and a wrong scale or a skipped
    block would go unnoticed.
    """
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.numel() < 2 or p.min() != p.max():
                continue
            noise = torch.rand(p.shape, generator=generator)
            if name.endswith("gamma"):  # layer scale
                p.copy_(0.05 + 0.25 * noise)
            elif float(p.flatten()[0]) == 1.0:  # norm weight
                p.copy_(0.5 + noise)
            else:  # bias
                p.copy_(0.1 * (noise - 0.5))


class _Reference:
    """The transformers model (eval, fp32) and the directory it was saved to."""

    def __init__(self) -> None:
        import transformers

        text = transformers.Gemma3nTextConfig(
            vocab_size=512,
            vocab_size_per_layer_input=512,
            hidden_size=64,
            hidden_size_per_layer_input=8,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            num_kv_shared_layers=0,
            laurel_rank=8,
            activation_sparsity_pattern=[0.0, 0.0],
            layer_types=["sliding_attention", "full_attention"],
        )
        audio = transformers.Gemma3nAudioConfig(**TINY_AUDIO)
        vision = transformers.Gemma3nVisionConfig(model_args=dict(VISION_MODEL_ARGS))
        config = transformers.Gemma3nConfig(
            text_config=text, audio_config=audio, vision_config=vision, vision_soft_tokens_per_image=SOFT_TOKENS
        )
        torch.manual_seed(0)
        model = transformers.Gemma3nForConditionalGeneration(config).eval()
        generator = torch.Generator().manual_seed(1)
        for part in (model.model.vision_tower, model.model.embed_vision, model.model.embed_audio):
            _perturb_constant_params(part, generator)
        self._tmp = tempfile.TemporaryDirectory(prefix="gemma3n_vision_ref_")
        self.path = Path(self._tmp.name)
        model.save_pretrained(self.path)
        self.model = model
        self.config = config


@functools.lru_cache(maxsize=1)
def reference() -> _Reference:
    """Built at most once per test session, shared by the vision and embedder tests."""
    return _Reference()


# Fixtures for the test modules that import them (a test module sees the fixtures in its namespace).


@pytest.fixture(scope="module", autouse=True, name="one_thread")
def one_thread_fixture() -> Iterator[None]:
    """Every test of the importing module runs torch on one thread (see ``single_thread``)."""
    with single_thread():
        yield


@pytest.fixture(scope="module", name="ref")
def ref_fixture() -> _Reference:
    """``ref``: the shared reference model and its checkpoint directory."""
    return reference()


def read_tensors(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return read_checkpoint_tensors(path, prefix)


def load_vision_tower(path: Path) -> VisionTower:
    """Meta-device build, then attach the checkpoint tensors (strict, assign)."""
    config = Gemma3nConfig.from_pretrained(path)
    with torch.device("meta"):
        tower = VisionTower(config.vision, config.vision_soft_tokens_per_image)
    tower.load_state_dict(read_tensors(path, "model.vision_tower."), strict=True, assign=True)
    return tower.eval()


def load_embedder(path: Path, modality: str) -> MultimodalEmbedder:
    config = Gemma3nConfig.from_pretrained(path)
    section = config.vision if modality == "vision" else config.audio
    with torch.device("meta"):
        embedder = MultimodalEmbedder.from_config(section, config.text)
    embedder.load_state_dict(read_tensors(path, f"model.embed_{modality}."), strict=True, assign=True)
    return embedder.eval()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).norm() / ref.double().norm())
