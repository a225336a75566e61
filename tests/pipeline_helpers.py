"""Shared fixtures for the pipeline, CLI and multimodal generation tests.

``reference()``: a tiny multimodal checkpoint written by transformers (``Gemma3nForConditionalGeneration`` with the
tiny-random sizes: 4-layer decoder, MobileNet v5 at 1/16 width on 128x128 images, one-block audio conformer) plus the
tiny processor files. Its random weights come from a different seed than ``gemma3n.tiny_random``'s and are loaded into
the transformers model with a strict name check, so the file is transformers' own ``save_pretrained`` output.
Built once per test process.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gemma3n.processors import write_tiny_processor_files
from gemma3n.tiny_random import (
    AUDIO_SOFT_TOKENS,
    IMAGE_SIZE,
    VISION_SOFT_TOKENS,
    generation_config_dict,
    non_word_token_ids,
    random_tensors,
    tiny_config_dict,
)

REFERENCE_SEED = 7
SAMPLING_RATE = 16_000


@dataclass
class Reference:
    model: torch.nn.Module  # transformers Gemma3nForConditionalGeneration, fp32, eval
    path: Path


@functools.lru_cache(maxsize=1)
def reference() -> Reference:
    import transformers

    path = Path(tempfile.mkdtemp(prefix="gemma3n_pipeline_ref_"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    write_tiny_processor_files(
        path,
        image_size=(IMAGE_SIZE, IMAGE_SIZE),
        image_seq_length=VISION_SOFT_TOKENS,
        audio_seq_length=AUDIO_SOFT_TOKENS,
    )
    config_dict = tiny_config_dict()
    (path / "config.json").write_text(json.dumps(config_dict), encoding="utf-8")
    config = transformers.AutoConfig.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.Gemma3nForConditionalGeneration(config).eval()
    # Word tokens get random embeddings, the rest zero (as in tiny-random): decoded answers are then real text, so
    # comparing texts compares something.
    silent = non_word_token_ids(path / "tokenizer.json", keep=[1, 106])
    tensors = random_tensors(config_dict, REFERENCE_SEED, silent_ids=silent)
    own = model.state_dict()
    # transformers 5 builds no key/value projections for KV-shared layers; the published files still carry them.
    unused = {k for k in tensors if k not in own}
    assert all(".self_attn.k_" in k or ".self_attn.v_" in k for k in unused), sorted(unused)
    missing, unexpected = model.load_state_dict({k: v for k, v in tensors.items() if k in own}, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # lm_head is tied to embed_tokens
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps(generation_config_dict()), encoding="utf-8")
    return Reference(model, path)


def make_image(seed: int, size: tuple[int, int] = (150, 100)) -> Image.Image:
    """A smooth random-colour RGB image of ``size`` (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    channels = [np.sin(rng.uniform(2, 9) * x + rng.uniform(2, 9) * y + rng.uniform(0, 6)) for _ in range(3)]
    pixels = (np.stack(channels, -1) * 0.5 + 0.5) * 255
    return Image.fromarray(pixels.astype(np.uint8))


def make_audio(seconds: float, seed: int = 0, quiet_at: float | None = None) -> np.ndarray:
    """Speech-like float32 audio at 16 kHz: gliding tones under a syllable-rate envelope, plus a little noise.

    ``quiet_at``: a 0.2 s stretch of silence centred there (a natural cut point).
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SAMPLING_RATE)) / SAMPLING_RATE
    pitch = 180 + 40 * np.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * np.cumsum(pitch) / SAMPLING_RATE
    voice = np.sin(phase) + 0.5 * np.sin(2 * phase) + 0.25 * np.sin(3 * phase)
    envelope = 0.5 + 0.5 * np.sin(2 * math.pi * 4 * t) ** 2
    wave = 0.3 * voice * envelope + 0.01 * rng.standard_normal(t.shape)
    if quiet_at is not None:
        centre = int(quiet_at * SAMPLING_RATE)
        wave[centre - SAMPLING_RATE // 10 : centre + SAMPLING_RATE // 10] = 0.0
    return wave.astype(np.float32)


def image_chat(image, question: str = "Describe this image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def fewer_audio_tokens(source: Path, target: Path, tokens: int) -> Path:
    """A copy of checkpoint ``source`` whose config.json and processor_config.json hold ``tokens`` audio soft tokens
    per clip instead of 188 (the audio encoder's weights do not depend on the count)."""
    shutil.copytree(source, target)
    for name, key in (("config.json", "audio_soft_tokens_per_image"), ("processor_config.json", "audio_seq_length")):
        data = json.loads((target / name).read_text(encoding="utf-8"))
        data[key] = tokens
        (target / name).write_text(json.dumps(data), encoding="utf-8")
    return target
