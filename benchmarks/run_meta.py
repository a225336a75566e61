"""What a microbenchmark records about its run (command, machine, load, torch), and its JSON output."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

T = TypeVar("T")


def command_line(script: str, args: argparse.Namespace) -> str:
    """``python <script> --option value ...`` for every parsed option (lists space-separated): the command to record."""
    options = (f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items())
    return f"python {script} " + " ".join(options)


def run_meta(command: str, load_before: tuple[float, float, float]) -> dict:
    """The run's command, machine, CPU count, load average before and now, and torch version."""
    return {
        "command": command,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
    }


def write_json(out: Path, meta: dict, rows: list[dict]) -> None:
    """``out``.json with the run's meta and rows (the folder is made if needed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


def peak_rss_gb() -> float:
    """This process's peak resident set (VmHWM in ``/proc/self/status``), GB.

    Not ``getrusage``'s ``ru_maxrss``: Linux carries that over an exec from the process image it replaces, so a child
    forked from a large parent (one that has just built a checkpoint, say) reports at least the parent's size."""
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def interleaved_rounds(variants: dict[str, T], measure: Callable[[T], float], rounds: int) -> dict[str, list[float]]:
    """``measure(variant)`` for every variant once per round, the variants alternating within each round, so that the
    machine's drift (other jobs, clock changes) reaches all of them alike; returns each variant's measures."""
    measures: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, variant in variants.items():
            measures[name].append(measure(variant))
    return measures


def median_and_range(values: list[float], scale: float = 1.0) -> tuple[float, list[float]]:
    """(median, [min, max]) of ``values``, each times ``scale`` (a unit change)."""
    return statistics.median(values) * scale, [min(values) * scale, max(values) * scale]
