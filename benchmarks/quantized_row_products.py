"""Quantized products of 1-512 bf16 rows on the CPU: gemma3n's row kernels against torch's kernels and against
dequantizing the weight for a float matmul (the prefill path), on E2B's MLP shapes; int8 in rows and in tiles of 32
rows (``gemma3n.quantized_kernels.int8_tiles``, the layout CPU int8 layers take at load).

    flock /tmp/gemma3n-heavy.lock python benchmarks/quantized_row_products.py

What it backs: ``gemma3n.row_kernels.MAX_QUANTIZED_ROWS`` (few-row products take the kernels),
``gemma3n.quantize.ROW_KERNEL_PREFILL_ROWS`` (prefill products keep them below those row counts) and the tiled int8
layout (``Int8Linear.use_tiles``). Per weight format
(int8 per channel, int4 groups of 64) and shape ([8192, 2048] gate/up, [2048, 8192] down), enough copies of the
weight to exceed the last-level cache are cycled through, so each product reads its weight from memory. Variants are
interleaved over ``--rounds``; ms per product, medians and ranges. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from run_meta import command_line, interleaved_rounds, median_and_range, run_meta, write_json

from gemma3n import quantize, quantized_kernels
from gemma3n.quantize import Int4Linear, Int8Linear, int4_prefill_linear, int8_prefill_linear
from gemma3n.row_kernels import prepare_row_kernel, row_kernel_status

SHAPES = {"gate/up [8192, 2048]": (8192, 2048), "down [2048, 8192]": (2048, 8192)}
COPY_BYTES = 96e6  # weight bytes cycled through per variant: more than the last-level cache


def variants(fmt: str) -> dict[str, Callable]:
    """name -> product(layer, x) for one weight format."""
    if fmt == "int8":
        return {  # layer: an Int8Linear in rows, with ``tiles``, its weight in tiles of 32 rows
            "row kernel": lambda layer, x: torch.ops.gemma3n_cpu.int8_few_row_product(x, layer.qweight, layer.scales),
            "tiled row kernel": lambda layer, x: torch.ops.gemma3n_cpu.int8_tiles_product(x, layer.tiles, layer.scales),
            "torch kernel": lambda layer, x: torch._weight_int8pack_mm(x, layer.qweight, layer.scales.to(x.dtype)),
            "dequantized matmul": lambda layer, x: int8_prefill_linear(x, layer.qweight, layer.scales, False),
            "dequantized from tiles": lambda layer, x: int8_prefill_linear(x, layer.tiles, layer.scales, True),
        }
    return {
        "row kernel": lambda layer, x: torch.ops.gemma3n_cpu.int4_few_row_product(
            x, layer.packed, layer.scales_and_zeros, layer.group_size, layer.out_features
        ),
        "torch kernel": lambda layer, x: torch._weight_int4pack_mm_for_cpu(
            x, layer.packed, layer.group_size, layer.scales_and_zeros
        ),
        "dequantized matmul": lambda layer, x: int4_prefill_linear(
            x, layer.packed, layer.scales_and_zeros, layer.group_size, layer.out_features
        ),
    }


def ms_per_product(product: Callable, layers: list, x: torch.Tensor) -> float:
    start = time.perf_counter()
    for layer in layers:
        product(layer, x)
    return (time.perf_counter() - start) / len(layers) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 16, 31, 64, 128, 256, 384, 512])
    parser.add_argument("--formats", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quantized_row_products")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load_before = os.getloadavg()
    if not prepare_row_kernel():
        raise SystemExit(f"gemma3n's row kernels are {row_kernel_status()}: nothing to compare")
    # the prefill ops would otherwise take the row kernels below their thresholds: measure the dequantized path alone
    quantize.ROW_KERNEL_PREFILL_ROWS = dict.fromkeys(quantize.ROW_KERNEL_PREFILL_ROWS, 0)
    rows_out = []
    with torch.inference_mode():
        for fmt in args.formats:
            for shape_name, (n, k) in SHAPES.items():
                copies = max(2, int(COPY_BYTES // (n * k if fmt == "int8" else n * k // 2)))
                generator = torch.Generator().manual_seed(n + k)
                layers = []
                for _ in range(copies):
                    weight = (torch.randn(n, k, generator=generator) * 0.05).bfloat16()
                    if fmt == "int8":
                        layers.append(Int8Linear.from_weight(weight))
                        layers[-1].tiles = quantized_kernels.int8_tiles(layers[-1].qweight)
                    else:
                        layers.append(Int4Linear.from_weight(weight))
                for rows in args.rows:
                    x = torch.randn(rows, k, generator=generator).bfloat16()
                    products = variants(fmt)
                    times = interleaved_rounds(products, lambda p: ms_per_product(p, layers, x), args.rounds)
                    row = {"format": fmt, "shape": shape_name, "rows": rows, "copies": copies}
                    for name in products:
                        median, spread = median_and_range(times[name])
                        row[name] = {"ms": median, "range_ms": spread}
                    rows_out.append(row)
                    print(json.dumps(row), flush=True)

    meta = run_meta(
        command_line("benchmarks/quantized_row_products.py", args),
        load_before,
    )
    write_json(args.out, meta, rows_out)
    lines = [
        "# Quantized products of bf16 rows on the CPU, E2B MLP shapes, ms per product (weights read from memory)",
        "",
        f"`{meta['command']}`; {meta['machine']}, {meta['cpus']} CPUs, torch {meta['torch']}, load average "
        f"{meta['load_average_before']} before, {meta['load_average_after']} after; medians of {args.rounds} "
        "interleaved rounds (range). int4: groups of 64. The dequantized matmul is the prefill path without the "
        "kernels.",
    ]
    for fmt in args.formats:
        names = list(variants(fmt))
        lines += ["", "| format | shape | rows | " + " | ".join(names) + " | fastest |"]
        lines.append("|---|---|---|" + "---|" * (len(names) + 1))
        for r in (r for r in rows_out if r["format"] == fmt):
            cells = [f"{r[n]['ms']:.2f} ({r[n]['range_ms'][0]:.2f}-{r[n]['range_ms'][1]:.2f})" for n in names]
            fastest = min(names, key=lambda n: r[n]["ms"])
            lines.append(f"| {r['format']} | {r['shape']} | {r['rows']} | " + " | ".join(cells) + f" | {fastest} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
