"""Log-mel features on the CPU: numpy, in chunks of frames on worker threads, with the reference's arithmetic.

Each work item is a run of up to FRAMES_PER_CHUNK frames of one clip (small chunks keep the FFT's working set in
cache). The FFTs, numpy's ufuncs and its matmul release the GIL, so the chunks run in parallel on torch's thread
budget. Per chunk of n frames:

    samples x [(n - 1) * hop + frame + 1] float32 (padding added only where the chunk passes a clip's end)
    pre-emphasis and window in float32, as the reference  -> frames [n, frame] widened into a zero-padded float64
                                                              buffer [n, n_fft]
    float64 rFFT, used bins rounded to complex64          -> the reference's spectrum bit for bit (numpy's float32
                                                              rFFT is the float64 one rounded)
    |.| and the banded mel matmul                         -> [n, n_mels], then log(max(., mel_floor))
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .audio import AudioSettings

FRAMES_PER_CHUNK = 256  # frames of one clip per work item (fastest measured: 128 and 512 take 5-15% longer)


class CpuLogMel:
    """`log_mel(clips, starts, n_frames)` -> [B, n_frames, n_mels] float32 log-mel energies.

    Clip i's float32 samples sit at [starts[i], starts[i] + len) of a padded row (padding value elsewhere); the
    rows are never materialized.
    """

    def __init__(self, settings: AudioSettings, window: np.ndarray, filters: np.ndarray):
        self.settings = settings
        self.window = window  # [frame_length] float32
        mel_bank = _BandedMelBank(filters)
        self._workers = _WorkerPool(functools.partial(_ChunkBuffers, settings, mel_bank))

    def __call__(self, clips: list[np.ndarray], starts: list[int], n_frames: int) -> np.ndarray:
        s = self.settings
        frame, hop = s.frame_length, s.hop_length
        out = np.empty((len(clips), n_frames, s.feature_size), dtype=np.float32)
        chunks = [
            (row, first, min(first + FRAMES_PER_CHUNK, n_frames))
            for row in range(len(clips))
            for first in range(0, n_frames, FRAMES_PER_CHUNK)
        ]

        def run(buffers: _ChunkBuffers, chunk: tuple[int, int, int]) -> None:
            row, first, end = chunk
            # the padded-row samples [first * hop, (end - 1) * hop + frame + 1) that these frames use
            x = _padded_span(clips[row], starts[row], first * hop, (end - 1) * hop + frame + 1, s.padding_value)
            mel = out[row, first:end]
            buffers.mel(x, end - first, self.window, mel)
            np.log(np.maximum(mel, s.mel_floor, out=mel), out=mel)

        with _single_threaded_blas():
            self._workers.run(run, chunks)
        return out


def _padded_span(clip: np.ndarray, start: int, first: int, end: int, padding_value: float) -> np.ndarray:
    """Samples [first, end) of a padded row whose real samples `clip` sit at [start, start + len(clip)): a view
    where the span lies inside the clip, else a copy filled with the padding value around the overlap."""
    if start <= first and end <= start + clip.shape[0]:
        return clip[first - start : end - start]
    span = np.full(end - first, padding_value, dtype=np.float32)
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
        self._forget_threads()
        _after_fork_in_child(self, _WorkerPool._forget_threads)

    def _forget_threads(self) -> None:
        """Start over without helper threads (also in a forked child, which has none of its parent's threads)."""
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

        budget = torch.get_num_threads()
        helpers = min(budget, len(items)) - 1
        futures = [self._helpers(budget - 1).submit(drain) for _ in range(helpers)] if helpers > 0 else []
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
        rows, frame = FRAMES_PER_CHUNK, settings.frame_length
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


class _OneBlasThread:
    """Context manager limiting numpy's BLAS to one thread while any call is inside (a no-op where threadpoolctl is
    not installed).

    The workers' small mel matmuls gain nothing from numpy's OpenBLAS threads, which would otherwise fight the
    workers for the cores (and spin on them after each call). The limit is process-wide, so overlapping calls
    share it: the first one in sets it and the last one out restores the user's setting. Both happen on one
    dedicated thread, because threadpoolctl lets only the thread that set an OpenBLAS limit change it again (a
    limit set by one caller and restored by another would silently stay).
    """

    def __init__(self) -> None:
        self._controller: Any = None
        self._forget_threads()
        _after_fork_in_child(self, _OneBlasThread._forget_threads)

    def _forget_threads(self) -> None:
        """Start over with a new control thread (also in a forked child, where the parent's threads do not exist;
        the child keeps the BLAS setting it was forked with)."""
        self._lock = threading.Lock()
        self._inside = 0
        self._limiter = None
        self._control_thread = ThreadPoolExecutor(1, "gemma3n-blas-limit")

    def _set(self) -> Any:
        if self._controller is None:
            try:
                from threadpoolctl import ThreadpoolController
            except ImportError:
                self._controller = False
            else:
                self._controller = ThreadpoolController()  # scans the loaded libraries once
        if not self._controller:
            return None
        limiter = self._controller.limit(limits=1, user_api="blas")
        limiter.__enter__()
        return limiter

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                self._limiter = self._control_thread.submit(self._set).result()
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0 and self._limiter is not None:
                    limiter, self._limiter = self._limiter, None
                    self._control_thread.submit(limiter.__exit__, None, None, None).result()


def _after_fork_in_child(instance: Any, reset: Callable[[Any], None]) -> None:
    """Call reset(instance) in every forked child while the instance lives (e.g. DataLoader workers): a thread pool
    copied by fork has no threads, and work handed to it would wait forever."""
    ref = weakref.ref(instance)

    def in_child() -> None:
        alive = ref()
        if alive is not None:
            reset(alive)

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=in_child)


_single_threaded_blas = _OneBlasThread()
