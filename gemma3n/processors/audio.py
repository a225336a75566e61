"""Audio -> log-mel features for the Gemma 3n (USM) audio encoder, matching Gemma3nAudioFeatureExtractor.

Waveforms (prepared by audio_io: decoded, mixed to mono, resampled to 16 kHz) form one padded batch (on the CPU
path only virtually: audio_cpu reads the clips in place, in chunks of frames on worker threads):

    x [B, T] --pad to longest, round up to a multiple of 128, truncate at 30 s-->  [B, T']
    frames of 513 samples every 160 (10 ms)                                        [B, F, 513]
    pre-emphasis (HTK flavour: first sample scaled by 1-p, then x[n] - p x[n-1])   [B, F, 512]
    periodic Hann window, |rFFT| of 1024 points ("FFT overdrive")                  [B, F, 513]
    triangular HTK mel bank (125 Hz .. 7.6 kHz), log(max(., 1e-5))                [B, F, 128]
    mask: frame f is valid when its first sample is a real (not padded) sample     [B, F]

Precision: the reference's FFT is numpy's, whose float32 transform equals the float64 transform rounded to
complex64. That accuracy matters: the pre-emphasis leaves the lowest mel bins 40-120 dB below the frame's
energy, and a float32 FFT's rounding error (relative to the whole frame) moves their log values by up to 0.06
on pure tones. So the CPU path transforms in float64 too (numpy's FFT) and rounds to complex64: spectra
bit-identical to the reference's. The torch path (CUDA tensors, or fft_backend="torch") transforms in float64 as
well.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .audio_cpu import CpuLogMel
from .audio_io import prepare_waveform
from .files import ConfigError, get_bool, get_float, get_float_list, get_int, get_str


@dataclass(frozen=True)
class AudioSettings:
    """Feature-extractor settings; defaults are the published Gemma 3n values (and the reference's defaults)."""

    feature_size: int = 128
    sampling_rate: int = 16_000
    padding_value: float = 0.0
    padding_side: str = "right"
    return_attention_mask: bool = True
    frame_length_ms: float = 32.0
    hop_length_ms: float = 10.0
    min_frequency: float = 125.0
    max_frequency: float = 7600.0
    preemphasis: float = 0.97
    preemphasis_htk_flavor: bool = True
    fft_overdrive: bool = True
    dither: float = 0.0
    input_scale_factor: float = 1.0
    mel_floor: float = 1e-5
    per_bin_mean: tuple[float, ...] | None = None
    per_bin_stddev: tuple[float, ...] | None = None

    @property
    def frame_length(self) -> int:
        return int(round(self.sampling_rate * self.frame_length_ms / 1000.0))

    @property
    def hop_length(self) -> int:
        return int(round(self.sampling_rate * self.hop_length_ms / 1000.0))

    @property
    def fft_length(self) -> int:
        n = 2 ** math.ceil(math.log2(self.frame_length))
        return 2 * n if self.fft_overdrive else n

    @classmethod
    def from_dict(cls, data: dict, source: str) -> AudioSettings:
        """Parse a feature-extractor section; absent / null keys take the defaults above."""
        feature_size = get_int(data, "feature_size", 128, source, minimum=1)
        settings = cls(
            feature_size=feature_size,
            sampling_rate=get_int(data, "sampling_rate", 16_000, source, minimum=1),
            padding_value=get_float(data, "padding_value", 0.0, source),
            padding_side=get_str(data, "padding_side", "right", source, choices=("left", "right")),
            return_attention_mask=get_bool(data, "return_attention_mask", True, source),
            frame_length_ms=get_float(data, "frame_length_ms", 32.0, source, positive=True),
            hop_length_ms=get_float(data, "hop_length_ms", 10.0, source, positive=True),
            min_frequency=get_float(data, "min_frequency", 125.0, source, minimum=0.0),
            max_frequency=get_float(data, "max_frequency", 7600.0, source, positive=True),
            preemphasis=get_float(data, "preemphasis", 0.97, source, minimum=0.0),
            preemphasis_htk_flavor=get_bool(data, "preemphasis_htk_flavor", True, source),
            fft_overdrive=get_bool(data, "fft_overdrive", True, source),
            dither=get_float(data, "dither", 0.0, source, minimum=0.0),
            input_scale_factor=get_float(data, "input_scale_factor", 1.0, source),
            mel_floor=get_float(data, "mel_floor", 1e-5, source, positive=True),
            per_bin_mean=get_float_list(data, "per_bin_mean", None, source, length=feature_size),
            per_bin_stddev=get_float_list(data, "per_bin_stddev", None, source, length=feature_size, positive=True),
        )
        if settings.frame_length < 2 or settings.hop_length < 1:
            raise ConfigError(f"{source}: frame/hop lengths of {settings.frame_length}/{settings.hop_length} samples")
        if settings.max_frequency <= settings.min_frequency:
            raise ConfigError(f'{source}: "max_frequency" must exceed "min_frequency"')
        if settings.max_frequency > settings.sampling_rate / 2:
            raise ConfigError(f'{source}: "max_frequency" {settings.max_frequency} is above the Nyquist frequency')
        # The reference derives these from the *_ms keys and ignores the stored sample counts; a stored value that
        # disagrees means the file was edited inconsistently, so say so instead of silently using one of them.
        for key, derived in (
            ("frame_length", settings.frame_length),
            ("hop_length", settings.hop_length),
            ("fft_length", settings.fft_length),
        ):
            stored = get_int(data, key, derived, source, minimum=1)
            if stored != derived:
                raise ConfigError(
                    f'{source}: "{key}" is {stored} but the other settings give {derived} '
                    "(frame_length_ms / hop_length_ms / fft_overdrive at this sampling_rate)"
                )
        return settings


def mel_filter_bank(settings: AudioSettings) -> np.ndarray:
    """Triangular filters on the HTK mel scale, [n_fft // 2 + 1, n_mels] float64, without area normalization.

    Built in float64 from float32 FFT-bin frequencies, the same arithmetic as the reference, so the filters agree
    to the last bit before they are cast for the matmul.
    """
    n_freqs = settings.fft_length // 2 + 1
    bin_hz = np.arange(n_freqs, dtype=np.float32) * (settings.sampling_rate / settings.fft_length)

    def hz_to_mel(hz: float) -> float:
        return 2595.0 * math.log10(1.0 + hz / 700.0)

    mel_points = np.linspace(
        hz_to_mel(settings.min_frequency), hz_to_mel(settings.max_frequency), settings.feature_size + 2
    )
    hz_points = 700.0 * (10 ** (mel_points / 2595.0) - 1.0)  # [n_mels + 2] band edges and centres
    widths = np.diff(hz_points)  # [n_mels + 1]
    offsets = hz_points[None, :] - bin_hz[:, None]  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]  # left side of each triangle
    falling = offsets[:, 2:] / widths[1:]  # right side
    return np.maximum(0.0, np.minimum(rising, falling))


def hann_window(length: int) -> np.ndarray:
    """Periodic Hann window in float32 arithmetic (so it matches the reference's window bit for bit)."""
    n = np.arange(length, dtype=np.float32)
    return (0.5 * (1 - np.cos(2 * np.pi * n / length))).astype(np.float32)


# ---- features -----------------------------------------------------------------------------------------------


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


class AudioFeatureExtractor:
    """Batched log-mel features: `extractor(waveforms)` -> (input_features [B, F, M], input_features_mask [B, F]).

    fft_backend: "auto" / "numpy" use numpy's FFT for CPU tensors, on frame chunks in worker threads (spectra
    bit-identical to the reference's); "torch" uses float64 torch.fft on the whole batch at once (tensors on other
    devices always do), equal to within ~1e-6.
    """

    def __init__(self, settings: AudioSettings | None = None, fft_backend: str = "auto"):
        if fft_backend not in ("auto", "numpy", "torch"):
            raise ValueError(f"fft_backend must be 'auto', 'numpy' or 'torch', got {fft_backend!r}")
        self.settings = settings or AudioSettings()
        self.fft_backend = fft_backend
        s = self.settings
        window = hann_window(s.frame_length)  # [frame_length] float32
        self.window = torch.from_numpy(window)
        filters = mel_filter_bank(s).astype(np.float32)  # [n_fft // 2 + 1, n_mels]
        self.mel_filters = torch.from_numpy(filters)
        self._cpu_log_mel = CpuLogMel(s, window, filters)
        self.per_bin_mean = None if s.per_bin_mean is None else torch.tensor(s.per_bin_mean, dtype=torch.float32)
        self.per_bin_stddev = None if s.per_bin_stddev is None else torch.tensor(s.per_bin_stddev, dtype=torch.float32)

    @property
    def sampling_rate(self) -> int:
        return self.settings.sampling_rate

    def prepare(self, audio: list[Any], sampling_rate: int | None = None) -> list[torch.Tensor]:
        """Decode / mix / resample each clip to mono float32 at the extractor's rate."""
        return [prepare_waveform(a, sampling_rate, self.sampling_rate, f"audio {i}") for i, a in enumerate(audio)]

    def pad_batch(
        self,
        waveforms: list[torch.Tensor],
        max_length: int | None = 480_000,
        truncation: bool = True,
        pad_to_multiple_of: int | None = 128,
        padding: bool | str = "longest",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncate, pad and stack: ([B, T] samples, [B, T] bool sample mask), with the reference's length rules
        (the cap is rounded up to the multiple first; the padded length is always a multiple)."""
        layout = _BatchLayout.of(waveforms, max_length, truncation, pad_to_multiple_of, padding, self.settings)
        batch = np.full((len(waveforms), layout.length), self.settings.padding_value, dtype=np.float32)
        sample_mask = np.zeros((len(waveforms), layout.length), dtype=np.bool_)
        for row, (wave, start, n) in enumerate(zip(waveforms, layout.starts, layout.lengths, strict=True)):
            batch[row, start : start + n] = _clip_samples(wave, n)
            sample_mask[row, start : start + n] = True
        return torch.from_numpy(batch), torch.from_numpy(sample_mask)

    def __call__(
        self,
        waveforms: list[torch.Tensor],
        max_length: int | None = 480_000,
        truncation: bool = True,
        pad_to_multiple_of: int | None = 128,
        padding: bool | str = "longest",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mono 16 kHz float32 clips -> (features [B, F, n_mels] float32, mask [B, F] bool)."""
        s = self.settings
        if self.fft_backend == "torch" or s.dither > 0 or s.input_scale_factor != 1.0:
            batch, sample_mask = self.pad_batch(waveforms, max_length, truncation, pad_to_multiple_of, padding)
            return self.features(batch, sample_mask)
        # CPU path without a padded copy of the batch: the workers read each clip in place and pad only the
        # chunks that reach past its ends.
        layout = _BatchLayout.of(waveforms, max_length, truncation, pad_to_multiple_of, padding, s)
        n_frames = self._frame_count(layout.length, lambda: max(layout.lengths))
        clips = [_clip_samples(wave, n) for wave, n in zip(waveforms, layout.lengths, strict=True)]
        features = torch.from_numpy(self._cpu_log_mel(clips, layout.starts, n_frames))
        frame_starts = np.arange(n_frames)[None, :] * s.hop_length  # frame f is valid iff its 1st sample is real
        starts, lengths = np.array(layout.starts)[:, None], np.array(layout.lengths)[:, None]
        mask = torch.from_numpy((frame_starts >= starts) & (frame_starts < starts + lengths))
        return self._normalize(features), mask

    def features(self, batch: torch.Tensor, sample_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of a padded batch [B, T] (see the module docstring for the steps)."""
        s = self.settings
        n_frames = self._frame_count(batch.shape[-1], lambda: int(sample_mask.sum(-1).max()))
        if s.dither > 0:
            batch = batch + s.dither * torch.randn_like(batch)
        if s.input_scale_factor != 1.0:
            batch = batch * s.input_scale_factor
        if self.fft_backend == "torch" or batch.device.type != "cpu":
            features = self._log_mel_torch(batch, n_frames)
        else:
            rows = list(batch.to(torch.float32).numpy())
            features = torch.from_numpy(self._cpu_log_mel(rows, [0] * len(rows), n_frames))
        mask = sample_mask[:, :: s.hop_length][:, :n_frames].to(features.device)  # frame valid iff 1st sample real
        return self._normalize(features), mask

    def _frame_count(self, padded_length: int, longest_clip: Callable[[], int]) -> int:
        """Frames in a padded batch; too few samples for one frame is an error naming the longest clip's length
        (counted only then)."""
        s = self.settings
        n_frames = (padded_length - (s.frame_length + 1)) // s.hop_length + 1
        if n_frames <= 0:
            raise ValueError(
                f"audio too short: {longest_clip()} samples, but one frame needs {s.frame_length + 1} samples "
                f"({1000 * (s.frame_length + 1) / s.sampling_rate:.1f} ms at {s.sampling_rate} Hz)"
            )
        return n_frames

    def _normalize(self, features: torch.Tensor) -> torch.Tensor:
        """The optional per-bin normalization, in place."""
        if self.per_bin_mean is not None:
            features -= self.per_bin_mean.to(features.device)
        if self.per_bin_stddev is not None:
            features /= self.per_bin_stddev.to(features.device)
        return features

    def _log_mel_torch(self, batch: torch.Tensor, n_frames: int) -> torch.Tensor:
        """The whole batch at once with torch ops: [B, T] -> [B, F, n_mels]."""
        s = self.settings
        frame, hop, p = s.frame_length, s.hop_length, s.preemphasis
        window = self.window.to(batch.device)
        windows = batch.unfold(-1, frame + 1, hop)[:, :n_frames]  # [B, F, frame + 1] samples of each frame
        if p <= 0:
            frames = windows[..., :-1]
        elif s.preemphasis_htk_flavor:  # [x0 (1 - p), x1 - p x0, ..., x[frame-1] - p x[frame-2]]
            frames = torch.cat([windows[..., :1] * (1.0 - p), windows[..., 1:-1] - p * windows[..., :-2]], dim=-1)
        else:  # x[1 .. frame] - p x[0 .. frame-1]
            frames = windows[..., 1:] - p * windows[..., :-1]
        # float64 FFT: a float32 FFT's rounding error (relative to the whole frame) swamps the weak mel bins
        spectrum = torch.fft.rfft((frames * window).double(), n=s.fft_length)  # [B, F, n_fft // 2 + 1]
        mel = torch.matmul(spectrum.abs(), self.mel_filters.to(batch.device, torch.float64))  # [B, F, n_mels]
        return torch.log(mel.clamp_min_(s.mel_floor)).float()


@dataclass(frozen=True)
class _BatchLayout:
    """Where each clip sits in the padded batch: samples [starts[i], starts[i] + lengths[i]) of `length`."""

    length: int
    starts: list[int]
    lengths: list[int]

    @classmethod
    def of(
        cls,
        waveforms: list[torch.Tensor],
        max_length: int | None,
        truncation: bool,
        pad_to_multiple_of: int | None,
        padding: bool | str,
        settings: AudioSettings,
    ) -> _BatchLayout:
        """The reference's length rules: truncate at max_length (rounded up to the multiple first), pad to the
        longest clip or to max_length, always to a multiple."""
        if not waveforms:
            raise ValueError("no audio given")
        limit = None
        if truncation:
            if max_length is None:
                raise ValueError("truncation=True needs max_length")
            limit = _round_up(max_length, pad_to_multiple_of)
        lengths = [w.shape[-1] if limit is None else min(w.shape[-1], limit) for w in waveforms]
        if padding in (True, "longest"):
            length = _round_up(max(lengths), pad_to_multiple_of)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length")
            length = _round_up(max(max(lengths), max_length), pad_to_multiple_of)
        else:
            raise ValueError(f"audio padding must be True, 'longest' or 'max_length', got {padding!r}")
        starts = [0 if settings.padding_side == "right" else length - n for n in lengths]
        return cls(length, starts, lengths)


def longest_clip_samples(
    soft_tokens: int, frames_per_token: int, settings: AudioSettings, pad_to_multiple_of: int = 128
) -> int:
    """The most samples a clip may have for the audio encoder to give at most ``soft_tokens`` soft tokens.

    frames_per_token: the encoder's time reduction, prod(sub-sampling time strides) x conformer reduction factor
    (published: 2 x 2 x 4 = 16). A padded batch of L samples has (L - frame_length - 1) // hop + 1 frames, and F
    frames give ceil(F / frames_per_token) tokens, so L <= soft_tokens x frames_per_token x hop + frame_length; the
    padded length is a multiple of ``pad_to_multiple_of``, so the clip may be at most that bound rounded down to it.
    Published values: 188 x 16 x 160 + 512 = 481792 samples (30.1 s), above the 30 s the extractor truncates to.
    """
    longest = soft_tokens * frames_per_token * settings.hop_length + settings.frame_length
    return longest - longest % pad_to_multiple_of if pad_to_multiple_of else longest


def frames_per_soft_token(time_strides: list[int], reduction_factor: int) -> int:
    """Log-mel frames per audio soft token: the product of the sub-sampling convolutions' time strides times the
    conformer's reduction factor (each keeps ceil(T / stride) steps, and nested ceilings compose into one)."""
    return math.prod(time_strides) * reduction_factor


def _clip_samples(wave: torch.Tensor, n: int) -> np.ndarray:
    """The first n samples of a clip as float32 numpy (a view when the clip already is float32 on the CPU)."""
    return wave[:n].detach().cpu().to(torch.float32).numpy()
