"""End to end: conversations with images and audio -> the reference Gemma3nProcessor's exact model inputs.

Tolerances: ids / masks exact; pixel_values max abs <= 1e-5; input_features max abs <= 1e-4.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch

from gemma3n.processors import BatchInputs, Processor

try:
    from test_processor_utils import our_processor, reference_processor, tiny_dir
except ImportError:  # tests/ used as a package
    from .test_processor_utils import our_processor, reference_processor, tiny_dir

TOLERANCES = {"pixel_values": 1e-5, "input_features": 1e-4}


def assert_inputs_equal(ours: dict, reference: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        a, b = ours[key], reference[key]
        assert isinstance(a, torch.Tensor) and a.shape == b.shape, (key, getattr(a, "shape", None), b.shape)
        if key in TOLERANCES:
            assert a.dtype == torch.float32
            err = (a - b).abs().max().item()
            assert err <= TOLERANCES[key], (key, err)
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), key


def conversation(seed: int, image_path: str) -> list[dict]:
    rng = np.random.default_rng(seed)
    picture = PIL.Image.fromarray(rng.integers(0, 256, (41 + seed, 67, 3), dtype=np.uint8))
    clip = (0.1 * rng.standard_normal(16000 + 3000 * seed)).astype(np.float32)
    return [
        {"role": "system", "content": [{"type": "text", "text": "You describe media."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": picture},
                {"type": "text", "text": f"Prompt {seed}: what is shown and said?"},
                {"type": "audio", "audio": clip},
                {"type": "image", "url": image_path},
            ],
        },
    ]


KEYS = ("input_ids", "attention_mask", "token_type_ids", "pixel_values", "input_features", "input_features_mask")


def test_chat_with_images_and_audio_matches_reference(tmp_path):
    path = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(9).integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(path)
    messages = conversation(0, str(path))
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    reference = reference_processor().apply_chat_template(messages, **kwargs)
    ours = our_processor().apply_chat_template(messages, **kwargs)
    assert isinstance(ours, BatchInputs) and set(ours) == set(KEYS) == set(reference)
    assert_inputs_equal(ours, reference, KEYS)
    ids = ours["input_ids"][0]
    assert int((ids == 262145).sum()) == 2 * 256 and int((ids == 262273).sum()) == 188
    assert ours["pixel_values"].shape == (2, 3, 64, 64)


def test_batch_of_conversations_matches_reference(tmp_path):
    path = tmp_path / "photo.png"
    PIL.Image.fromarray(np.random.default_rng(10).integers(0, 256, (60, 20, 3), dtype=np.uint8)).save(path)
    batch = [conversation(1, str(path)), conversation(2, str(path))]
    batch[1][1]["content"][1]["text"] += " Please answer in a long and detailed way."  # different lengths
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt"}
    reference = reference_processor().apply_chat_template(batch, processor_kwargs={"padding": True}, **kwargs)
    ours = our_processor().apply_chat_template(batch, **kwargs)
    assert_inputs_equal(ours, reference, KEYS)
    assert ours["attention_mask"][0, 0] == 0 and ours["attention_mask"][1, 0] == 1  # left padding
    texts = our_processor().apply_chat_template(batch, add_generation_prompt=True)
    assert texts == reference_processor().apply_chat_template(batch, add_generation_prompt=True)


def test_processor_call_and_token_types_match_reference():
    rng = np.random.default_rng(3)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8))]
    audio = [(0.05 * rng.standard_normal(12000)).astype(np.float32)]
    text = "<start_of_turn>user\n<image_soft_token> and <audio_soft_token>?<end_of_turn>\n<start_of_turn>model\n"
    reference = reference_processor()(text=text, images=images, audio=audio, return_tensors="pt")
    ours = our_processor()(text=text, images=images, audio=audio)
    assert set(ours) == set(reference)
    assert_inputs_equal(ours, reference, KEYS)
    assert int((ours["token_type_ids"] == 1).sum()) == 256 and int((ours["token_type_ids"] == 3).sum()) == 188
    assert ours["input_ids"][0, :2].tolist() == [2, 105]  # processor() adds <bos> (the template already has it)


def test_nested_processor_config_layout(tmp_path):
    """transformers v5 layout: processor_config.json holds image_processor / feature_extractor sections."""
    directory = tmp_path / "proc"
    shutil.copytree(tiny_dir(), directory)
    flat = json.loads((directory / "preprocessor_config.json").read_text())
    (directory / "preprocessor_config.json").unlink()
    image_keys = ("size", "resample", "do_resize", "do_rescale", "rescale_factor", "do_normalize", "image_mean")
    nested = {
        "processor_class": "Gemma3nProcessor",
        "image_seq_length": 7,
        "audio_seq_length": 5,
        "image_processor": {k: flat[k] for k in (*image_keys, "image_std", "image_processor_type")},
        "feature_extractor": {k: v for k, v in flat.items() if k not in image_keys},
    }
    nested["image_processor"]["size"] = {"height": 32, "width": 48}
    (directory / "processor_config.json").write_text(json.dumps(nested))
    processor = Processor.from_pretrained(directory)
    assert processor.image_seq_length == 7 and processor.audio_seq_length == 5
    assert (processor.image_processor.settings.height, processor.image_processor.settings.width) == (32, 48)
    out = processor(
        text="<image_soft_token><audio_soft_token>", images=[np.zeros((9, 9, 3), np.uint8)], audio=[np.zeros(800)]
    )
    assert out["pixel_values"].shape == (1, 3, 32, 48)
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 7
    assert int((out["input_ids"] == processor.audio_token_id).sum()) == 5


def test_processor_from_components_uses_defaults():
    processor = Processor(our_processor().tokenizer)  # published image / audio settings, default template
    assert processor.image_processor.settings.height == 768 and processor.feature_extractor.sampling_rate == 16000
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Caption?"}]}]
    expected = reference_processor().apply_chat_template(messages, add_generation_prompt=True)
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == expected


def test_batch_inputs_move_and_cast():
    out = our_processor()(text="<image_soft_token>", images=[np.zeros((8, 8, 3), np.uint8)])
    moved = out.to("cpu", dtype=torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16
    assert moved.input_ids.dtype == torch.long and moved["attention_mask"].dtype == torch.long
    with pytest.raises(AttributeError):
        _ = out.not_a_key


def test_text_defaults_to_placeholders_and_errors():
    processor = our_processor()
    out = processor(images=[[np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8, 3), np.uint8)] * 2])
    assert out["input_ids"].shape[0] == 2
    assert int((out["input_ids"] == processor.image_token_id).sum()) == 3 * 256
    with pytest.raises(ValueError, match="provide at least one"):
        processor()
    with pytest.raises(TypeError, match="text must be a string"):
        processor(text=[1, 2])
    with pytest.raises(ValueError, match="return_tensors"):
        processor(text="hi", return_tensors="tf")
