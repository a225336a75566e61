"""Shared fixtures: small random Gemma 3n models built and saved by transformers (the reference)."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

LAYER_TYPES_6 = [
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
]


def text_config(**overrides):
    """A tiny Gemma3nTextConfig exercising every decoder feature; overrides change single settings."""
    from transformers import Gemma3nTextConfig

    settings = dict(
        vocab_size=300,
        vocab_size_per_layer_input=280,
        hidden_size=64,
        intermediate_size=[128, 96, 128, 64, 128, 96],
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=5,
        layer_types=LAYER_TYPES_6,
        num_kv_shared_layers=2,
        altup_num_inputs=4,
        laurel_rank=8,
        hidden_size_per_layer_input=8,
        activation_sparsity_pattern=[0.95, 0.0, 0.8, 0.0, 0.0, 0.0],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    settings.update(overrides)
    return Gemma3nTextConfig(**settings)


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Replace every weight with random values (norm scales near 1): the reference init leaves many at 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen)
        if "norm" in name:
            param.copy_(1 + 0.2 * noise)
        else:
            param.copy_(0.1 * noise)
    return model.eval()


def save_reference_lm(directory, config, *, seed: int = 0, max_shard_size=None):
    """Build a random Gemma3nForCausalLM with transformers and save_pretrained it; returns the reference model."""
    from transformers import Gemma3nForCausalLM

    torch.manual_seed(seed)
    model = randomize(Gemma3nForCausalLM(config), seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model


def use_dequantized_weights(float_text: torch.nn.Module, quantized: dict[str, torch.nn.Module]) -> int:
    """Put, into a float text model, a plain bias-free ``nn.Linear`` holding the dequantized weight of each quantized
    module (``{name in the text model: Int8Linear / Int4Linear}``; ``"lm_head"`` becomes the LM head). Returns the
    count."""
    for name, module in quantized.items():
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=False)
        linear.weight = torch.nn.Parameter(module.dequantized(), requires_grad=False)
        if name == "lm_head":
            float_text.lm_head = linear
        else:
            float_text.set_submodule(name, linear)
    return len(quantized)


def int4_kernel_input_step(x: torch.Tensor, group: int) -> torch.Tensor:
    """[m, in] float64: the most the int4 row kernel's rounding of bf16 rows x [m, in] to 8 bits per group of
    ``group`` inputs moves each value (half a step, the group's largest |x| / 254)."""
    groups = x.double().abs().view(len(x), -1, group)
    return (groups.amax(-1, keepdim=True) / 254).expand_as(groups).reshape(len(x), -1)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """(reference model, checkpoint dir) for the default tiny text config, saved sharded."""
    directory = tmp_path_factory.mktemp("tiny_lm")
    ref = save_reference_lm(directory, text_config(), max_shard_size="200KB")
    return ref, directory
