"""Cold-process startup: ``gemma3n --help`` and a one-image tiny-random caption, wall time and where it goes.

    python benchmarks/bench_startup.py --rounds 7 --baseline main

Every run is a fresh ``python -m gemma3n ...`` process (what the ``gemma3n`` script runs, without the launcher a
version manager such as pyenv may put in front of it), started from an empty folder with ``PYTHONPATH`` pointing at
the code under test. Per round, in this order: ``--help``, then ``caption examples/images/<image> --model tiny-random
--output <tmp> --overwrite --timings``, for this checkout and (``--baseline REF``) for the git revision REF exported
to a temporary folder; plus reference floors: ``python -c pass``, ``import torch`` and ``import torch, timm``. The
caption's ``--timings`` line gives the per-phase split (imports / load / processor / vision / decode, ...); "exit" is
the wall time left after the command's last line (interpreter teardown). Before the rounds, one caption run builds
tiny-random into an empty ``GEMMA3N_CACHE`` (the very first run on a machine); the rounds reuse that cache.

The whole run holds /tmp/gemma3n-heavy.lock (``--lock``). Writes JSON and a markdown table (``--out``, default
benchmarks/results/startup_cpu.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from locking import maybe_locked  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMINGS_MARK = "timings (s): "


def export_revision(ref: str, into: Path) -> Path:
    """The ``gemma3n`` package of git revision ``ref`` written under ``into`` (a PYTHONPATH root)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref, "gemma3n"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def timed_run(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start, result


def parse_timings(stderr: str) -> dict[str, float] | None:
    for line in stderr.splitlines():
        if TIMINGS_MARK in line:
            return json.loads(line.split(TIMINGS_MARK, 1)[1])
    return None


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--image", default="cat.png", help="a file of examples/images")
    parser.add_argument("--baseline", default=None, metavar="REF", help="also time this git revision (e.g. main)")
    parser.add_argument(
        "--passive-omp",
        action="store_true",
        help="add a caption row of this checkout with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep, not spin)",
    )
    parser.add_argument("--lock", default="/tmp/gemma3n-heavy.lock", help="flock held for the whole run ('' for none)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "startup_cpu"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        tmp_path = Path(tmp)
        workdir = tmp_path / "cwd"  # empty: `python -m gemma3n` must not find a package in its working directory
        workdir.mkdir()
        cache = tmp_path / "cache"
        image = str(ROOT / "examples" / "images" / args.image)
        codes = {"this checkout": ROOT}
        if args.baseline:
            codes[f"baseline ({args.baseline})"] = export_revision(args.baseline, tmp_path / "baseline")
        output = str(tmp_path / "captions.jsonl")
        caption = ["caption", image, "--model", "tiny-random", "--output", output, "--overwrite", "--timings"]
        python = [sys.executable]

        def env_for(code: Path, extra: dict[str, str]) -> dict[str, str]:
            return {**os.environ, "PYTHONPATH": str(code), "GEMMA3N_CACHE": str(cache), **extra}

        commands: dict[str, tuple[list[str], Path, dict[str, str]]] = {}
        for label, code in codes.items():
            commands[f"{label}: gemma3n --help"] = ([*python, "-m", "gemma3n", "--help"], code, {})
            has_timings = '"--timings"' in (code / "gemma3n" / "cli.py").read_text(encoding="utf-8")
            run = caption if has_timings else caption[:-1]  # an older revision: wall time only
            commands[f"{label}: gemma3n caption (1 image, tiny-random)"] = ([*python, "-m", "gemma3n", *run], code, {})
        if args.passive_omp:
            passive = {"OMP_WAIT_POLICY": "PASSIVE"}
            commands["this checkout, OMP_WAIT_POLICY=PASSIVE: gemma3n caption (1 image, tiny-random)"] = (
                [*python, "-m", "gemma3n", *caption],
                ROOT,
                passive,
            )
        commands["floor: python -c pass"] = ([*python, "-c", "pass"], ROOT, {})
        commands["floor: python -c 'import torch'"] = ([*python, "-c", "import torch"], ROOT, {})
        commands["floor: python -c 'import torch, timm'"] = ([*python, "-c", "import torch, timm"], ROOT, {})

        walls: dict[str, list[float]] = {name: [] for name in commands}
        phases: dict[str, list[dict[str, float]]] = {name: [] for name in commands}
        with maybe_locked(args.lock or None):
            load_before = os.getloadavg()
            first_wall, first = timed_run([*python, "-m", "gemma3n", *caption], env_for(ROOT, {}), workdir)
            if first.returncode != 0:
                sys.exit(f"the first caption run failed:\n{first.stderr}")
            first_timings = parse_timings(first.stderr)
            print(f"first run (builds tiny-random): {first_wall:.2f} s", file=sys.stderr)
            for round_index in range(args.rounds):
                for name, (command, code, extra) in commands.items():
                    wall, result = timed_run(command, env_for(code, extra), workdir)
                    if result.returncode != 0:
                        sys.exit(f"{name} failed (exit {result.returncode}):\n{result.stderr}")
                    walls[name].append(wall)
                    timings = parse_timings(result.stderr)
                    if timings is not None:
                        timings["exit"] = max(0.0, wall - timings.get("startup", 0.0) - timings["total"])
                        phases[name].append(timings)
                print(f"round {round_index + 1}/{args.rounds} done, load {os.getloadavg()[0]:.2f}", file=sys.stderr)
            load_after = os.getloadavg()

    results = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "load_average_before": load_before,
        "load_average_after": load_after,
        "rounds": args.rounds,
        "first_run_builds_checkpoint_s": first_wall,
        "first_run_timings": first_timings,
        "wall_s": {name: summary(values) for name, values in walls.items()},
        "phases_s": {
            name: {key: summary([run[key] for run in runs if key in run]) for key in runs[0]}
            for name, runs in phases.items()
            if runs
        },
        "command": "python benchmarks/bench_startup.py " + " ".join(sys.argv[1:]),
        "commit": subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [
        "# Cold-process startup (CPU)",
        "",
        f"`{results['command']}` at {results['commit']}; {results['machine']['cpus']} CPUs, "
        f"Python {results['machine']['python']}; "
        f"{results['rounds']} interleaved rounds; load average (1, 5, 15 min) before "
        f"{', '.join(f'{x:.2f}' for x in results['load_average_before'])}, after "
        f"{', '.join(f'{x:.2f}' for x in results['load_average_after'])}.",
        "",
        f"Very first run (builds the tiny-random checkpoint into an empty cache, then captions): "
        f"{results['first_run_builds_checkpoint_s']:.2f} s.",
        "",
        "| command | wall median (s) | range (s) |",
        "|---|---|---|",
    ]
    for name, stats in results["wall_s"].items():
        lines.append(f"| {name} | {stats['median']:.2f} | {stats['min']:.2f}-{stats['max']:.2f} |")
    for name, keys in results["phases_s"].items():
        lines += ["", f"Phases of `{name.split(': ', 1)[1]}`, {name.split(': ', 1)[0]} (s, median and range):", ""]
        lines += ["| phase | median | range |", "|---|---|---|"]
        for key, stats in keys.items():
            lines.append(f"| {key} | {stats['median']:.3f} | {stats['min']:.3f}-{stats['max']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
