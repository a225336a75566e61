"""Audio -> log-mel features for the Gemma 3n (USM) audio encoder, matching Gemma3nAudioFeatureExtractor.

Waveforms (prepared by audio_io: decoded, mixed to mono, resampled to 16 kHz) are padded into one batch, then cut
into runs of frames that worker threads process:

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

import contextlib
import functools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .audio_io import prepare_waveform
from .files import ConfigError, get_bool, get_float, get_float_list, get_int, get_str

_FRAMES_PER_CHUNK = 256  # frames of one clip per work item on the CPU path (192-1024 measured alike)


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
        self._window_np = hann_window(s.frame_length)  # [frame_length] float32
        self.window = torch.from_numpy(self._window_np)
        filters = mel_filter_bank(s).astype(np.float32)  # [n_fft // 2 + 1, n_mels]
        self.mel_filters = torch.from_numpy(filters)
        self._mel_bank = _BandedMelBank(filters)
        self.per_bin_mean = None if s.per_bin_mean is None else torch.tensor(s.per_bin_mean, dtype=torch.float32)
        self.per_bin_stddev = None if s.per_bin_stddev is None else torch.tensor(s.per_bin_stddev, dtype=torch.float32)
        self._workers = _WorkerPool(functools.partial(_ChunkBuffers, s, self._mel_bank))

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
        n_frames = self._frame_count(layout.length, max(layout.lengths))
        clips = [_clip_samples(wave, n) for wave, n in zip(waveforms, layout.lengths, strict=True)]
        features = torch.from_numpy(self._log_mel_numpy(clips, layout, n_frames))
        frame_starts = np.arange(n_frames)[None, :] * s.hop_length  # frame f is valid iff its 1st sample is real
        starts, lengths = np.array(layout.starts)[:, None], np.array(layout.lengths)[:, None]
        mask = torch.from_numpy((frame_starts >= starts) & (frame_starts < starts + lengths))
        return self._normalize(features), mask

    def features(self, batch: torch.Tensor, sample_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of a padded batch [B, T] (see the module docstring for the steps)."""
        s = self.settings
        n_frames = self._frame_count(batch.shape[-1], int(sample_mask.sum(-1).max()))
        if s.dither > 0:
            batch = batch + s.dither * torch.randn_like(batch)
        if s.input_scale_factor != 1.0:
            batch = batch * s.input_scale_factor
        if self.fft_backend == "torch" or batch.device.type != "cpu":
            features = self._log_mel_torch(batch, n_frames)
        else:
            rows = list(batch.to(torch.float32).numpy())
            layout = _BatchLayout(batch.shape[-1], [0] * len(rows), [batch.shape[-1]] * len(rows))
            features = torch.from_numpy(self._log_mel_numpy(rows, layout, n_frames))
        mask = sample_mask[:, :: s.hop_length][:, :n_frames].to(features.device)  # frame valid iff 1st sample real
        return self._normalize(features), mask

    def _frame_count(self, padded_length: int, longest_clip: int) -> int:
        s = self.settings
        n_frames = (padded_length - (s.frame_length + 1)) // s.hop_length + 1
        if n_frames <= 0:
            raise ValueError(
                f"audio too short: {longest_clip} samples, but one frame needs {s.frame_length + 1} samples "
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

    def _log_mel_numpy(self, clips: list[np.ndarray], layout: _BatchLayout, n_frames: int) -> np.ndarray:
        """CPU path: clips placed in a padded batch by `layout` -> [B, F, n_mels] float32 log-mel, in chunks on the
        worker threads.

        Work items are runs of up to _FRAMES_PER_CHUNK frames of one clip; small chunks keep the FFT's working set
        in cache. The FFTs, numpy's ufuncs and its matmul release the GIL, so the chunks run in parallel on torch's
        thread budget.
        """
        s = self.settings
        frame, hop = s.frame_length, s.hop_length
        out = np.empty((len(clips), n_frames, s.feature_size), dtype=np.float32)
        chunks = [
            (row, first, min(first + _FRAMES_PER_CHUNK, n_frames))
            for row in range(len(clips))
            for first in range(0, n_frames, _FRAMES_PER_CHUNK)
        ]

        def run(buffers: _ChunkBuffers, chunk: tuple[int, int, int]) -> None:
            row, first, end = chunk
            # the padded-batch samples [first * hop, (end - 1) * hop + frame + 1) that these frames use
            x = _padded_span(clips[row], layout.starts[row], first * hop, (end - 1) * hop + frame + 1, s)
            mel = out[row, first:end]
            buffers.mel(x, end - first, self._window_np, mel)
            np.log(np.maximum(mel, s.mel_floor, out=mel), out=mel)

        with _single_threaded_blas():
            self._workers.run(run, chunks)
        return out


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


def _clip_samples(wave: torch.Tensor, n: int) -> np.ndarray:
    """The first n samples of a clip as float32 numpy (a view when the clip already is float32 on the CPU)."""
    return wave[:n].detach().cpu().to(torch.float32).numpy()


def _padded_span(clip: np.ndarray, start: int, first: int, end: int, settings: AudioSettings) -> np.ndarray:
    """Samples [first, end) of a padded row whose real samples `clip` sit at [start, start + len(clip)): a view
    where the span lies inside the clip, else a copy filled with the padding value around the overlap."""
    if start <= first and end <= start + clip.shape[0]:
        return clip[first - start : end - start]
    span = np.full(end - first, settings.padding_value, dtype=np.float32)
    lo, hi = max(first, start), min(end, start + clip.shape[0])
    if lo < hi:
        span[lo - first : hi - first] = clip[lo - start : hi - start]
    return span


class _WorkerPool:
    """Runs work items on the calling thread plus helper threads (torch's thread budget in all), which live as long
    as their extractor. Each thread keeps its own scratch buffers from call to call: freshly allocated
    multi-megabyte arrays cost more in page faults than the FFT itself. Items are handed out one at a time, so a
    thread that is slow to wake up (an idle vCPU) just takes fewer of them.
    """

    def __init__(self, make_buffers: Callable[[], Any]):
        self._make_buffers = make_buffers
        self._local = threading.local()
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_threads = 0

    def _helpers(self, count: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._pool_threads != count:  # first call, or torch's budget changed
                if self._pool is not None:
                    self._pool.shutdown(wait=False)
                self._pool = ThreadPoolExecutor(count, "gemma3n-audio")
                self._pool_threads = count
            return self._pool

    def run(self, fn: Callable[[Any, Any], None], items: list) -> None:
        """fn(buffers, item) for every item; the first error is raised once all threads have stopped."""
        pending = iter(items)
        take = threading.Lock()
        failed = threading.Event()

        def drain() -> None:
            buffers = getattr(self._local, "buffers", None)
            if buffers is None:
                buffers = self._local.buffers = self._make_buffers()
            while not failed.is_set():
                with take:
                    item = next(pending, None)
                if item is None:
                    return
                try:
                    fn(buffers, item)
                except BaseException:
                    failed.set()
                    raise

        helpers = min(torch.get_num_threads(), len(items)) - 1
        futures = [self._helpers(helpers).submit(drain) for _ in range(helpers)] if helpers > 0 else []
        try:
            drain()
        finally:
            for future in futures:
                future.result()


class _BandedMelBank:
    """The mel filters as blocks of consecutive filters, each with only the FFT bins where it is non-zero.

    Triangular filters are sparse (each FFT bin feeds at most two of them), so 8 small matmuls over their own bin
    ranges do about a tenth of the work of the dense [n_fft // 2 + 1, n_mels] matmul (same result up to the
    float32 summation order).
    """

    def __init__(self, filters: np.ndarray, filters_per_block: int = 16):
        used_bins = np.nonzero(filters.any(axis=1))[0]
        self.first_bin = int(used_bins[0]) if used_bins.size else 0
        self.end_bin = int(used_bins[-1]) + 1 if used_bins.size else 1
        self.blocks: list[tuple[int, int, int, int, np.ndarray]] = []  # (mel0, mel1, bin0, bin1, weights)
        for mel0 in range(0, filters.shape[1], filters_per_block):
            mel1 = min(mel0 + filters_per_block, filters.shape[1])
            bins = np.nonzero(filters[:, mel0:mel1].any(axis=1))[0]
            bin0, bin1 = (int(bins[0]), int(bins[-1]) + 1) if bins.size else (self.first_bin, self.first_bin + 1)
            weights = np.ascontiguousarray(filters[bin0:bin1, mel0:mel1], dtype=np.float32)
            self.blocks.append((mel0, mel1, bin0, bin1, weights))


class _ChunkBuffers:
    """One worker thread's scratch buffers, and the per-chunk computation that fills them.

    The frames are computed in float32 exactly as the reference computes them, stored as float64 into a buffer
    whose zero tail is the FFT's padding, and transformed in float64: numpy's float32 rFFT (the reference's) equals
    the float64 transform rounded to complex64.
    """

    def __init__(self, settings: AudioSettings, mel_bank: _BandedMelBank):
        self.settings = settings
        self.mel_bank = mel_bank
        rows, frame = _FRAMES_PER_CHUNK, settings.frame_length
        self.padded_frames = np.zeros((rows, settings.fft_length), dtype=np.float64)  # [rows, n_fft], tail stays 0
        self.spectrum = np.empty((rows, settings.fft_length // 2 + 1), dtype=np.complex128)
        self.band = np.empty((rows, mel_bank.end_bin - mel_bank.first_bin), dtype=np.complex64)
        self.magnitude = np.empty((rows, mel_bank.end_bin - mel_bank.first_bin), dtype=np.float32)
        self.emphasized = np.empty((rows - 1) * settings.hop_length + frame, dtype=np.float32)

    def mel(self, x: np.ndarray, n: int, window: np.ndarray, out: np.ndarray) -> None:
        """Mel energies of the n frames in samples x [(n - 1) * hop + frame + 1], written into out [n, n_mels]."""
        s, bank = self.settings, self.mel_bank
        frame, hop, p = s.frame_length, s.hop_length, s.preemphasis
        # numpy multiplies float32 inputs in float32 and only then widens into the float64 `out`
        frames = self.padded_frames[:n, :frame]
        if p <= 0:
            np.multiply(_frames_view(x, n, frame, hop), window, out=frames)
        else:
            # Pre-emphasis once over the chunk, frames as strided views into it: the same float32 operations as
            # the reference's per-frame pre-emphasis, so the frames agree bit for bit.
            emphasized = self.emphasized[: x.shape[0] - 1]  # emphasized[i] = x[i + 1] - p x[i]
            np.multiply(x[:-1], p, out=emphasized)
            np.subtract(x[1:], emphasized, out=emphasized)
            if s.preemphasis_htk_flavor:  # frame at t: [x[t] (1 - p), x[t+1] - p x[t], ...]
                np.multiply(_frames_view(emphasized, n, frame - 1, hop), window[1:], out=frames[:, 1:])
                np.multiply(x[: n * hop : hop] * (1.0 - p), window[0], out=frames[:, 0])
            else:  # frame at t: x[t+1 .. t+frame] - p x[t .. t+frame-1]
                np.multiply(_frames_view(emphasized, n, frame, hop), window, out=frames)
        spectrum = np.fft.rfft(self.padded_frames[:n], axis=-1, out=self.spectrum[:n])  # [n, n_fft // 2 + 1]
        # rounding the used bins to complex64 first gives the reference's spectrum exactly (and a faster abs)
        band = self.band[:n]
        np.copyto(band, spectrum[:, bank.first_bin : bank.end_bin], casting="same_kind")
        magnitude = np.abs(band, out=self.magnitude[:n])
        for mel0, mel1, bin0, bin1, weights in bank.blocks:
            np.matmul(magnitude[:, bin0 - bank.first_bin : bin1 - bank.first_bin], weights, out=out[:, mel0:mel1])


def _frames_view(samples: np.ndarray, n: int, length: int, hop: int) -> np.ndarray:
    """[n, length] read-only strided view: row i is samples[i * hop : i * hop + length]."""
    step = samples.strides[0]
    return np.lib.stride_tricks.as_strided(samples, (n, length), (hop * step, step), writeable=False)


_BLAS_CONTROLLER: Any = None


def _single_threaded_blas() -> Any:
    """Context manager limiting numpy's BLAS to one thread (a no-op where threadpoolctl is not installed).

    The workers' small mel matmuls gain nothing from numpy's OpenBLAS threads, which would otherwise fight the
    workers for the cores (and spin on them after each call).
    """
    global _BLAS_CONTROLLER
    if _BLAS_CONTROLLER is None:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _BLAS_CONTROLLER = False
        else:
            _BLAS_CONTROLLER = ThreadpoolController()  # scans the loaded libraries once
    return _BLAS_CONTROLLER.limit(limits=1, user_api="blas") if _BLAS_CONTROLLER else contextlib.nullcontext()
