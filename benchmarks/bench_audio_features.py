"""Time log-mel feature extraction for a batch of 8 x 30 s clips: gemma3n vs transformers' Gemma3nAudioFeatureExtractor.

    python benchmarks/bench_audio_features.py [--batch 8] [--seconds 30] [--repeats 15] [--threads N]
                                              [--out bench_out/audio_features.json]

Both sides get the same 16 kHz float32 waveforms (no resampling) and produce [batch, 2997, 128] features plus
masks; the script reports the largest absolute difference between the two outputs, and a floor: the time of the
float64 FFTs alone (on all threads), which any extractor as accurate as the reference must pay.
The runs are interleaved (one of each per round), so a slow phase of a shared machine hits all of them alike; the
speed-up is given both as the ratio of the medians and as the median of the per-round ratios.
Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gemma3n.processors import AudioFeatureExtractor


def make_clips(batch: int, seconds: float, rate: int = 16_000, seed: int = 0) -> list[np.ndarray]:
    """Voiced-speech-like clips: a harmonic series on a wandering pitch, shaped by three formants, in syllables
    (about 4 per second) with short pauses, over a -60 dB noise floor; different in every clip."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    clips = []
    for _ in range(batch):
        pitch = rng.uniform(90, 220) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))  # Hz
        phase = 2 * np.pi * np.cumsum(pitch) / rate
        formants = rng.uniform([300, 900, 2200], [800, 1800, 3200])
        voiced = np.zeros(n)
        for harmonic in range(1, 40):
            gain = sum(np.exp(-(((harmonic * pitch - f) / 150.0) ** 2)) for f in formants) / harmonic
            voiced += gain * np.sin(harmonic * phase)
        syllables = np.clip(np.sin(2 * np.pi * rng.uniform(3, 5) * t + rng.uniform(0, 6)), 0, None)
        x = 0.3 * voiced / np.abs(voiced).max() * syllables + 1e-3 * rng.standard_normal(n)
        clips.append(x.astype(np.float32))
    return clips


def time_interleaved(runners: dict, repeats: int, pause_s: float) -> dict[str, list[float]]:
    """Wall times of each runner, interleaved so that all see the same machine load. The pause lets BLAS worker
    threads left spinning by one run go idle before the next run starts (otherwise they slow whoever runs next)."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in runners.items():
            time.sleep(pause_s)
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--pause", type=float, default=0.5, help="seconds of idle time before each timed run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="bench_out/audio_features.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import Gemma3nAudioFeatureExtractor  # reference; only needed for the benchmark

    clips = make_clips(args.batch, args.seconds)
    reference = Gemma3nAudioFeatureExtractor()
    variants = {"gemma3n": AudioFeatureExtractor()}
    runners = {"reference": lambda: reference(clips, return_tensors="pt")}
    for name, extractor in variants.items():
        runners[name] = lambda e=extractor: e(e.prepare(clips))
    # The floor for any implementation as accurate as the reference: a float64 FFT of every frame (the reference's
    # numpy float32 FFT is one, rounded), with numpy's FFT as gemma3n uses it, in 256-frame chunks on all threads, and
    # nothing else.
    threads = torch.get_num_threads()
    n_chunks = -(-args.batch * ((int(args.seconds * 16_000) - 513) // 160 + 1) // 256)
    padded = np.zeros((threads, 256, 1024))
    padded[..., :512] = np.random.default_rng(0).standard_normal((threads, 256, 512)).astype(np.float32)
    spectra = np.empty((threads, 256, 513), dtype=np.complex128)
    pool = ThreadPoolExecutor(threads)

    def fft_chunks(worker: int) -> None:
        for _ in range(worker, n_chunks, threads):
            np.fft.rfft(padded[worker], axis=-1, out=spectra[worker])

    runners["FFT alone (floor)"] = lambda: list(pool.map(fft_chunks, range(threads)))
    times = time_interleaved(runners, args.repeats, args.pause)

    ref_out = runners["reference"]()
    ref_median = statistics.median(times["reference"])
    rows = {}
    for name, fn in runners.items():
        row = {"min_s": min(times[name]), "median_s": statistics.median(times[name])}
        row["speedup_median"] = ref_median / row["median_s"]
        if name in variants:
            features, mask = fn()
            row["speedup_min"] = min(times["reference"]) / row["min_s"]
            paired = [ref / ours for ref, ours in zip(times["reference"], times[name], strict=True)]
            row["speedup_paired_median"] = statistics.median(paired)
            row["max_abs_diff"] = (features - ref_out["input_features"]).abs().max().item()
            row["masks_equal"] = bool(torch.equal(mask, ref_out["input_features_mask"]))
        rows[name] = row
    fft_floor = rows["FFT alone (floor)"]["median_s"]
    result = {
        "batch": args.batch,
        "seconds_per_clip": args.seconds,
        "feature_shape": list(ref_out["input_features"].shape),
        "repeats": args.repeats,
        "results": rows,
        "exact_fft_floor_s": fft_floor,
        "max_speedup_with_exact_fft": ref_median / fft_floor,
        "torch_threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    lines = [
        f"log-mel features, {args.batch} x {args.seconds:g} s clips -> {tuple(ref_out['input_features'].shape)}, "
        f"{threads} torch threads on {os.cpu_count()} CPUs",
        "",
        f"| {'':30s} | {'min (s)':>8s} | {'median (s)':>10s} | {'speed-up':>8s} | {'per-round':>9s} "
        f"| {'max abs diff':>12s} |",
        f"|{'-' * 32}|{'-' * 9}:|{'-' * 11}:|{'-' * 9}:|{'-' * 10}:|{'-' * 13}:|",
    ]
    for name, row in rows.items():
        diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-"
        speedup = f"{row['speedup_median']:.1f}x"
        paired = f"{row['speedup_paired_median']:.1f}x" if "speedup_paired_median" in row else "-"
        lines.append(
            f"| {name:30s} | {row['min_s']:8.3f} | {row['median_s']:10.3f} | {speedup:>8s} | {paired:>9s} "
            f"| {diff:>12s} |"
        )
    lines += [
        "",
        "speed-up: reference median / median; per-round: median over rounds of reference time / time",
        f"FFT-alone floor on {threads} threads: {fft_floor:.3f} s -> at most "
        f"{result['max_speedup_with_exact_fft']:.1f}x for an extractor as accurate as the reference",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
