"""Weight-only int8 / int4 matrix products on CPU: achieved weight bandwidth against a measured copy bandwidth.

    flock /tmp/gemma3n-heavy.lock python benchmarks/bench_quant_kernels.py --threads 2 \
        --out benchmarks/results/quant_kernels_cpu2.json

For E2B-shaped weights (MLP 2048x8192 and 8192x2048, the tied LM head 262144x2048) at batch 1 and 4 it times:
bf16 ``F.linear`` and bf16 ``weight @ x^T`` (today's LM-head path), torch's ``_weight_int8pack_mm`` (per-channel
int8), torch's ``_weight_int4pack_mm_for_cpu`` at group sizes 32/64/128, and, when importable, torchao's eager
``Int8WeightOnlyConfig`` and prototype CPU int4 configs. Every method runs once per round, rounds interleaved; the
figure is bytes of weight (plus scales) read per call / median time. The copy bandwidth is a 1 GB tensor copy, counted
as bytes read + bytes written (the traffic a copy moves) and also as bytes read, the convention of issue 12.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gemma3n.quantize import Int4Linear, Int8Linear

SHAPES = {"mlp_up": (8192, 2048), "mlp_down": (2048, 8192), "lm_head": (262144, 2048)}  # (out, in)


def time_call(fn: Callable[[], object], min_seconds: float) -> float:
    """Median seconds per call over repeats filling ``min_seconds`` (after one warm-up call)."""
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < min_seconds or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(min_seconds: float) -> dict[str, float]:
    src = torch.empty(2**30, dtype=torch.uint8).fill_(1)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), min_seconds)
    return {"read_write_gbs": 2 * src.numel() / seconds / 1e9, "read_gbs": src.numel() / seconds / 1e9}


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def build_methods(weight: torch.Tensor, torchao_ok: bool) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """name -> (module holding the weight, fn(x) computing x @ weight^T)."""
    methods: dict[str, tuple[torch.nn.Module, Callable]] = {}
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight = torch.nn.Parameter(weight, requires_grad=False)
    methods["bf16 F.linear"] = (linear, lambda x: F.linear(x, weight))
    methods["bf16 weight @ x^T"] = (linear, lambda x: (weight @ x.T).T)
    q8 = Int8Linear.from_weight(weight)
    methods["int8 torch _weight_int8pack_mm"] = (q8, q8)
    for group in (32, 64, 128):
        q4 = Int4Linear.from_weight(weight, group_size=group)
        methods[f"int4 g{group} torch _weight_int4pack_mm_for_cpu"] = (q4, q4)
    if torchao_ok:
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        ao8 = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)).to(weight.dtype)
        ao8[0].weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        quantize_(ao8, Int8WeightOnlyConfig(set_inductor_config=False))
        methods["int8 torchao Int8WeightOnlyConfig (eager)"] = (ao8, ao8)
        ao4 = torch.nn.Sequential(torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)).to(weight.dtype)
        ao4[0].weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        quantize_(ao4, PrototypeInt4WeightOnlyConfig(group_size=64, set_inductor_config=False))
        methods["int4 g64 torchao PrototypeInt4WeightOnlyConfig"] = (ao4, ao4)
    return methods


def ao_module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a torchao-quantized module: its tensor subclass's inner tensors."""
    total = 0
    for p in module.parameters():
        names = p.__tensor_flatten__()[0] if hasattr(p, "__tensor_flatten__") else []
        inner = [getattr(p, n) for n in names] if names else [p]
        total += sum(t.numel() * t.element_size() for t in inner if isinstance(t, torch.Tensor))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=0.4, help="time per method per round")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--no-torchao", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/quant_kernels_cpu2.json"))
    parser.add_argument("--render", type=Path, default=None, help="only re-render the table of a saved JSON")
    args = parser.parse_args()
    if args.render:
        result = json.loads(args.render.read_text())
        for row in result["rows"]:
            row["best_gbs"] = row["weight_bytes"] / (row["min_ms"] / 1e3) / 1e9
        return write_table(result, args.render.with_suffix(".md"))
    torch.set_num_threads(args.threads)
    torchao_version = None
    if not args.no_torchao:
        try:
            import torchao

            torchao_version = torchao.__version__
        except ImportError:
            pass

    copies = [copy_bandwidth(args.seconds)]
    rows = []
    for shape_name in args.shapes:
        out_f, in_f = SHAPES[shape_name]
        weight = (torch.randn(out_f, in_f, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        methods = build_methods(weight, torchao_version is not None)
        sizes = {n: (ao_module_bytes(m) if "torchao" in n else module_bytes(m)) for n, (m, _) in methods.items()}
        times: dict[tuple[str, int], list[float]] = {}
        with torch.inference_mode():
            for _ in range(args.rounds):
                copies.append(copy_bandwidth(args.seconds / 2))
                for batch in args.batch_sizes:
                    x = torch.randn(batch, in_f, dtype=torch.bfloat16)
                    for name, (_, fn) in methods.items():
                        times.setdefault((name, batch), []).append(time_call(lambda: fn(x), args.seconds))
        for (name, batch), ts in times.items():
            med = statistics.median(ts)
            rows.append(
                {
                    "shape": shape_name,
                    "out_features": out_f,
                    "in_features": in_f,
                    "method": name,
                    "batch": batch,
                    "weight_bytes": sizes[name],
                    "median_ms": med * 1e3,
                    "min_ms": min(ts) * 1e3,
                    "max_ms": max(ts) * 1e3,
                    "gbs": sizes[name] / med / 1e9,
                }
            )
        del methods, weight
        print(f"done {shape_name}", flush=True)

    read_write = statistics.median(c["read_write_gbs"] for c in copies)
    read = statistics.median(c["read_gbs"] for c in copies)
    for row in rows:
        row["fraction_of_copy_read"] = row["gbs"] / read
        row["best_gbs"] = row["weight_bytes"] / (row["min_ms"] / 1e3) / 1e9
    result = {
        "torch": torch.__version__,
        "torchao": torchao_version,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(),
        "load_average": os.getloadavg(),
        "copy_1gb": {
            "read_write_gbs_median": read_write,
            "read_gbs_median": read,
            "read_gbs_range": [min(c["read_gbs"] for c in copies), max(c["read_gbs"] for c in copies)],
        },
        "rounds": args.rounds,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    write_table(result, args.out.with_suffix(".md"))


def write_table(result: dict, path: Path) -> None:
    """The markdown table of a result (also: ``--render JSON`` re-renders a saved run)."""
    copy = result["copy_1gb"]
    lines = [
        f"torch {result['torch']}, torchao {result['torchao']}, {result['threads']} threads, "
        f"{result['cpu_capability']}, load average {tuple(round(v, 2) for v in result['load_average'])}",
        f"1 GB copy: {copy['read_gbs_median']:.1f} GB/s read ({copy['read_write_gbs_median']:.1f} GB/s read+write), "
        f"range {copy['read_gbs_range'][0]:.1f}-{copy['read_gbs_range'][1]:.1f} GB/s read",
        "",
        "GB/s = bytes of weight (and scales) per call / time; 'best' uses the fastest round (least disturbed by other "
        "jobs on a shared machine).",
        "",
        "| shape (out x in) | method | batch | MB read | median ms (range) | GB/s median | GB/s best | of copy |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['shape']} {r['out_features']}x{r['in_features']} | {r['method']} | {r['batch']} | "
            f"{r['weight_bytes'] / 1e6:.0f} | {r['median_ms']:.2f} ({r['min_ms']:.2f}-{r['max_ms']:.2f}) | "
            f"{r['gbs']:.1f} | {r['best_gbs']:.1f} | {r['fraction_of_copy_read']:.0%} |"
        )
    table = "\n".join(lines)
    path.write_text(
        "# Weight-only quantized matmul kernels, CPU\n\nCommand: `flock /tmp/gemma3n-heavy.lock python "
        f"benchmarks/bench_quant_kernels.py --threads {result['threads']}` (torchao rows when torchao is importable)"
        "\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
