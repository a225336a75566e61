"""Images: gemma3n's pixel_values vs transformers' SiglipImageProcessor (torchvision backend) on the same inputs.

Tolerance: max |ours - reference| <= 1e-5 (values in [0, 1]); shapes [n, 3, H, W] float32.
Most tests use a 64x64 processor config; one runs at the published 768x768.
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from gemma3n.processors import ConfigError, ImageProcessor, ImageSettings, Processor

try:
    from test_processor_utils import our_processor, reference_processor, tiny_dir, tiny_dir_with_changed_json
except ImportError:  # tests/ used as a package
    from .test_processor_utils import our_processor, reference_processor, tiny_dir, tiny_dir_with_changed_json

ATOL = 1e-5
IMAGE = "<image_soft_token>"


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = PIL.Image.fromarray(rng.integers(0, 2**16, (height, width), dtype=np.uint16))
        assert image.mode == "I;16"
        return image
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "RGBA":
        rgba = np.concatenate([np.asarray(rgb), rng.integers(0, 256, (height, width, 1), dtype=np.uint8)], axis=2)
        return PIL.Image.fromarray(rgba, mode="RGBA")
    if mode == "P":
        return rgb.quantize(colors=37)
    return rgb.convert(mode)


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = (ours - ref.to(torch.float32)).abs().max().item()
    assert err <= ATOL, f"max abs error {err:.3g} > {ATOL}"


def reference_pixels(images, **kwargs) -> torch.Tensor:
    processor = reference_processor().image_processor
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16", "CMYK"])
def test_pil_modes_and_odd_sizes_match_reference(mode):
    images = [random_image(37, 53, mode, seed=1), random_image(101, 80, mode, seed=2), random_image(20, 9, mode, 3)]
    ours = our_processor().image_processor(images)
    # The published config leaves do_convert_rgb unset (null), and the reference then feeds non-RGB images through
    # unconverted (1- or 4-channel pixel values the vision tower cannot take); gemma3n always converts, which is
    # the reference's behaviour with do_convert_rgb=True.
    ref = reference_pixels(images, do_convert_rgb=True)
    assert ours.shape == (3, 3, 64, 64)
    assert_close(ours, ref)


def test_arrays_and_tensors_match_reference():
    rng = np.random.default_rng(5)
    hwc = rng.integers(0, 256, (45, 71, 3), dtype=np.uint8)
    inputs = [
        hwc,  # numpy HWC uint8
        hwc.astype(np.float32),  # numpy HWC float in 0..255
        torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),  # torch CHW uint8
        torch.from_numpy(hwc),  # torch HWC uint8
        torch.from_numpy(hwc).permute(2, 0, 1).double(),  # torch CHW float64
    ]
    ours = our_processor().image_processor(inputs)
    ref = torch.cat([reference_pixels([x]) for x in inputs])
    assert_close(ours, ref)
    # All forms of the same picture agree with the PIL path, up to float interpolation vs uint8 rounding.
    from_pil = our_processor().image_processor([PIL.Image.fromarray(hwc)])
    assert torch.equal(ours[0], from_pil[0]) and torch.equal(ours[2], from_pil[0]) and torch.equal(ours[3], from_pil[0])
    # (the uint8 kernel rounds internally, the float path does not: at most about one grey level apart)
    assert (ours[1] - from_pil[0]).abs().max() <= 1.5 / 255
    # A stacked 4-D array is a batch of images.
    stacked = our_processor()(text=f"{IMAGE} {IMAGE}", images=np.stack([hwc, hwc]))["pixel_values"]
    assert torch.equal(stacked, torch.cat([from_pil, from_pil]))


def test_grey_arrays_become_rgb():
    grey = np.random.default_rng(6).integers(0, 256, (50, 30), dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    ours = our_processor().image_processor([grey, grey[:, :, None], torch.from_numpy(grey)[None]])
    assert ours.shape == (3, 3, 64, 64)
    ref = reference_pixels([rgb])  # the reference takes no 2-D arrays; a grey picture is its RGB repeat
    for row in ours:
        assert_close(row[None], ref)


def test_published_768_size_matches_reference(tmp_path):
    from transformers import AutoImageProcessor

    config = json.loads((tiny_dir() / "preprocessor_config.json").read_text())
    config["size"] = {"height": 768, "width": 768}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    reference = AutoImageProcessor.from_pretrained(str(tmp_path))
    settings = ImageSettings.from_dict(config, "preprocessor_config.json")
    assert settings == ImageSettings()  # the defaults are the published settings
    images = [random_image(480, 640, seed=7), random_image(1030, 770, seed=8)]  # up- and down-sampling
    ours = ImageProcessor(settings)(images)
    ref = reference(images, return_tensors="pt")["pixel_values"]
    assert ours.shape == (2, 3, 768, 768)
    assert_close(ours, ref)


@pytest.mark.parametrize("resample", [0, 2, 3])
def test_normalize_and_resample_settings_match_reference(resample):
    from transformers import SiglipImageProcessor

    config = {
        "size": {"height": 48, "width": 40},
        "resample": resample,
        "do_normalize": True,
        "image_mean": [0.48, 0.45, 0.4],
        "image_std": [0.26, 0.26, 0.27],
        "rescale_factor": 1 / 255,
    }
    reference = SiglipImageProcessor(**config)
    ours = ImageProcessor(ImageSettings.from_dict(config, "test config"))
    images = [random_image(37, 53, seed=9), random_image(90, 91, seed=10)]
    assert_close(ours(images), reference(images, return_tensors="pt")["pixel_values"])


def test_paths_file_urls_and_http_urls(tmp_path):
    image = random_image(33, 47, seed=11)
    image.save(tmp_path / "picture.png")
    processor = our_processor().image_processor
    expected = processor([image])

    handler = lambda *args: http.server.SimpleHTTPRequestHandler(*args, directory=str(tmp_path))  # noqa: E731
    http.server.SimpleHTTPRequestHandler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/picture.png"
        sources = [str(tmp_path / "picture.png"), tmp_path / "picture.png", (tmp_path / "picture.png").as_uri(), url]
        ours = processor(sources)
        with pytest.raises(OSError, match="cannot fetch image .*missing.png"):
            processor([url.replace("picture", "missing")])
    finally:
        server.shutdown()
        server.server_close()
    for row in ours:
        assert torch.equal(row, expected[0])
    assert_close(ours[:1], reference_pixels([str(tmp_path / "picture.png")]))  # the reference decodes the file itself


def test_nested_images_per_prompt_match_reference():
    images = [[random_image(40, 60, seed=12)], [random_image(70, 30, seed=13), random_image(64, 64, seed=14)]]
    text = [f"one {IMAGE}", f"two {IMAGE} and {IMAGE} here"]
    ours = our_processor()(text=text, images=images)
    ref = reference_processor()(text=text, images=images, padding=True, return_tensors="pt")
    assert_close(ours["pixel_values"], ref["pixel_values"])
    assert torch.equal(ours["input_ids"], ref["input_ids"])
    assert torch.equal(ours["attention_mask"], ref["attention_mask"])
    # A flat list is matched to the placeholders in order.
    flat = our_processor()(text=text, images=[im for group in images for im in group])
    assert torch.equal(flat["pixel_values"], ours["pixel_values"])


def test_image_errors_name_the_input(tmp_path):
    processor = our_processor()
    missing = tmp_path / "nope.png"
    with pytest.raises(FileNotFoundError, match="nope.png"):
        processor(text=IMAGE, images=[str(missing)])
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 3)
    with pytest.raises(OSError, match="broken.jpg"):
        processor(text=IMAGE, images=[str(corrupt)])
    with pytest.raises(ValueError, match="2 image placeholders .* but 1 images"):
        processor(text=f"{IMAGE} {IMAGE}", images=[random_image(10, 10)])
    with pytest.raises(ValueError, match="prompt 1 has 1 image placeholders .* but 2 images"):
        processor(text=[IMAGE, IMAGE], images=[[random_image(10, 10)], [random_image(9, 9), random_image(8, 8)]])
    with pytest.raises(ValueError, match="channel axis"):
        processor(text=IMAGE, images=[np.zeros((10, 10, 7), np.uint8)])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"do_resize": "yes"}, r'"do_resize" must be a boolean'),
        ({"resample": 4}, r'"resample" 4 \(BOX\) is not supported'),
        ({"image_std": [0.5, 0.0, 0.5]}, r'"image_std" must be a list of numbers > 0'),
        ({"size": {"height": 64}}, r'"size" must be \{"height": H, "width": W\}'),
        ({"size": {"height": -1, "width": 3}}, r'"height" must be an integer >= 1'),
        ({"image_processor_type": "CLIPImageProcessor"}, r'"image_processor_type" is .CLIPImageProcessor'),
        ({"do_pad": True}, r'"do_pad": true is not supported'),
    ],
)
def test_bad_image_settings_name_key_and_file(tmp_path, change, message):
    directory = tiny_dir_with_changed_json(tmp_path, "preprocessor_config.json", change)
    with pytest.raises(ConfigError, match="preprocessor_config.json") as info:
        Processor.from_pretrained(directory)
    assert info.match(message)


def test_invalid_json_names_the_file(tmp_path):
    directory = tmp_path / "proc"
    shutil.copytree(tiny_dir(), directory)
    Path(directory / "processor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"processor_config.json: invalid JSON"):
        Processor.from_pretrained(directory)
