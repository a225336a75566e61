"""Audio inputs -> mono float32 waveforms at the feature extractor's rate.

Accepts files (wav / flac / ogg / mp3 through soundfile, with audioread as librosa's fallback for other formats;
bytes, file:// and http(s) URLs), {"array" or "raw", "sampling_rate"} dicts and sample arrays or tensors; integer
PCM is scaled to [-1, 1] and channels are averaged. Other rates are resampled the way the reference processor's
audio loading does (transformers' ``load_audio`` with librosa: soxr in its "HQ" mode, then the length fixed to
ceil(samples x ratio)), so a file gives the reference's waveform bit for bit. Empty clips and NaN / infinite
samples are errors that name the input.
"""

from __future__ import annotations

import io
import math
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

URL_TIMEOUT_S = 10.0


def _soundfile_reason(error: Exception) -> str:
    """soundfile's message without its "Error opening 'path': " prefix (the caller names the file)."""
    text = str(error).strip()
    if text.startswith("Error opening") and ": " in text:
        text = text.split(": ", 1)[1]
    return text or type(error).__name__


def _decode_with_audioread(path: str) -> tuple[np.ndarray, int]:
    """librosa's audioread fallback (formats libsndfile cannot read), with its deprecation noise kept off stderr."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="PySoundFile failed", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, module="librosa")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="audioread")  # its stdlib imports
        import librosa  # lazy: only needed for formats soundfile cannot read

        array, rate = librosa.load(path, sr=None, mono=False)
    return array, int(rate)


def decode_audio_file(source: str | Path | bytes) -> tuple[np.ndarray, int]:
    """Decode wav / flac / ogg / mp3 (or bytes, or an http(s) URL) at its native rate: ([channels,] samples), rate.

    Samples are float32 exactly as librosa.load (hence the reference) reads them: soundfile first, and for files
    soundfile cannot open, audioread. A failure names the file and both decoders' reasons.
    """
    import soundfile  # lazy: only needed to decode files

    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    target: Any = source
    path: Path | None = None
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
        if path.stat().st_size == 0:
            raise OSError(f"cannot decode audio file {name!r}: the file is empty (0 bytes)")
        target = str(path)
    try:
        with soundfile.SoundFile(target) as file:
            array = file.read(dtype="float32", always_2d=False).T  # [samples] or [channels, samples]
            return array, int(file.samplerate)
    except Exception as e:
        reason = _soundfile_reason(e)
        if path is None:
            raise OSError(f"cannot decode audio {name!r}: {reason}") from e
        sf_error = e
    try:
        return _decode_with_audioread(str(path))
    except Exception as e:
        fallback = str(e).strip() or type(e).__name__
        raise OSError(f"cannot decode audio file {name!r}: {reason} (audioread fallback: {fallback})") from sf_error


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Resample 1-D float32 samples as librosa.resample(res_type="soxr_hq") does (the reference's file loading):
    soxr's HQ filter, then the length cut or zero-padded to ceil(len x target / rate)."""
    import soxr  # lazy: a dependency of librosa

    out = soxr.resample(wave, rate, target_rate, quality="soxr_hq")
    length = int(math.ceil(wave.shape[-1] * (float(target_rate) / rate)))
    if out.shape[-1] > length:
        out = out[:length]
    elif out.shape[-1] < length:
        out = np.pad(out, (0, length - out.shape[-1]))
    return np.asarray(out, dtype=wave.dtype)


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
    # numpy's mean, as librosa.to_mono (the reference) computes it, so that mixed samples agree bit for bit.
    return torch.from_numpy(np.mean(wave.numpy(), axis=channel_axis))


def prepare_waveform(item: Any, sampling_rate: int | None, target_rate: int, name: str = "audio") -> torch.Tensor:
    """One clip in any accepted form -> mono float32 [samples] at `target_rate`.

    Accepted: a path / URL / bytes (see :func:`decode_audio_file`), {"array" or "raw": samples, "sampling_rate": r}
    (also {"path": ...}), or samples (numpy array, torch tensor, list of floats) at `sampling_rate` (default 16 kHz).
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
        wave = torch.from_numpy(resample(np.ascontiguousarray(wave.numpy()), rate, target_rate))
    return wave
