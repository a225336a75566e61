"""Towers with streamed weights (``low_memory``, the default with ``quantize=``): same outputs, pages really dropped.

On the tiny multimodal checkpoint written by transformers (fp32, so every weight is a view of the memory-mapped file):
the towers' outputs are bit-identical (torch.equal) to the resident path's, call after call, and greedy generation
with an image and a clip gives the same tokens. Whether a weight page is in this process's memory is read from
/proc/self/pagemap (bit 63: page present), so the tests see what the kernel sees, not what the hooks claim.
"""

from __future__ import annotations

import mmap
import struct
import sys

import pytest
import torch
from pipeline_helpers import make_audio, make_image, reference
from vision_helpers import one_thread_fixture  # noqa: F401  (autouse: torch on one thread in this module)

import gemma3n
from gemma3n.encoders.vision import PrepackedConv2d
from gemma3n.low_memory import sequential_blocks

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux-only")
PAGE = mmap.PAGESIZE


def _whole_pages(tensors: list[torch.Tensor]) -> list[int]:
    """Page numbers lying wholly inside the given tensors' data."""
    pages = set()
    for t in tensors:
        begin, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        pages.update(range(-(-begin // PAGE), end // PAGE))
    return sorted(pages)


def _present(pages: list[int]) -> int:
    """How many of ``pages`` are mapped into this process's memory now (/proc/self/pagemap, bit 63)."""
    count = 0
    with open("/proc/self/pagemap", "rb") as fh:
        for page in pages:
            fh.seek(page * 8)
            (entry,) = struct.unpack("<Q", fh.read(8))
            count += entry >> 63
    return count


def _weights(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in module.parameters()]


@pytest.fixture(scope="module")
def models():
    path = reference().path
    streamed = gemma3n.load(path, quantize="int4")
    resident = gemma3n.load(path, quantize="int4", low_memory=False)
    return {"streamed": streamed, "resident": resident}


@pytest.fixture(scope="module")
def inputs(models):
    content = [
        {"type": "image", "image": make_image(1, (64, 96))},
        {"type": "audio", "audio": make_audio(2.0, seed=1)},
        {"type": "text", "text": "What do you see and hear?"},
    ]
    return models["streamed"].processor.apply_chat_template(
        [[{"role": "user", "content": content}]],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )


@pytest.fixture(scope="module")
def tower_calls(models, inputs):
    """Each model's tower outputs (two calls for the streamed one: the second re-reads the released pages) and how
    many of the towers' weight pages were present: after each tower call, and when the vision tower's last block
    starts (its earlier blocks' pages)."""
    pixels = inputs["pixel_values"].float()
    features, mask = inputs["input_features"].float(), inputs["input_features_mask"].bool()
    seen: dict = {}
    for name, model in models.items():
        vision, audio = model.vision_tower, model.audio_tower
        blocks = list(sequential_blocks(vision.timm_model))
        earlier = _whole_pages([w for block in blocks[:-1] for w in _weights(block)])
        pages = {"vision": _whole_pages(_weights(vision)), "audio": _whole_pages(_weights(audio))}
        seen[name] = {"pages": {k: len(v) for k, v in pages.items()}, "earlier_blocks": len(earlier)}
        record = blocks[-1].register_forward_pre_hook(lambda *_, s=seen[name], p=earlier: s.update(mid=_present(p)))
        with torch.inference_mode():
            for call in range(2 if name == "streamed" else 1):
                seen[name][f"vision_{call}"] = vision(pixels)
                seen[name]["vision_present"] = _present(pages["vision"])
                seen[name][f"audio_{call}"] = audio(features, mask)
                seen[name]["audio_present"] = _present(pages["audio"])
        record.remove()
    return seen


def test_streamed_towers_give_identical_outputs_and_tokens(models, inputs, tower_calls):
    streamed, resident = tower_calls["streamed"], tower_calls["resident"]
    for call in (0, 1):
        assert torch.equal(streamed[f"vision_{call}"], resident["vision_0"])
        for got, want in zip(streamed[f"audio_{call}"], resident["audio_0"], strict=True):  # encodings, valid mask
            assert torch.equal(got, want)
    got = models["streamed"].generate(**inputs, max_new_tokens=4)
    assert torch.equal(got, models["resident"].generate(**inputs, max_new_tokens=4))
    convs = [m for m in models["streamed"].vision_tower.modules() if isinstance(m, PrepackedConv2d)]
    assert convs and all(m._packed is None for m in convs)  # no packed copy kept
    assert any(
        m._packed is not None for m in models["resident"].vision_tower.modules() if isinstance(m, PrepackedConv2d)
    )


@pytest.mark.parametrize("tower", ["vision", "audio"])
def test_tower_weight_pages_are_released_after_the_call(tower_calls, tower):
    pages = tower_calls["streamed"]["pages"][tower]
    assert pages >= 8
    assert tower_calls["resident"][f"{tower}_present"] > 0.5 * pages  # read, and still mapped in
    assert tower_calls["streamed"][f"{tower}_present"] == 0, f"{tower}: of {pages} weight pages, some stay resident"


def test_each_block_is_released_before_the_last_block_runs(tower_calls):
    """Block by block, not only at the end: when the vision tower's last block starts, the earlier blocks' pages are
    gone (a few may be mapped back by the kernel's fault-around while the following weights are read)."""
    streamed, resident = tower_calls["streamed"], tower_calls["resident"]
    assert resident["mid"] > 0.5 * resident["earlier_blocks"]
    assert streamed["mid"] < 0.25 * streamed["earlier_blocks"], (streamed["mid"], streamed["earlier_blocks"])


def test_low_memory_defaults(models):
    path = reference().path
    assert models["streamed"]._tower_weight_hooks and not models["resident"]._tower_weight_hooks
    assert not gemma3n.load(path)._tower_weight_hooks  # no quantize: towers stay resident, as before
    model = gemma3n.load(path, low_memory=True)
    assert model._tower_weight_hooks
    convs = [m for m in model.vision_tower.modules() if isinstance(m, PrepackedConv2d)]
    assert not any(m.keep_packed for m in convs)
    model.stream_tower_weights(False)  # back to resident weights
    assert not model._tower_weight_hooks and all(m.keep_packed for m in convs)


def test_a_weight_changed_in_place_is_kept(inputs):
    """Pages of the copy-on-write map that were written hold the only copy of the new values: never released."""
    model = gemma3n.load(reference().path, low_memory=True)
    weight = model.audio_tower.conformer[0].ffw_layer_start.ffw_layer_1.weight
    doubled = weight.detach() * 2
    with torch.no_grad():
        weight.mul_(2)
    features, mask = inputs["input_features"].float(), inputs["input_features_mask"].bool()
    with torch.inference_mode():
        first = model.audio_tower(features, mask)[0]
        assert torch.equal(weight, doubled)
        assert torch.equal(model.audio_tower(features, mask)[0], first)
