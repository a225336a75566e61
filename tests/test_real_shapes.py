"""The published E2B / E4B shapes build on the meta device with the reference's parameter counts."""

from __future__ import annotations

import pytest
import torch

from gemma3n.config import Gemma3nConfig
from gemma3n.model import Gemma3n
from gemma3n.presets import preset_config_dict


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name,layers,shared,width", [("e2b", 30, 10, 8192), ("e4b", 35, 15, 16384)])
def test_published_shapes_match_reference_parameter_counts(name, layers, shared, width):
    from transformers import Gemma3nConfig as RefConfig
    from transformers import Gemma3nForConditionalGeneration

    data = preset_config_dict(name)
    config = Gemma3nConfig.from_dict(data)
    assert config.text.num_hidden_layers == layers and config.text.num_kv_shared_layers == shared
    assert config.text.intermediate_size == [width] * layers
    with torch.device("meta"):
        ours = Gemma3n(config)
        ref = Gemma3nForConditionalGeneration(RefConfig(**data)).model
    parts = ["language_model", "vision_tower", "audio_tower", "embed_vision", "embed_audio"]
    for part in parts:
        assert _count(getattr(ours, part)) == _count(getattr(ref, part)), part
    total = sum(_count(getattr(ours, p)) for p in parts)
    assert total == _count(ref)
    # published sizes: ~5.4B (E2B) and ~7.8B (E4B) parameters in all, of which the per-layer table is
    # 262144 x (layers x 256)
    ple = ours.language_model.embed_tokens_per_layer.weight.numel()
    assert ple == 262_144 * layers * 256
    print(f"{name}: total {total / 1e9:.3f}B parameters, per-layer table {ple / 1e9:.3f}B")
