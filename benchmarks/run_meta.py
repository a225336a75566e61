"""What a microbenchmark records about its run (command, machine, load, torch), and its JSON output."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


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
