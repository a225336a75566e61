"""Decode-step attention of one E2B layer in bf16 on the CPU: torch's SDPA against gemma3n's float32 single-query path.

    flock /tmp/gemma3n-heavy.lock python benchmarks/decode_attention.py --out benchmarks/results/decode_attention

One query per sequence (8 query heads, 2 key/value heads, head dim 256, as E2B) over 256, 1024 and 4096 cached keys,
at batch 1 and 4, with a boolean mask hiding a quarter of the keys. Each variant runs eager and under
``torch.compile`` (as in a compiled decode step): ``F.scaled_dot_product_attention`` on the bf16 tensors, and
:func:`gemma3n.text_model.attention.single_query_attention`. Variants are interleaved over ``--rounds``; medians,
ranges, and each variant's largest error against a float64 reference. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from run_meta import command_line, interleaved_rounds, median_and_range, run_meta, write_json

from gemma3n.text_model.attention import single_query_attention

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 256  # E2B


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)


def single_query(q, k, v, mask):
    return single_query_attention(q, k, v, mask, 1.0, None)


def float64_reference(q, k, v, mask) -> torch.Tensor:
    group = HEADS // KV_HEADS
    scores = q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v.double().repeat_interleave(group, 1)


def seconds_per_call(fn, args, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", nargs="+", type=int, default=[256, 1024, 4096])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=30, help="calls timed per round and variant")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode_attention")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    load_before = os.getloadavg()
    variants = {
        "sdpa eager": sdpa,
        "single-query eager": single_query,
        "sdpa compiled": torch.compile(sdpa, dynamic=False),
        "single-query compiled": torch.compile(single_query, dynamic=False),
    }
    rows = []
    with torch.inference_mode():
        for batch in args.batches:
            for keys in args.keys:
                g = torch.Generator().manual_seed(keys + batch)
                q = torch.randn(batch, HEADS, 1, HEAD_DIM, generator=g).bfloat16()
                k, v = (torch.randn(batch, KV_HEADS, keys, HEAD_DIM, generator=g).bfloat16() for _ in range(2))
                mask = torch.ones(batch, 1, 1, keys, dtype=torch.bool)
                mask[..., : keys // 4] = False
                operands = (q, k, v, mask)
                reference = float64_reference(*operands)
                errors = {
                    name: (fn(*operands).double() - reference).abs().max().item() for name, fn in variants.items()
                }
                times = interleaved_rounds(variants, lambda fn: seconds_per_call(fn, operands, args.calls), args.rounds)
                row = {"batch": batch, "keys": keys}
                for name in variants:
                    median, spread = median_and_range(times[name], 1e6)
                    row[name] = {"us": median, "range_us": spread, "max_error_vs_float64": errors[name]}
                rows.append(row)
                print(json.dumps(row), flush=True)

    meta = run_meta(
        command_line("benchmarks/decode_attention.py", args),
        load_before,
    )
    write_json(args.out, meta, rows)
    names = list(variants)
    lines = [
        "# Decode-step attention, one E2B layer (8 query heads, 2 kv heads, head dim 256), bf16, CPU, us per call",
        "",
        f"`{meta['command']}`; {meta['cpus']} CPUs, torch {meta['torch']}, load average {meta['load_average_before']} "
        f"before, {meta['load_average_after']} after; medians of {args.rounds} interleaved rounds (range); "
        "max error against float64 in brackets.",
        "",
        "| batch | keys | " + " | ".join(names) + " | SDPA / single-query (compiled) |",
        "|---|---|" + "---|" * (len(names) + 1),
    ]
    for r in rows:
        cells = []
        for n in names:
            low, high = r[n]["range_us"]
            cells.append(f"{r[n]['us']:.0f} ({low:.0f}-{high:.0f}) [{r[n]['max_error_vs_float64']:.1e}]")
        ratio = r["sdpa compiled"]["us"] / r["single-query compiled"]["us"]
        lines.append(f"| {r['batch']} | {r['keys']} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
