"""Caption the same images with the plain ``gemma3n caption`` and with ``--ray --workers N``: images per minute and
Ray's overhead against the plain run.

    python benchmarks/bench_ray.py [--model tiny-random] [--images 32] [--rounds 2] [--workers 1 2]
        [--mode "ray, 1 worker, 2 CPUs=--ray --workers 1 --cpus-per-worker 2"] [--batch-size 4] [--dtype bfloat16]
        [--max-new-tokens 16] [--lock /tmp/gemma3n-heavy.lock] [--name ray_tiny]

Each run is a fresh process (``python -m gemma3n caption``, writing to a fresh --output), so every figure includes
what a user pays: Python and torch imports, model loading and, for Ray, starting a local Ray instance (2 CPUs here)
and its actors. Runs are interleaved (each round runs every mode, in a rotated order) so a slow phase of a shared
machine hits all alike. Two figures per run:
- whole command: images / wall time of the command;
- steady state: rows per second between the first and the last row written (the parent polls the output file
  every 20 ms), i.e. throughput once the model is loaded and Ray is up.
Overhead = median wall time of a mode / median wall time of the plain run - 1. Load averages before and after are
recorded (the machine may be shared), and the memory of the command's process tree (Ray's processes and actors
included) is sampled every 0.5 s from /proc/PID/smaps_rollup: the peak of the summed PSS (pages shared between
processes, e.g. memory-mapped weights in the page cache, counted once in all), of the summed anonymous PSS (private
memory: copies, activations, Ray's object store excluded) and the largest single-process RSS. ``--lock FILE`` takes
that file's flock around each run (not the whole benchmark), so other jobs on a shared machine can run in between.
Writes JSON and a markdown table into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from locking import maybe_locked

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


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (from the parent ids in /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(parent, []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def tree_memory(root: int) -> dict[str, float]:
    """GB summed over the process tree of ``root``: PSS and anonymous PSS; and the largest single-process RSS."""
    pss = anon = rss_max = 0
    for pid in process_tree(root):
        try:
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        except (OSError, ValueError):
            continue
        kib = {name: int(value.split()[0]) for name, value in fields.items()}
        pss += kib.get("Pss", 0)
        anon += kib.get("Pss_Anon", 0)
        rss_max = max(rss_max, kib.get("Rss", 0))
    return {"pss_gb": pss / 2**20, "anon_gb": anon / 2**20, "rss_max_gb": rss_max / 2**20}


def run_once(command: list[str], output: Path, expected_rows: int) -> dict:
    """Run ``command`` and time it: wall seconds, the times the first and the last row appeared in ``output``, and
    the peak memory of its process tree (sampled every 0.5 s)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    first = last = None
    rows = 0
    peak = {"pss_gb": 0.0, "anon_gb": 0.0, "rss_max_gb": 0.0}
    next_sample = 0.0
    while process.poll() is None:
        now = time.perf_counter() - start
        if output.exists():
            now_rows = output.read_bytes().count(b"\n")
            if now_rows > rows:
                first = now if first is None else first
                last, rows = now, now_rows
        if now >= next_sample:
            peak = {name: max(value, peak[name]) for name, value in tree_memory(process.pid).items()}
            next_sample = now + 0.5
        time.sleep(0.02)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    rows = output.read_bytes().count(b"\n") if output.exists() else 0
    if process.returncode != 0 or rows != expected_rows:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode} with {rows} rows:\n{stderr[-2000:]}")
    return {"wall_s": wall, "first_row_s": first, "last_row_s": last, **{f"peak_{k}": v for k, v in peak.items()}}


def named_mode(text: str) -> tuple[str, list[str]]:
    """``"NAME=ARGS"`` (``--mode``): a mode's name and its extra command-line arguments."""
    name, sep, extra = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"--mode needs NAME=ARGS, got {text!r}")
    return name.strip(), extra.split()


def rate(per_min: float) -> str:
    """Images per minute with 2-3 significant digits (a few per minute for E2B on 2 cores, hundreds for tiny)."""
    return f"{per_min:.0f}" if per_min >= 100 else f"{per_min:.1f}" if per_min >= 1 else f"{per_min:.2f}"


def write_results(
    args: argparse.Namespace,
    command: str,
    modes: dict[str, list[str]],
    runs: dict[str, list[dict]],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    final: bool,
) -> str:
    """Summarise the runs so far into benchmarks/results/NAME.{json,md}; returns the markdown."""
    done = {mode: results for mode, results in runs.items() if results}
    plain_wall = statistics.median(run["wall_s"] for run in runs["plain"]) if runs["plain"] else None
    summary = {}
    for mode, results in done.items():
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
            "overhead_vs_plain": None if plain_wall is None else statistics.median(walls) / plain_wall - 1,
            "peak_pss_gb_max": max(run["peak_pss_gb"] for run in results),
            "peak_anon_gb_max": max(run["peak_anon_gb"] for run in results),
            "peak_rss_max_gb_max": max(run["peak_rss_max_gb"] for run in results),
        }
    report = {
        "command": command,
        "model": args.model,
        "images": args.images,
        "batch_size": args.batch_size,
        "dtype": args.dtype,
        "max_new_tokens": args.max_new_tokens,
        "modes": modes,
        "rounds": args.rounds,
        "lock": args.lock,
        "complete": final,
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
    settings = ", ".join(
        [f"batch size {args.batch_size}"]
        + ([f"dtype {args.dtype}"] if args.dtype else [])
        + ([f"max new tokens {args.max_new_tokens}"] if args.max_new_tokens else [])
    )
    loads = ", ".join(f"{run['load_average_1min_at_start']:.1f}" for results in runs.values() for run in results)
    lines = [
        f"# `gemma3n caption` plain vs `--ray`: {args.images} images, {args.model}, {settings}",
        "",
        f"`{report['command']}` — {os.cpu_count()} CPUs, {args.rounds} interleaved round(s), each run a fresh process"
        f"{' holding ' + args.lock if args.lock else ''}; load average (1 min) before {load_before[0]:.1f}, after "
        f"{load_after[0]:.1f}, at the start of each run: {loads}."
        + ("" if final else " PARTIAL: the benchmark had not finished when this was written."),
        "",
        "| mode | wall s, median (range) | images/min (whole command) | images/min (steady state) | "
        "first row after, s | overhead vs plain | peak PSS GB | peak anon. PSS GB | largest RSS GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, s in summary.items():
        steady = "n/a" if s["steady_images_per_min"] is None else rate(s["steady_images_per_min"])
        overhead = "n/a" if s["overhead_vs_plain"] is None else f"{s['overhead_vs_plain']:+.0%}"
        lines.append(
            f"| {mode} (`{' '.join(modes[mode]) or 'no Ray'}`) | {s['wall_s_median']:.1f} "
            f"({s['wall_s_range'][0]:.1f}-{s['wall_s_range'][1]:.1f}) | {rate(s['images_per_min'])} | {steady} | "
            f"{s['first_row_s_median']:.1f} | {overhead} | {s['peak_pss_gb_max']:.2f} | "
            f"{s['peak_anon_gb_max']:.2f} | {s['peak_rss_max_gb_max']:.2f} |"
        )
    markdown = "\n".join(lines) + "\n"
    (results_dir / f"{args.name}.md").write_text(markdown)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    parser.add_argument(
        "--mode",
        type=named_mode,
        action="append",
        default=[],
        help='one more mode, "NAME=ARGS" (ARGS added to the command), e.g. "ray, 1 worker, 2 CPUs=--ray --workers 1 '
        '--cpus-per-worker 2"; repeatable',
    )
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--lock", default=None, help="flock this file around each run (e.g. /tmp/gemma3n-heavy.lock)")
    parser.add_argument("--name", default="ray_tiny", help="results file stem in benchmarks/results/")
    parser.add_argument(
        "--rewrite", action="store_true", help="run nothing: write the markdown again from results/NAME.json"
    )
    args = parser.parse_args(argv)
    if args.rewrite:
        report = json.loads((ROOT / "benchmarks" / "results" / f"{args.name}.json").read_text())
        for key in ("model", "images", "batch_size", "dtype", "max_new_tokens", "rounds"):
            setattr(args, key, report[key])
        words = shlex.split(report["command"])
        args.lock = report.get("lock", words[words.index("--lock") + 1] if "--lock" in words else None)
        loads = (report["load_average_before"], report["load_average_after"])
        print(write_results(args, report["command"], report["modes"], report["runs"], *loads, report["complete"]))
        return
    command = shlex.join(["python", "benchmarks/bench_ray.py", *(sys.argv[1:] if argv is None else argv)])

    modes = {"plain": []} | {
        f"ray, {n} worker{'s' if n > 1 else ''}": ["--ray", "--workers", str(n)] for n in args.workers
    }
    modes |= dict(args.mode)
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
                run_command = [*common[:4], str(folder), *common[4:], *modes[mode], "--output", str(output)]
                with maybe_locked(args.lock):
                    load = os.getloadavg()[0]
                    result = run_once(run_command, output, args.images)
                result["load_average_1min_at_start"] = load
                runs[mode].append(result)
                print(
                    f"round {r}: {mode}: {result['wall_s']:.1f} s, peak PSS {result['peak_pss_gb']:.1f} GB, "
                    f"load {load:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
                write_results(args, command, modes, runs, load_before, os.getloadavg(), final=False)  # a partial table
    print(write_results(args, command, modes, runs, load_before, os.getloadavg(), final=True))


if __name__ == "__main__":
    main()
