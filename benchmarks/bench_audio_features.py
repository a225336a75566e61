"""Time log-mel feature extraction for a batch of 8 x 30 s clips: gemma3n vs transformers' Gemma3nAudioFeatureExtractor.

    python benchmarks/bench_audio_features.py [--batch 8] [--seconds 30] [--rounds 15] [--calls 3] [--threads N]
                                              [--out bench_out/audio_features.json]

Both sides get the same 16 kHz float32 waveforms (no resampling) and produce [batch, 2997, 128] features plus
masks; the script reports the largest absolute difference between the two outputs, and a floor: the time of the
float64 FFTs alone (on all threads), which any extractor as accurate as the reference must pay.

The implementations are interleaved: each round runs each of them in turn, so a slow phase of a shared machine
hits all of them alike. In its turn an implementation waits (--pause, so that BLAS threads left spinning by the
previous one go quiet), then is called --calls times back to back. Two figures come out of that:
- after a pause: the first call of each turn (idle CPUs wake up slowly on a virtual machine, which costs a short
  multi-threaded call more than a long single-threaded one);
- back to back: the later calls of each turn, the steady state of a job that extracts batch after batch.
Speed-ups are medians over rounds of the per-round ratio reference / implementation.
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


def time_interleaved(runners: dict, rounds: int, calls: int, pause_s: float) -> dict[str, list[list[float]]]:
    """Wall times [round][call] of each runner: per round, each runner in turn waits pause_s, then is called
    `calls` times back to back."""
    times: dict[str, list[list[float]]] = {name: [] for name in runners}
    for fn in runners.values():
        fn()  # warm-up
    for _ in range(rounds):
        for name, fn in runners.items():
            time.sleep(pause_s)
            turn = []
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                turn.append(time.perf_counter() - start)
            times[name].append(turn)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3, help="back-to-back calls per turn (at least 2)")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds of idle time before each turn")
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
    if args.calls < 2:
        parser.error("--calls must be at least 2 (the first call of a turn is the after-a-pause figure)")
    times = time_interleaved(runners, args.rounds, args.calls, args.pause)

    def regimes(turns: list[list[float]]) -> dict[str, list[float]]:
        return {"after_pause": [t[0] for t in turns], "back_to_back": [statistics.median(t[1:]) for t in turns]}

    ref_out = runners["reference"]()
    ref_times = regimes(times["reference"])
    rows = {}
    for name, fn in runners.items():
        row: dict = {}
        for regime, per_round in regimes(times[name]).items():
            ratios = [ref / ours for ref, ours in zip(ref_times[regime], per_round, strict=True)]
            row[regime] = {
                "median_s": statistics.median(per_round),
                "min_s": min(per_round),
                "speedup_per_round_median": statistics.median(ratios),
                "speedup_per_round_range": [min(ratios), max(ratios)],
            }
        if name in variants:
            features, mask = fn()
            row["max_abs_diff"] = (features - ref_out["input_features"]).abs().max().item()
            row["masks_equal"] = bool(torch.equal(mask, ref_out["input_features_mask"]))
        rows[name] = row
    floor = rows["FFT alone (floor)"]["back_to_back"]
    result = {
        "batch": args.batch,
        "seconds_per_clip": args.seconds,
        "feature_shape": list(ref_out["input_features"].shape),
        "rounds": args.rounds,
        "calls_per_turn": args.calls,
        "pause_s": args.pause,
        "results": rows,
        "times_s": times,
        "torch_threads": threads,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    lines = [
        f"log-mel features, {args.batch} x {args.seconds:g} s clips -> {tuple(ref_out['input_features'].shape)}, "
        f"{threads} torch threads on {os.cpu_count()} CPUs; {args.rounds} rounds",
        "",
        f"| {'':20s} | {'after pause (s)':>15s} | {'speed-up':>8s} | {'back to back (s)':>16s} | {'speed-up':>8s} "
        f"| {'max abs diff':>12s} |",
        f"|{'-' * 22}|{'-' * 16}:|{'-' * 9}:|{'-' * 17}:|{'-' * 9}:|{'-' * 13}:|",
    ]
    for name, row in rows.items():
        diff = f"{row['max_abs_diff']:.1e}" if "max_abs_diff" in row else "-"
        cells = []
        for regime in ("after_pause", "back_to_back"):
            cells.append(f"{row[regime]['median_s']:.3f}")
            cells.append(f"{row[regime]['speedup_per_round_median']:.1f}x" if name != "reference" else "-")
        lines.append(
            f"| {name:20s} | {cells[0]:>15s} | {cells[1]:>8s} | {cells[2]:>16s} | {cells[3]:>8s} | {diff:>12s} |"
        )
    lines += [
        "",
        "times: medians over rounds; speed-up: median over rounds of reference time / time in the same round",
        f"FFT-alone floor back to back on {threads} threads: {floor['median_s']:.3f} s -> at most "
        f"{floor['speedup_per_round_median']:.1f}x for an extractor as accurate as the reference",
    ]
    print("\n".join(lines))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
