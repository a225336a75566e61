"""Caption the same images with the plain ``gemma3n caption`` and with ``--ray --workers N``: images per minute and
Ray's overhead against the plain run.

    flock /tmp/gemma3n-heavy.lock python benchmarks/bench_ray.py [--model tiny-random] [--images 32] [--rounds 2]
        [--workers 1 2] [--batch-size 4] [--dtype bfloat16] [--name ray_tiny]

Each run is a fresh process (``python -m gemma3n caption``, writing to a fresh --output), so every figure includes
what a user pays: Python and torch imports, model loading and, for Ray, starting a local Ray instance (2 CPUs here)
and its actors. Runs are interleaved (each round runs every mode, in a rotated order) so a slow phase of a shared
machine hits all alike. Two figures per run:
- whole command: images / wall time of the command;
- steady state: rows per second between the first and the last row written (the parent polls the output file
  every 20 ms), i.e. throughput once the model is loaded and Ray is up.
Overhead = median wall time of a mode / median wall time of the plain run - 1. Load averages before and after are
recorded (the machine may be shared). Writes JSON and a markdown table into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"


def image_folder(root: Path, count: int) -> Path:
    """``count`` image files: the example images repeated under distinct names."""
    sources = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg"))
    folder = root / "images"
    folder.mkdir()
    for i in range(count):
        source = sources[i % len(sources)]
        shutil.copy(source, folder / f"{i:03d}{source.suffix}")
    return folder


def run_once(command: list[str], output: Path, expected_rows: int) -> dict:
    """Run ``command`` and time it: wall seconds, and the times the first and the last row appeared in ``output``."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    first = last = None
    rows = 0
    while process.poll() is None:
        if output.exists():
            now_rows = output.read_bytes().count(b"\n")
            if now_rows > rows:
                now = time.perf_counter() - start
                first = now if first is None else first
                last, rows = now, now_rows
        time.sleep(0.02)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    rows = output.read_bytes().count(b"\n") if output.exists() else 0
    if process.returncode != 0 or rows != expected_rows:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode} with {rows} rows:\n{stderr[-2000:]}")
    return {"wall_s": wall, "first_row_s": first, "last_row_s": last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--name", default="ray_tiny", help="results file stem in benchmarks/results/")
    args = parser.parse_args()

    modes = {"plain": []} | {
        f"ray, {n} worker{'s' if n > 1 else ''}": ["--ray", "--workers", str(n)] for n in args.workers
    }
    common = [sys.executable, "-m", "gemma3n", "caption", "--model", args.model, "--batch-size", str(args.batch_size)]
    if args.dtype:
        common += ["--dtype", args.dtype]
    if args.max_new_tokens:
        common += ["--max-new-tokens", str(args.max_new_tokens)]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        folder = image_folder(Path(tmp), args.images)
        names = list(modes)
        for r in range(args.rounds):
            for mode in names[r % len(names) :] + names[: r % len(names)]:
                output = Path(tmp) / f"out-{r}-{len(runs[mode])}-{mode.replace(' ', '').replace(',', '_')}.jsonl"
                result = run_once(
                    [*common[:4], str(folder), *common[4:], *modes[mode], "--output", str(output)], output, args.images
                )
                runs[mode].append(result)
                print(f"round {r}: {mode}: {result['wall_s']:.1f} s", file=sys.stderr)
    load_after = os.getloadavg()

    plain_wall = statistics.median(run["wall_s"] for run in runs["plain"])
    summary = {}
    for mode, results in runs.items():
        walls = [run["wall_s"] for run in results]
        steady = [
            (args.images - 1) / (run["last_row_s"] - run["first_row_s"]) * 60
            for run in results
            if run["first_row_s"] is not None and run["last_row_s"] > run["first_row_s"]
        ]
        summary[mode] = {
            "wall_s_median": statistics.median(walls),
            "wall_s_range": [min(walls), max(walls)],
            "images_per_min": args.images / statistics.median(walls) * 60,
            "steady_images_per_min": statistics.median(steady) if steady else None,
            "first_row_s_median": statistics.median(run["first_row_s"] for run in results),
            "overhead_vs_plain": statistics.median(walls) / plain_wall - 1,
        }
    report = {
        "command": " ".join(["python", "benchmarks/bench_ray.py", *sys.argv[1:]]),
        "model": args.model,
        "images": args.images,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "summary": summary,
        "runs": runs,
    }
    results_dir = ROOT / "benchmarks" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# `gemma3n caption` plain vs `--ray`: {args.images} images, {args.model}, batch size {args.batch_size}",
        "",
        f"`{report['command']}` — {os.cpu_count()} CPUs, {args.rounds} interleaved rounds, each run a fresh process; "
        f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} (1 min).",
        "",
        "| mode | wall s, median (range) | images/min (whole command) | images/min (steady state) | "
        "first row after, s | overhead vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for mode, s in summary.items():
        steady = "n/a" if s["steady_images_per_min"] is None else f"{s['steady_images_per_min']:.0f}"
        lines.append(
            f"| {mode} | {s['wall_s_median']:.1f} ({s['wall_s_range'][0]:.1f}-{s['wall_s_range'][1]:.1f}) | "
            f"{s['images_per_min']:.0f} | {steady} | {s['first_row_s_median']:.1f} | {s['overhead_vs_plain']:+.0%} |"
        )
    markdown = "\n".join(lines) + "\n"
    (results_dir / f"{args.name}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
