"""Images -> pixel_values [n, 3, H, W] float32, as the reference SigLIP image processor (torchvision backend) does.

Per image: load (path, URL, PIL, array, tensor) -> RGB uint8 [3, h, w] -> resize to the configured size with
antialiasing -> (center crop) -> rescale -> (normalize). The resize works on the uint8 tensor exactly like
torchvision's `resize`: on CPUs with AVX2/AVX512 (and on ARM) it interpolates the uint8 tensor directly (the result
is rounded to uint8 inside the kernel); elsewhere it interpolates in float32, rounds and casts back to uint8. The two
paths can differ by one grey level, so the choice matters for parity.
"""

from __future__ import annotations

import base64
import io
import platform
import re
import urllib.parse
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from .files import ConfigError, get_bool, get_float, get_float_list, get_int, get_section

# PIL resampling codes (as stored in preprocessor_config.json) -> torch interpolation mode.
# NEAREST maps to "nearest-exact", as the reference does; BOX / HAMMING have no tensor implementation.
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {0: "NEAREST", 1: "LANCZOS", 2: "BILINEAR", 3: "BICUBIC", 4: "BOX", 5: "HAMMING"}

URL_TIMEOUT_S = 10.0
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


@dataclass(frozen=True)
class ImageSettings:
    """Image preprocessing settings. Defaults are the published Gemma 3n values."""

    do_resize: bool = True
    height: int = 768
    width: int = 768
    resample: int = 2  # PIL.Image.BILINEAR
    do_center_crop: bool = False
    crop_height: int = 768
    crop_width: int = 768
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True

    @classmethod
    def from_dict(cls, data: dict, source: str) -> ImageSettings:
        """Parse an image-processor section. Absent / null keys take the SigLIP class defaults, like the reference
        (224x224, bicubic, normalize with mean=std=0.5); Gemma 3n checkpoints set all of them explicitly."""
        for key in ("do_pad", "do_reduce_labels"):
            if data.get(key):
                raise ConfigError(f'{source}: "{key}": true is not supported by the Gemma 3n image processor')
        fmt = data.get("data_format")
        if fmt not in (None, "channels_first"):
            raise ConfigError(f'{source}: "data_format" must be "channels_first", got {fmt!r}')
        height, width = _read_size(data, "size", (224, 224), source)
        crop_height, crop_width = _read_size(data, "crop_size", (height, width), source)
        resample = get_int(data, "resample", 3, source)
        if resample not in _RESAMPLE_MODES:
            name = _RESAMPLE_NAMES.get(resample, "unknown")
            raise ConfigError(
                f'{source}: "resample" {resample} ({name}) is not supported; use 0 (nearest), 2 (bilinear) '
                "or 3 (bicubic)"
            )
        return cls(
            do_resize=get_bool(data, "do_resize", True, source),
            height=height,
            width=width,
            resample=resample,
            do_center_crop=get_bool(data, "do_center_crop", False, source),
            crop_height=crop_height,
            crop_width=crop_width,
            do_rescale=get_bool(data, "do_rescale", True, source),
            rescale_factor=get_float(data, "rescale_factor", 1 / 255, source, positive=True),
            do_normalize=get_bool(data, "do_normalize", True, source),
            image_mean=get_float_list(data, "image_mean", (0.5, 0.5, 0.5), source, length=3),
            image_std=get_float_list(data, "image_std", (0.5, 0.5, 0.5), source, length=3, positive=True),
            do_convert_rgb=get_bool(data, "do_convert_rgb", True, source),
        )


def _read_size(data: dict, key: str, default: tuple[int, int], source: str) -> tuple[int, int]:
    """`{"height": h, "width": w}` (or a single int for a square)."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        value = {"height": value, "width": value}
    section = get_section({key: value}, key, source)
    if set(section) - {"height", "width"} or not {"height", "width"} <= set(section):
        raise ConfigError(f'{source}: "{key}" must be {{"height": H, "width": W}}, got {value!r}')
    return (
        get_int(section, "height", 0, f"{source} ({key})", minimum=1),
        get_int(section, "width", 0, f"{source} ({key})", minimum=1),
    )


# ---- loading ------------------------------------------------------------------------------------------------


def load_image(source: Any, timeout: float = URL_TIMEOUT_S) -> PIL.Image.Image | np.ndarray | torch.Tensor:
    """Open an image given as a path, a file:// / http(s):// URL, a data: URL / base64 string, raw bytes,
    or pass through a PIL image / numpy array / torch tensor. Errors name the image."""
    if isinstance(source, (PIL.Image.Image, np.ndarray, torch.Tensor)):
        return source
    if isinstance(source, (bytes, bytearray)):
        return _open_bytes(bytes(source), "<bytes>")
    if isinstance(source, Path):
        return _open_file(source)
    if not isinstance(source, str):
        raise TypeError(f"unsupported image type {type(source).__name__}; expected a path, URL, PIL image or array")
    if source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=timeout) as response:
                data = response.read()
        except Exception as e:
            raise OSError(f"cannot fetch image {source!r}: {e}") from e
        return _open_bytes(data, source)
    if source.startswith("file://"):
        return _open_file(Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path)))
    if source.startswith("data:image/"):
        return _open_bytes(_b64decode(source.split(",", 1)[-1], source), source[:40] + "...")
    path = Path(source)
    if not path.is_file() and len(source) > 256 and _BASE64.fullmatch(source):
        return _open_bytes(_b64decode(source, source), source[:40] + "...")  # a long base64 string, not a path
    return _open_file(path)


def _b64decode(text: str, name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=False)
    except Exception as e:
        raise ValueError(f"image {name[:60]!r} is neither a file, a URL nor valid base64 ({e})") from e


def _open_file(path: Path) -> PIL.Image.Image:
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {str(path)!r}")
    try:
        with PIL.Image.open(path) as image:
            image.load()
            return image
    except Exception as e:
        raise OSError(f"cannot read image file {str(path)!r}: {e}") from e


def _open_bytes(data: bytes, name: str) -> PIL.Image.Image:
    try:
        image = PIL.Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception as e:
        raise OSError(f"cannot decode image {name!r}: {e}") from e


# ---- conversion to a uint8 / float tensor [C, H, W] ---------------------------------------------------------


def to_chw_tensor(image: PIL.Image.Image | np.ndarray | torch.Tensor, convert_rgb: bool = True) -> torch.Tensor:
    """[3, H, W] tensor: uint8 for PIL images and integer arrays, the input's float dtype for float arrays.

    PIL images are converted with `Image.convert("RGB")` (grey, palette, RGBA (alpha dropped), CMYK, 16-bit).
    Arrays / tensors may be HWC or CHW (channels 1, 3 or 4: grey is repeated, alpha dropped) or 2-D grey.
    """
    if isinstance(image, PIL.Image.Image):
        if convert_rgb and image.mode != "RGB":
            image = image.convert("RGB")
        elif image.mode not in ("RGB", "RGBA", "L"):
            raise ValueError(f'a PIL image in mode {image.mode!r} needs RGB conversion, but "do_convert_rgb" is false')
        array = np.array(image)  # [H, W, C] or [H, W]
        hwc = torch.from_numpy(array if array.ndim == 3 else array[:, :, None])
        return _to_three_channels(hwc.permute(2, 0, 1))
    if isinstance(image, np.ndarray):
        if image.dtype == np.bool_ or image.dtype.kind not in "uif":
            raise TypeError(f"image array has unsupported dtype {image.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}")
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"image tensor has unsupported dtype {tensor.dtype}")
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions (H, W[, C]), got shape {tuple(tensor.shape)}")
    # Channel axis: first if it has 1/3 entries (the reference's rule, checked first), else last.
    if tensor.shape[0] in (1, 3):
        chw = tensor
    elif tensor.shape[-1] in (1, 3, 4):
        chw = tensor.permute(2, 0, 1)
    elif tensor.shape[0] == 4:
        chw = tensor
    else:
        raise ValueError(f"cannot find the channel axis of an image with shape {tuple(tensor.shape)}")
    return _to_three_channels(chw)


def _to_three_channels(chw: torch.Tensor) -> torch.Tensor:
    """Grey -> repeated to RGB, RGBA -> alpha dropped (what PIL's convert("RGB") does); integers -> uint8."""
    if chw.shape[0] == 4:
        chw = chw[:3]
    elif chw.shape[0] == 1:
        chw = chw.expand(3, -1, -1)
    if not chw.dtype.is_floating_point and chw.dtype != torch.uint8:
        if chw.numel() and (chw.min() < 0 or chw.max() > 255):
            raise ValueError(f"integer image values must lie in [0, 255], got dtype {chw.dtype}")
        chw = chw.to(torch.uint8)
    return chw.contiguous()


def _native_uint8_resize(mode: str) -> bool:
    """Whether torchvision would interpolate a uint8 CPU tensor directly (else it goes through float32)."""
    if mode in ("nearest-exact", "bicubic"):
        return True
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
        "aarch64",
        "arm64",
    )


def resize(image: torch.Tensor, height: int, width: int, resample: int) -> torch.Tensor:
    """Resize a [C, H, W] tensor like torchvision's `resize(..., antialias=True)`; keeps the dtype."""
    if image.shape[-2:] == (height, width):
        return image
    mode = _RESAMPLE_MODES[resample]
    antialias = mode in ("bilinear", "bicubic")
    kwargs: dict[str, Any] = {"align_corners": False} if antialias else {}
    dtype = image.dtype
    x = image.unsqueeze(0)  # [1, C, H, W]
    cast = dtype not in (torch.float32, torch.float64) and not (dtype == torch.uint8 and _native_uint8_resize(mode))
    if cast:
        x = x.to(torch.float32)
    x = F.interpolate(x, size=(height, width), mode=mode, antialias=antialias, **kwargs)
    if cast:
        if mode == "bicubic" and dtype == torch.uint8:
            x = x.clamp_(0, 255)
        if not dtype.is_floating_point:
            x = x.round_()
        x = x.to(dtype)
    return x[0]


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop the centre (zero-padding first when the image is smaller), as torchvision's center_crop."""
    h, w = image.shape[-2:]
    if height > h or width > w:
        left, top = max(width - w, 0) // 2, max(height - h, 0) // 2
        right, bottom = max(width - w + 1, 0) // 2, max(height - h + 1, 0) // 2
        image = F.pad(image, (left, right, top, bottom), value=0)
        h, w = image.shape[-2:]
    top, left = int((h - height) / 2.0), int((w - width) / 2.0)
    return image[..., top : top + height, left : left + width]


class ImageProcessor:
    """Turns a list of images into `pixel_values` [n, 3, H, W] float32."""

    def __init__(self, settings: ImageSettings | None = None):
        self.settings = settings or ImageSettings()

    def preprocess_one(self, image: Any) -> torch.Tensor:
        """One image (any accepted form) -> [3, H, W] float32."""
        s = self.settings
        chw = to_chw_tensor(load_image(image), convert_rgb=s.do_convert_rgb)
        if chw.dtype.is_floating_point and s.do_rescale and chw.numel() and 0 <= chw.min() and chw.max() <= 1:
            warnings.warn(
                "a float image with values in [0, 1] will be rescaled again by rescale_factor (as the reference "
                "does); pass uint8 images or 0..255 floats",
                stacklevel=3,
            )
        if s.do_resize:
            chw = resize(chw, s.height, s.width, s.resample)
        if s.do_center_crop:
            chw = center_crop(chw, s.crop_height, s.crop_width)
        if s.do_normalize:
            # The reference folds the rescale into mean/std and normalizes in float32.
            scale = 1.0 / s.rescale_factor if s.do_rescale else 1.0
            mean = torch.tensor(s.image_mean) * scale
            std = torch.tensor(s.image_std) * scale
            return (chw.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
        if s.do_rescale:
            chw = chw * s.rescale_factor
        return chw.to(torch.float32)

    def __call__(self, images: list[Any]) -> torch.Tensor:
        """A flat list of images -> [n, 3, H, W] float32. Errors name the index of the bad image."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for i, image in enumerate(images):
            try:
                out.append(self.preprocess_one(image))
            except (ValueError, TypeError) as e:
                if type(e) not in (ValueError, TypeError):
                    raise
                raise type(e)(f"image {i}: {e}") from e
        if not out:
            return torch.empty(0, 3, self.settings.height, self.settings.width)
        shapes = {tuple(t.shape) for t in out}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes after preprocessing ({sorted(shapes)}); enable do_resize")
        return torch.stack(out)
