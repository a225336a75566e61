"""Few-row products of E2B matrices on the CPU: BLAS kernels against inductor's fused multiply-and-sum, 1 and 4 rows.

    flock /tmp/gemma3n-heavy.lock python benchmarks/fused_row_products.py --out benchmarks/results/fused_row_products

For E2B's [8192, 2048] (gate / up), [2048, 8192] (down) and a quarter of the LM head ([65536, 2048]), bf16 and int8
weights (4 distinct copies per shape, so each call reads from memory), times each variant compiled with inductor:

- ``blas``: ``F.linear`` (bf16) or torch's int8 kernel ``_weight_int8pack_mm``;
- ``fused``: :func:`gemma3n.text_model.linear.fused_small_product` (int8: scaled after the sum, as
  :func:`~gemma3n.text_model.linear.fused_int8_product`), which sums rows over 4096 inputs in chunks;
- ``fused, one sum``: the same multiply-and-sum as one reduction (inductor's cascade helper past 4096 inputs);
- ``fused, weight-major``: the product written as [out, rows, in] (the other loop order; for 4 rows).

Variants interleave over ``--rounds``; GB/s of weight read (medians, ranges), and each variant's largest error
relative to the largest float64 output. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from run_meta import interleaved_rounds, median_and_range, run_meta, write_json

from gemma3n.text_model.linear import fused_small_product

SHAPES = [(8192, 2048), (2048, 8192), (65536, 2048)]


def one_sum(x, w):
    return (x.float().unsqueeze(-2) * w.float()).sum(-1).to(x.dtype)


def weight_major_order(x, w):
    return (w.float().unsqueeze(1) * x.float()).sum(-1).t().to(x.dtype)


def int8_variant(product):
    def scaled(x, w, scales):
        return (product(x.float(), w).float() * scales.float()).to(x.dtype)

    return scaled


def variants(dtype: str) -> dict:
    if dtype == "bf16":
        blas = F.linear
        fused = {"fused": fused_small_product, "fused, one sum": one_sum, "fused, weight-major": weight_major_order}
    else:

        def blas(x, w, scales):
            return torch._weight_int8pack_mm(x, w, scales)

        fused = {
            "fused": int8_variant(fused_small_product),
            "fused, one sum": int8_variant(one_sum),
            "fused, weight-major": int8_variant(weight_major_order),
        }
    compiled = {name: torch.compile(fn, dynamic=False) for name, fn in fused.items()}
    return {"blas": blas, **compiled}


def seconds(fn, weights, x, extra) -> float:
    start = time.perf_counter()
    for w in weights:
        fn(x, w, *extra)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fused_row_products")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load_before = os.getloadavg()
    rows_out = []
    with torch.inference_mode():
        for dtype in ("bf16", "int8"):
            for out_features, in_features in SHAPES:
                g = torch.Generator().manual_seed(out_features + in_features)
                if dtype == "bf16":
                    weights = [torch.randn(out_features, in_features, generator=g).bfloat16() for _ in range(4)]
                    extra: tuple = ()
                else:
                    weights = [
                        torch.randint(-127, 128, (out_features, in_features), generator=g, dtype=torch.int8)
                        for _ in range(4)
                    ]
                    extra = (torch.rand(out_features, generator=g).bfloat16() / 100,)
                nbytes = sum(w.numel() * w.element_size() for w in weights)
                for rows in (1, 4):
                    torch._dynamo.reset()  # fresh compiles per shape: dynamo's recompile limit would fall back to eager
                    fns = variants(dtype)
                    x = torch.randn(rows, in_features, generator=g).bfloat16()
                    want = x.double() @ weights[0].double().T
                    if extra:
                        want = want * extra[0].double()
                    errors = {
                        name: ((fn(x, weights[0], *extra).double() - want).abs().max() / want.abs().max()).item()
                        for name, fn in fns.items()
                    }
                    for fn in fns.values():  # warm-up (and compile)
                        seconds(fn, weights, x, extra)
                    times = interleaved_rounds(fns, lambda fn: seconds(fn, weights, x, extra), args.rounds)
                    row = {"dtype": dtype, "shape": [out_features, in_features], "rows": rows}
                    for name in fns:
                        gbps, spread = median_and_range([nbytes / t / 1e9 for t in times[name]])
                        row[name] = {"gb_per_s": gbps, "range": spread, "max_relative_error": errors[name]}
                    rows_out.append(row)
                    print(json.dumps(row), flush=True)
    meta = run_meta(
        f"python benchmarks/fused_row_products.py --rounds {args.rounds} --out {args.out}",
        load_before,
    )
    write_json(args.out, meta, rows_out)
    names = ["blas", "fused", "fused, one sum", "fused, weight-major"]
    lines = [
        "# Few-row products of E2B matrices: GB/s of weight read, BLAS kernel against inductor's fused reductions",
        "",
        f"`{meta['command']}`; {meta['cpus']} CPUs, torch {meta['torch']}, load average {meta['load_average_before']}"
        f" before, {meta['load_average_after']} after; medians of {args.rounds} interleaved rounds (range), largest"
        " error relative to the largest float64 output in brackets.",
        "",
        "| weights | shape | rows | " + " | ".join(names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for r in rows_out:
        cells = []
        for n in names:
            low, high = r[n]["range"]
            cells.append(f"{r[n]['gb_per_s']:.1f} ({low:.1f}-{high:.1f}) [{r[n]['max_relative_error']:.1e}]")
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"| {r['dtype']} | {shape} | {r['rows']} | " + " | ".join(cells) + " |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
