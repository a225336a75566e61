"""Audio inputs -> mono float32 waveforms at the feature extractor's rate.

Accepts files (wav / flac / ogg / mp3 through librosa, bytes, file:// and http(s) URLs), {"array" or "raw",
"sampling_rate"} dicts and sample arrays or tensors; integer PCM is scaled to [-1, 1], channels are averaged, and
other rates are resampled with torchaudio. Empty clips and NaN / infinite samples are errors that name the input.
"""

from __future__ import annotations

import io
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchaudio.functional as AF

URL_TIMEOUT_S = 10.0


def decode_audio_file(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Decode wav / flac / ogg / mp3 (or bytes, or an http(s) URL) at its native rate: ([channels,] samples), rate."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        import librosa  # lazy: only needed to decode files
    except ImportError as e:
        raise ImportError(f"decoding audio file {name!r} needs librosa (pip install librosa)") from e
    target: Any = source
    if isinstance(source, (bytes, bytearray)):
        target = io.BytesIO(bytes(source))
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT_S) as response:
                target = io.BytesIO(response.read())
        except Exception as e:
            raise OSError(f"cannot fetch audio {name!r}: {e}") from e
    else:
        path = Path(source)
        if isinstance(source, str) and source.startswith("file://"):
            path = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path))
        if not path.is_file():
            raise FileNotFoundError(f"audio file not found: {str(path)!r}")
        target = str(path)
    try:
        array, rate = librosa.load(target, sr=None, mono=False)
    except Exception as e:
        raise OSError(f"cannot decode audio file {name!r}: {e}") from e
    return array, int(rate)


def _as_float_tensor(array: Any, name: str) -> torch.Tensor:
    """Samples as float32; integer PCM is scaled to [-1, 1] (int16 / 32768, ...)."""
    if isinstance(array, torch.Tensor):
        tensor = array.detach().cpu()
    else:
        np_array = np.asarray(array)
        if np_array.dtype == object or np_array.dtype.kind not in "biuf":
            raise TypeError(f"{name}: audio must be numeric samples, got dtype {np_array.dtype}")
        tensor = torch.from_numpy(np.ascontiguousarray(np_array))
    if tensor.dtype.is_complex or tensor.dtype == torch.bool:
        raise TypeError(f"{name}: audio samples must be real numbers, got {tensor.dtype}")
    if tensor.dtype == torch.uint8:
        return (tensor.to(torch.float32) - 128.0) / 128.0
    if not tensor.dtype.is_floating_point:
        scale = float(2 ** (torch.iinfo(tensor.dtype).bits - 1))
        return tensor.to(torch.float64).div(scale).to(torch.float32)
    return tensor.to(torch.float32)


def to_mono(wave: torch.Tensor, name: str) -> torch.Tensor:
    """[samples] or [channels, samples] / [samples, channels] (the shorter axis is channels) -> [samples]."""
    if wave.dim() == 1:
        return wave
    if wave.dim() != 2:
        raise ValueError(f"{name}: audio must be 1-D (mono) or 2-D (multi-channel), got shape {tuple(wave.shape)}")
    channel_axis = 0 if wave.shape[0] <= wave.shape[1] else 1
    return wave.mean(dim=channel_axis)


def prepare_waveform(item: Any, sampling_rate: int | None, target_rate: int, name: str = "audio") -> torch.Tensor:
    """One clip in any accepted form -> mono float32 [samples] at `target_rate`.

    Accepted: a path / URL / bytes (decoded with librosa), {"array" or "raw": samples, "sampling_rate": r} (also
    {"path": ...}), or samples (numpy array, torch tensor, list of floats) at `sampling_rate` (default 16 kHz).
    """
    rate = sampling_rate
    if isinstance(item, dict):
        if "path" in item and not any(k in item for k in ("array", "raw")):
            item = item["path"]
        else:
            key = "array" if "array" in item else "raw" if "raw" in item else None
            if key is None:
                raise ValueError(f'{name}: an audio dict needs "array" (or "raw") and "sampling_rate" keys')
            rate = item.get("sampling_rate", rate)
            item = item[key]
    if isinstance(item, (str, Path, bytes, bytearray)):
        label = "<bytes>" if isinstance(item, (bytes, bytearray)) else str(item)
        name = f"{name} ({label})"
        item, rate = decode_audio_file(item)
    wave = to_mono(_as_float_tensor(item, name), name)
    if wave.numel() == 0:
        raise ValueError(f"{name}: the clip is empty")
    finite = np.isfinite(wave.numpy())
    if not finite.all():
        raise ValueError(f"{name}: {int((~finite).sum())} samples are NaN or infinite")
    rate = target_rate if rate is None else rate
    if isinstance(rate, float) and rate.is_integer():
        rate = int(rate)
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"{name}: sampling_rate must be a positive integer, got {rate!r}")
    if rate != target_rate:
        wave = AF.resample(wave, rate, target_rate)
    return wave
