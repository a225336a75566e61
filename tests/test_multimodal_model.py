"""End-to-end multimodal logits against transformers: images, audio, both, several per prompt, left padding.

Tolerance: fp32 logits within 1e-5 relative over real tokens (measured ~1e-7).
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import pytest
import torch
from audio_helpers import TINY_AUDIO
from audio_helpers import _randomise as randomise_audio
from conftest import randomize, rel_err
from vision_helpers import VISION_MODEL_ARGS, _perturb_constant_params, single_thread

import gemma3n

IMG = dict(boi=500, eoi=512, image=513)
AUD = dict(boa=501, eoa=528, audio=529)
IMAGE_TOKENS, AUDIO_TOKENS, IMAGE_SIZE = 16, 16, 96


@functools.lru_cache(maxsize=1)
def reference():
    import transformers

    text = transformers.Gemma3nTextConfig(
        vocab_size=544,
        vocab_size_per_layer_input=512,
        hidden_size=64,
        hidden_size_per_layer_input=8,
        intermediate_size=[128, 96, 128, 64],
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_kv_shared_layers=2,
        laurel_rank=8,
        sliding_window=6,
        activation_sparsity_pattern=[0.9, 0.0, 0.0, 0.0],
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    audio = transformers.Gemma3nAudioConfig(**TINY_AUDIO, vocab_size=16, vocab_offset=528)
    vision = transformers.Gemma3nVisionConfig(
        model_args=dict(VISION_MODEL_ARGS), hidden_size=2048, vocab_size=16, vocab_offset=512
    )
    config = transformers.Gemma3nConfig(
        text_config=text,
        audio_config=audio,
        vision_config=vision,
        vision_soft_tokens_per_image=IMAGE_TOKENS,
        audio_soft_tokens_per_image=AUDIO_TOKENS,
        boi_token_id=IMG["boi"],
        eoi_token_id=IMG["eoi"],
        image_token_id=IMG["image"],
        boa_token_id=AUD["boa"],
        eoa_token_id=AUD["eoa"],
        audio_token_id=AUD["audio"],
    )
    torch.manual_seed(0)
    model = transformers.Gemma3nForConditionalGeneration(config).eval()
    randomize(model.model.language_model, seed=3)
    randomize(model.model.embed_vision, seed=4)
    randomize(model.model.embed_audio, seed=5)
    _perturb_constant_params(model.model.vision_tower, torch.Generator().manual_seed(6))
    randomise_audio(model.model.audio_tower, seed=7)
    path = Path(tempfile.mkdtemp(prefix="gemma3n_mm_"))
    model.save_pretrained(path)
    return model, path


def _prompt(parts: list) -> list[int]:
    ids = [2]
    for part in parts:
        if part == "image":
            ids += [IMG["boi"]] + [IMG["image"]] * IMAGE_TOKENS + [IMG["eoi"]]
        elif part == "audio":
            ids += [AUD["boa"]] + [AUD["audio"]] * AUDIO_TOKENS + [AUD["eoa"]]
        else:
            ids += list(part)
    return ids


def _batch(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids, mask


def _features(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lengths), max(lengths), 16, generator=gen)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
        feats[i, n:] = -11.5  # log(1e-5): what the feature extractor pads with
    return feats, mask


CASES = {
    "images": ([["hello", "image", (7, 8, 9)], [(5,), "image", "image", (3, 4)]], 3, []),
    "audio": ([[(11, 12), "audio"], ["audio", (13,)]], 0, [120, 57]),
    "both": ([[(20,), "image", (21, 22), "audio", (23,)], [(24,), "audio", "image", "image"]], 3, [150, 90]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_multimodal_logits_match_reference(case):
    ref, path = reference()
    ours = gemma3n.load(path, dtype=torch.float32)
    prompts, n_images, clip_lengths = CASES[case]
    prompts = [[tuple(range(30, 35)) if p == "hello" else p for p in prompt] for prompt in prompts]
    ids, mask = _batch([_prompt(p) for p in prompts])
    inputs = {}
    if n_images:
        inputs["pixel_values"] = torch.rand(
            n_images, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1)
        )
    if clip_lengths:
        inputs["input_features"], inputs["input_features_mask"] = _features(clip_lengths)
    with torch.no_grad(), single_thread():
        expected = ref(input_ids=ids, attention_mask=mask, **inputs).logits
        got = ours(ids, attention_mask=mask, **inputs).logits
    err = rel_err(got[mask.bool()], expected[mask.bool()])
    assert err <= 1e-5, f"{case}: relative error {err:.3e}"


def test_placeholder_count_mismatch_is_a_clear_error():
    _, path = reference()
    ours = gemma3n.load(path, dtype=torch.float32)
    ids, mask = _batch([_prompt([(5,), "image", (6,)])])
    two_images = torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match=r"holds 16 <image_soft_token> tokens but 2 image input\(s\) give 32"):
        ours(ids, attention_mask=mask, pixel_values=two_images)
    with pytest.raises(ValueError, match="audio placeholders"):
        ours(ids, attention_mask=mask, input_features=_features([50])[0], input_features_mask=_features([50])[1])


def test_text_only_load_of_multimodal_checkpoint():
    ref, path = reference()
    ours = gemma3n.load(path, dtype=torch.float32, text_only=True)
    assert not hasattr(ours, "vision_tower") and not hasattr(ours, "audio_tower")
    ids, mask = _batch([[2, 40, 41, 42, 43], [2, 44, 45]])
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    assert rel_err(got[mask.bool()], expected[mask.bool()]) <= 1e-5
