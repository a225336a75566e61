"""The CPU row kernels of two commits, built side by side: GB/s of weight read by bf16, int8 and int4 products of 1
and 4 rows on E2B-sized weights (42 of them, read from memory), each build in its own process, alternating.

    flock /tmp/gemma3n-heavy.lock python benchmarks/row_kernel_builds.py --revisions b83ad98^ b83ad98

What it backs: changes inside ``gemma3n/csrc/few_row_products.cpp`` that keep its ops (the software prefetch of
b83ad98). Each process builds ``few_row_products.cpp`` as it was at one revision (``git show``) under its own
extension name and times the three ops on the same seeded weights; the Python side (int4 packing) is the working
tree's. Writes JSON and a markdown table of medians and ranges over ``--rounds``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from run_meta import command_line, median_and_range, run_meta, write_json

ROOT = Path(__file__).resolve().parent.parent
SHAPES = [(8192, 2048), (8192, 2048), (2048, 8192), (2048, 2048), (2048, 2048), (512, 2048), (512, 2048)]
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-fopenmp"]


def child(source: str, name: str) -> dict[str, float]:
    """Build ``source`` as extension ``name`` and time its products: {"int8 4": GB/s, ...}, best of 3 passes."""
    import torch
    from torch.utils.cpp_extension import load

    torch.set_num_threads(os.cpu_count() or 1)
    load(name, [source], extra_cflags=FLAGS, extra_ldflags=["-fopenmp"], is_python_module=False)
    from gemma3n.quantize import Int4Linear

    generator = torch.Generator().manual_seed(0)
    int8, int4, bf16 = [], [], []
    for _ in range(6):
        for n, k in SHAPES:
            int8.append((torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8), torch.rand(n) / 100))
            weight = torch.randn(n, k, generator=generator).bfloat16()
            if len(bf16) < 14:  # two sets of the shapes in bf16: 243 MB, out of cache
                bf16.append(weight)
            layer = Int4Linear.from_weight(weight, 64)
            int4.append((layer.packed, layer.scales_and_zeros, n))
    x_all = torch.randn(4, 8192, generator=generator).bfloat16()
    ops = torch.ops.gemma3n_cpu
    products = {
        "bf16": (bf16, lambda x, w: ops.bf16_few_row_product(x[:, : w.shape[1]].contiguous(), w), 2),
        "int8": (int8, lambda x, w: ops.int8_few_row_product(x[:, : w[0].shape[1]].contiguous(), *w), 1),
        "int4": (
            int4,
            lambda x, w: ops.int4_few_row_product(x[:, : w[1].shape[0] * 64].contiguous(), *w[:2], 64, w[2]),
            0.5,
        ),
    }
    result = {}
    for fmt, (weights, product, bytes_per_weight) in products.items():
        total = sum(w.numel() if fmt == "bf16" else w[0].numel() * (2 if fmt == "int4" else 1) for w in weights)
        for rows in (1, 4):
            x = x_all[:rows]
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for w in weights:
                    product(x, w)
                best = min(best, time.perf_counter() - start)
            result[f"{fmt} {rows}"] = total * bytes_per_weight / best / 1e9
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revisions", nargs=2, default=["b83ad98^", "b83ad98"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "row_kernel_builds")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return
    del args.child  # not part of the command to record
    load_before = os.getloadavg()
    sources = {}
    with tempfile.TemporaryDirectory() as folder:
        for i, revision in enumerate(args.revisions):
            text = subprocess.run(
                ["git", "show", f"{revision}:gemma3n/csrc/few_row_products.cpp"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            sources[revision] = Path(folder) / f"build{i}.cpp"
            sources[revision].write_text(text)
        runs: dict[str, list[dict]] = {revision: [] for revision in args.revisions}
        for round_index in range(args.rounds):
            for i, revision in enumerate(args.revisions):
                command = [sys.executable, __file__, "--child", str(sources[revision]), f"gemma3n_kernel_build{i}"]
                out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
                runs[revision].append(json.loads(out.strip().splitlines()[-1]))
                print(f"round {round_index + 1}, {revision}: {runs[revision][-1]}", flush=True)
    keys = list(runs[args.revisions[0]][0])
    rows = []
    for revision in args.revisions:
        row = {"revision": revision}
        for key in keys:
            median, spread = median_and_range([r[key] for r in runs[revision]])
            row[key] = {"gbs": median, "range_gbs": spread}
        rows.append(row)
    meta = run_meta(command_line("benchmarks/row_kernel_builds.py", args), load_before)
    write_json(args.out, meta, rows)
    lines = [
        "# The row kernels of two revisions, GB/s of weight read (42 E2B-sized weights, from memory)",
        "",
        f"`{meta['command']}`; {meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}, load average "
        f"{meta['load_average_before']} before, {meta['load_average_after']} after; medians of {args.rounds} "
        "alternating rounds (range), each the best of 3 passes.",
        "",
        "| revision | " + " | ".join(f"{k} rows" for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for row in rows:
        cells = [f"{row[k]['gbs']:.1f} ({row[k]['range_gbs'][0]:.1f}-{row[k]['range_gbs'][1]:.1f})" for k in keys]
        lines.append(f"| {row['revision']} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
