"""Sparse decode products of E2B's sparse MLP layers, dense against sparse, for bf16 and int8 weights.

    flock /tmp/gemma3n-heavy.lock python benchmarks/sparse_mlp_products.py --out benchmarks/results/sparse_mlp_products

E2B's first 10 decoder layers have activation sparsity 0.95: a decode step's gate activation is non-zero in about 5%
of the 8192 intermediate channels per row. Per weight format (the layers gemma3n builds at load: ``Linear`` bf16,
``Int8Linear``), this times ``down(activation * up(x))`` for 10 distinct layers' weights
(``--layers``; out of cache, as in a decode step) at batch 1 and 4, through the dense kernels and through the sparse
product (:mod:`gemma3n.text_model.sparse_decode`), interleaved over ``--rounds``, and reports the medians and their
ratio. Activations are a random gate cut at the 95% Gaussian quantile per row, as the layer's gate cuts it. The
sparse products run sparse whatever their share of active channels (``MAX_ACTIVE_FRACTION`` is lifted), since this
measurement is what sets that threshold.
Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gemma3n.quantize import Int8Linear
from gemma3n.text_model import sparse_decode
from gemma3n.text_model.linear import Linear
from gemma3n.text_model.sparse_decode import sparse_decode_product

HIDDEN, WIDTH = 2048, 8192  # E2B


def build_layers(mode: str, count: int) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """``count`` (up, down) pairs of random E2B-shaped weights in ``mode``'s layer type."""
    pairs = []
    for _ in range(count):
        up, down = torch.randn(WIDTH, HIDDEN) / HIDDEN**0.5, torch.randn(HIDDEN, WIDTH) / WIDTH**0.5
        if mode == "bf16":
            layers = []
            for w in (up, down):
                layer = Linear(w.shape[1], w.shape[0], bias=False)
                layer.weight.data = w.bfloat16()
                layers.append(layer)
            pairs.append(tuple(layers))
        else:
            pairs.append((Int8Linear.from_weight(up, torch.bfloat16), Int8Linear.from_weight(down, torch.bfloat16)))
    return pairs


def gate_activation(rows: int, seed: int) -> torch.Tensor:
    """[rows, WIDTH] bf16: gelu of a Gaussian gate cut at its 95% quantile (exact zeros elsewhere)."""
    gate = torch.randn(rows, WIDTH, generator=torch.Generator().manual_seed(seed))
    return F.gelu(F.relu(gate - 1.645), approximate="tanh").bfloat16()


def time_pass(fn, pairs, activation, x) -> float:
    start = time.perf_counter()
    for up, down in pairs:
        fn(up, down, activation, x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sparse_mlp_products")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    sparse_decode.MAX_ACTIVE_FRACTION = 1.0  # always the sparse path: this measures where it stops paying

    def dense(up, down, activation, x):
        return down(activation * up(x))

    products = {}  # id(up layer) -> its sparse decode product

    def sparse(up, down, activation, x):
        return products[id(up)](activation, x)

    rows_out = []
    with torch.inference_mode():
        for mode in args.modes:
            pairs = build_layers(mode, args.layers)
            products.update({id(up): sparse_decode_product(up, down) for up, down in pairs})
            for batch in (1, 4):
                activation = gate_activation(batch, seed=batch)
                x = torch.randn(batch, HIDDEN, generator=torch.Generator().manual_seed(7)).bfloat16()
                active = int(activation.ne(0).any(0).sum())
                error = (sparse(*pairs[0], activation, x).float() - dense(*pairs[0], activation, x).float()).norm()
                error = (error / dense(*pairs[0], activation, x).float().norm()).item()
                times = {"dense": [], "sparse": []}
                for _ in range(args.rounds):
                    for name, fn in (("dense", dense), ("sparse", sparse)):
                        times[name].append(time_pass(fn, pairs, activation, x) / args.layers)
                dense_ms, sparse_ms = (statistics.median(times[k]) * 1e3 for k in ("dense", "sparse"))
                row = {
                    "mode": mode,
                    "batch": batch,
                    "active_channels": active,
                    "dense_ms": dense_ms,
                    "dense_range_ms": [min(times["dense"]) * 1e3, max(times["dense"]) * 1e3],
                    "sparse_ms": sparse_ms,
                    "sparse_range_ms": [min(times["sparse"]) * 1e3, max(times["sparse"]) * 1e3],
                    "speedup": dense_ms / sparse_ms,
                    "relative_error_vs_dense": error,
                }
                rows_out.append(row)
                print(json.dumps(row), flush=True)
            products.clear()
            del pairs

    meta = {
        "command": "python benchmarks/sparse_mlp_products.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows_out}, indent=1))
    lines = [
        "# Sparse MLP decode products (E2B shape, up + down of one layer, ms per layer)",
        "",
        f"`{meta['command']}`; {meta['cpus']} CPUs, load average after {meta['load_average']}; medians of "
        f"{args.rounds} interleaved rounds over {args.layers} distinct layers' weights (range).",
        "",
        "| weights | batch | active channels of 8192 | dense ms | sparse ms | speedup | relative error vs dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        dense_range = "-".join(f"{v:.2f}" for v in r["dense_range_ms"])
        sparse_range = "-".join(f"{v:.2f}" for v in r["sparse_range_ms"])
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['active_channels']} | {r['dense_ms']:.2f} ({dense_range}) | "
            f"{r['sparse_ms']:.2f} ({sparse_range}) | {r['speedup']:.2f}x | {r['relative_error_vs_dense']:.1e} |"
        )
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
