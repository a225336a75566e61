"""The vision tower's convolution floor on this CPU: what its convolutions cost with nothing else in the way.

    flock /tmp/gemma3n-heavy.lock python benchmarks/tower_kernel_floor.py --out benchmarks/results/vision_kernel_floor

Issue 13 asks for the E2B vision tower (MobileNet v5, 768x768 images) at 3x transformers' speed in bf16. This measures
whether the convolution kernels allow it. One eager forward of gemma3n's tower records every convolution call (input
shape and the oneDNN-prepacked weight it uses); then each call is timed alone, repeated back to back on the same input
(its weight and activations warm in cache, the best of ``--repeats``), and the times are summed. That sum is a floor:
no schedule of these same oneDNN kernels runs the tower faster, and every other op (norms, activations, attention,
layout changes) comes on top. The same process times transformers' tower and ours, interleaved, for the ratio, and a
large bf16 matmul for the machine's peak. Writes JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoders import build_pair, hardware_limits  # noqa: E402


def record_convolutions(tower: torch.nn.Module, pixels: torch.Tensor) -> list[tuple[torch.nn.Module, torch.Size]]:
    """(convolution module, its input's shape) for every convolution call of one forward of our tower."""
    from gemma3n.encoders.vision import PrepackedConv2d

    calls = []

    def hook(module, args):
        calls.append((module, args[0].shape))

    handles = [m.register_forward_pre_hook(hook) for m in tower.modules() if isinstance(m, PrepackedConv2d)]
    try:
        with torch.no_grad():
            tower(pixels)
    finally:
        for h in handles:
            h.remove()
    return calls


def best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run(batch_sizes: list[int], repeats: int, rounds: int) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    dtype = torch.bfloat16
    impls, inputs, flops = build_pair("vision", dtype, compiled=False)
    our_tower = impls["gemma3n"].keywords["our_tower"]  # functools.partial(ours, our_tower=..., our_embed=...)
    limits = hardware_limits(dtype)
    rows = []
    for batch in batch_sizes:
        (pixels,) = inputs(batch)
        calls = record_convolutions(our_tower, pixels)
        with torch.no_grad():
            per_call = []
            for conv, shape in calls:  # a random input of the recorded shape, NHWC as the tower feeds it
                x = torch.randn(shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
                per_call.append(best_seconds(lambda conv=conv, x=x: conv(x), repeats))
            tower_times = {name: [] for name in impls}
            for fn in impls.values():
                fn(pixels)  # warm-up
            for _ in range(rounds):
                for name, fn in impls.items():
                    start = time.perf_counter()
                    fn(pixels)
                    tower_times[name].append(time.perf_counter() - start)
        floor = sum(per_call)
        medians = {name: statistics.median(v) for name, v in tower_times.items()}
        target = medians["transformers"] / 3
        slowest = sorted(
            ((t, tuple(shape), tuple(m.weight.shape), m.groups) for (m, shape), t in zip(calls, per_call, strict=True)),
            reverse=True,
        )[:5]
        rows.append(
            {
                "batch": batch,
                "convolutions": len(calls),
                "conv_floor_ms_per_image": 1e3 * floor / batch,
                "tower_ms_per_image": {name: 1e3 * t / batch for name, t in medians.items()},
                "tower_ms_per_image_ranges": {
                    name: [1e3 * min(v) / batch, 1e3 * max(v) / batch] for name, v in tower_times.items()
                },
                "target_ms_per_image": 1e3 * target / batch,
                "floor_over_target": floor / target,
                "floor_share_of_our_tower": floor / medians["gemma3n"],
                "slowest_convolutions": [
                    {"ms": 1e3 * t, "input": s, "weight": w, "groups": g} for t, s, w, g in slowest
                ],
                "load_average_1min": os.getloadavg()[0],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"rows": rows, "limits": limits, "gflop_per_image": flops / 1e9, "threads": torch.get_num_threads()}


def markdown(result: dict) -> str:
    lines = [
        "| batch | convolutions | conv floor ms/image | 3x transformers needs ms/image | floor / target "
        "| gemma3n ms/image | transformers ms/image | floor share of gemma3n | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        t = r["tower_ms_per_image"]
        lines.append(
            f"| {r['batch']} | {r['convolutions']} | {r['conv_floor_ms_per_image']:.0f} "
            f"| {r['target_ms_per_image']:.0f} | {r['floor_over_target']:.2f} | {t['gemma3n']:.0f} "
            f"| {t['transformers']:.0f} | {100 * r['floor_share_of_our_tower']:.0f}% | {r['load_average_1min']:.1f} |"
        )
    lim = result["limits"]
    lines += [
        "",
        f"Same process: {lim['matmul_gflops']:.0f} GFLOP/s peak bf16 matmul, {lim['copy_gbs']:.1f} GB/s copy, "
        f"{result['threads']} threads; {result['gflop_per_image']:.0f} GFLOP per image.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/vision_kernel_floor")
    args = parser.parse_args()
    result = run(args.batch_sizes, args.repeats, args.rounds)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    out.with_suffix(".json").write_text(json.dumps({"command": command, **result}, indent=2))
    out.with_suffix(".md").write_text(f"`{command}` (torch {torch.__version__})\n\n" + markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
