"""Tiny transformers Gemma 3n checkpoints for the audio-encoder parity tests, and loaders for our encoder.

Each checkpoint is a full ``Gemma3nForConditionalGeneration`` (tiny text model, timm's ``test_resnet`` as vision tower)
written with ``save_pretrained``, so the audio weights sit under their published ``model.audio_tower.`` prefix.
Built once per process and per audio config.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from gemma3n.checkpoint import read_checkpoint_tensors
from gemma3n.config import Gemma3nConfig
from gemma3n.encoders.audio import AudioEncoder

PREFIX = "model.audio_tower."
MEL_FLOOR_LOG = math.log(1e-5)  # what the feature extractor gives for padded (silent) frames

# Published structure (chunk 12, context 13 / 0, reduction 4, conv kernel 5, strides 2x2 twice), small sizes.
PUBLISHED_LIKE = dict(
    input_feat_size=128,
    hidden_size=96,
    conf_num_hidden_layers=3,
    conf_num_attention_heads=4,
    sscp_conv_channel_size=[32, 16],
)
# The smallest working tower, for tests about the whole model rather than the encoder.
TINY_AUDIO = dict(
    hidden_size=32,
    conf_num_attention_heads=2,
    conf_num_hidden_layers=1,
    sscp_conv_channel_size=[8, 4],
    input_feat_size=16,
)
# Everything that could be hard-coded changed: chunking, context (with look-ahead), conv kernels and strides,
# reduction, mel bins, head count; and a gradient_clipping low enough that the clamps really cut.
ALTERNATE = dict(
    input_feat_size=64,
    hidden_size=72,
    conf_num_hidden_layers=2,
    conf_num_attention_heads=3,
    conf_attention_chunk_size=8,
    conf_attention_context_left=6,
    conf_attention_context_right=2,
    conf_conv_kernel_size=3,
    conf_reduction_factor=2,
    conf_attention_logit_cap=8.0,
    gradient_clipping=2.0,
    sscp_conv_channel_size=[24, 12],
    sscp_conv_kernel_size=[[5, 3], [3, 5]],
    sscp_conv_stride_size=[[3, 2], [2, 3]],
)


def _randomise(module: nn.Module, seed: int) -> None:
    """Replace the default init (norm weights = 1, per_dim_scale = 0, tiny matrices) by O(1)-activation values, so a
    wrong scale, a skipped norm or a swapped weight cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("per_dim_scale"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:  # norm weights
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            else:  # linear / conv: unit-variance outputs for unit-variance inputs
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p[0].numel()))


@functools.cache
def _reference(audio_json: str) -> tuple[nn.Module, Path]:
    from transformers import (
        Gemma3nAudioConfig,
        Gemma3nForConditionalGeneration,
        Gemma3nTextConfig,
        Gemma3nVisionConfig,
    )
    from transformers import Gemma3nConfig as RefConfig

    torch.manual_seed(0)
    text = Gemma3nTextConfig(
        vocab_size=512,
        vocab_size_per_layer_input=512,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=0,
        laurel_rank=4,
        layer_types=["sliding_attention", "full_attention"],
        activation_sparsity_pattern=[0.0, 0.0],
    )
    vision = Gemma3nVisionConfig(architecture="test_resnet", hidden_size=32, vocab_size=16, vocab_offset=512)
    audio = Gemma3nAudioConfig(vocab_size=16, vocab_offset=528, **json.loads(audio_json))
    model = Gemma3nForConditionalGeneration(RefConfig(text_config=text, vision_config=vision, audio_config=audio))
    tower = model.model.audio_tower.eval()
    _randomise(tower, seed=1234)
    path = Path(tempfile.mkdtemp(prefix="gemma3n_audio_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    model.save_pretrained(path)
    return tower, path


def reference(audio_kwargs: dict) -> tuple[nn.Module, Path]:
    """(transformers audio tower in fp32 eval mode, directory of the saved full checkpoint)."""
    return _reference(json.dumps(audio_kwargs, sort_keys=True))


def load_encoder(path: Path, dtype: torch.dtype = torch.float32, **overrides) -> AudioEncoder:
    """Our encoder built on the meta device and given the checkpoint's tensors (meta-device contract)."""
    config = Gemma3nConfig.from_pretrained(path).audio
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        encoder = AudioEncoder(config)
    tensors = read_checkpoint_tensors(path, PREFIX)
    encoder.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=True, assign=True)
    return encoder.eval()


def log_mel_like(lengths: list[int], bins: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random log-mel-like features [B, max(lengths), bins] (spectral tilt + slow drift + noise) and the valid-frame
    mask [B, T]; padded frames hold the silence value the feature extractor produces, not zeros."""
    gen = torch.Generator().manual_seed(seed)
    steps = max(lengths)
    tilt = torch.linspace(1.0, -3.0, bins)
    drift = torch.cumsum(torch.randn(len(lengths), steps, 1, generator=gen) * 0.2, dim=1)
    feats = -5.0 + tilt + drift + 1.5 * torch.randn(len(lengths), steps, bins, generator=gen)
    mask = torch.arange(steps)[None, :] < torch.tensor(lengths)[:, None]
    feats = feats.masked_fill(~mask[..., None], MEL_FLOOR_LOG)
    return feats, mask


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()
