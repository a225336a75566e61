"""Time log-mel feature extraction for a batch of 8 x 30 s clips: gemma3n vs transformers' Gemma3nAudioFeatureExtractor.

    python benchmarks/bench_audio_features.py [--batch 8] [--seconds 30] [--repeats 5] [--threads N]
                                              [--out bench_out/audio_features.json]

Both sides get the same 16 kHz float32 waveforms (no resampling) and produce [batch, 2997, 128] features plus
masks; the script also reports the largest absolute difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from gemma3n.processors import AudioFeatureExtractor


def make_clips(batch: int, seconds: float, rate: int = 16_000, seed: int = 0) -> list[np.ndarray]:
    """Speech-like test signals: a few drifting tones over low-level noise, different in every clip."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    clips = []
    for _ in range(batch):
        x = 0.01 * rng.standard_normal(t.size)
        for _ in range(4):
            f0, drift = rng.uniform(100, 3000), rng.uniform(-20, 20)
            x += rng.uniform(0.05, 0.3) * np.sin(2 * np.pi * (f0 + drift * t) * t)
        clips.append(x.astype(np.float32))
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", default="bench_out/audio_features.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import Gemma3nAudioFeatureExtractor  # reference; only needed for the benchmark

    clips = make_clips(args.batch, args.seconds)
    reference = Gemma3nAudioFeatureExtractor()
    variants = {
        "gemma3n (numpy FFT, default)": AudioFeatureExtractor(fft_backend="numpy"),
        "gemma3n (torch FFT)": AudioFeatureExtractor(fft_backend="torch"),
    }
    runners = {"reference": lambda: reference(clips, return_tensors="pt")}
    for name, extractor in variants.items():
        runners[name] = lambda e=extractor: e(e.prepare(clips))

    # Interleave the runs so that every implementation sees the same machine load (the CPU may be shared).
    times: dict[str, list[float]] = {name: [] for name in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    ref_out = runners["reference"]()
    ref_median = statistics.median(times["reference"])
    rows = {}
    for name, fn in runners.items():
        row = {"min_s": min(times[name]), "median_s": statistics.median(times[name])}
        if name != "reference":
            features, mask = fn()
            row["speedup_median"] = ref_median / row["median_s"]
            row["speedup_min"] = min(times["reference"]) / row["min_s"]
            row["max_abs_diff"] = (features - ref_out["input_features"]).abs().max().item()
            row["masks_equal"] = bool(torch.equal(mask, ref_out["input_features_mask"]))
        rows[name] = row

    result = {
        "batch": args.batch,
        "seconds_per_clip": args.seconds,
        "feature_shape": list(ref_out["input_features"].shape),
        "repeats": args.repeats,
        "results": rows,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    print(f"log-mel features, {args.batch} x {args.seconds:g} s clips -> {tuple(ref_out['input_features'].shape)}")
    print(f"{'':30s} {'min (s)':>8s} {'median (s)':>11s} {'speed-up':>9s} {'max |diff|':>11s}")
    for name, row in rows.items():
        speedup = f"{row['speedup_median']:.1f}x" if "speedup_median" in row else "1.0x"
        diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-"
        print(f"{name:30s} {row['min_s']:8.3f} {row['median_s']:11.3f} {speedup:>9s} {diff:>11s}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
