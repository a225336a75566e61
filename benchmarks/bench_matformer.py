"""Every published MatFormer preset cut from one E4B-shaped checkpoint: parameters, bytes per token, CPU decode speed.

    python benchmarks/bench_matformer.py --checkpoint /work/cache/e4b --lock /tmp/gemma3n-heavy.lock

Each preset is loaded with ``gemma3n.load(E4B, matformer=NAME, text_only=True, dtype=...)`` (the slice is cut while
loading, from the memory map) in its own process, since a slice that skips layers holds its own copy of the
per-layer table; the presets are interleaved over ``--rounds`` rounds, so that a change in machine load over time
hits them alike. A run prefills ``--prompt-tokens`` random tokens, then decodes ``--new-tokens`` greedily; each decode
step is timed through a streamer (the median step of a run is its figure; medians and ranges over rounds are
reported). ``--lock`` takes that file's flock around each run (short holds on a shared machine).

Bytes per token: the weights a batch-1 decode step reads (every text weight but the per-layer table, of which it
gathers one row; the tied token embedding counted once, as the LM head reads all of it). KV-cache reads are not
counted (a few MB at these prompt lengths). The copy bandwidth of the machine (read + write bytes of a 1 GiB copy)
is measured in the same run; achieved bandwidth = bytes per token x tokens/s.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from bench_generation import TokenTimer, weight_bytes_per_token

from gemma3n.matformer import PRESETS

HERE = Path(__file__).resolve().parent


@contextmanager
def maybe_locked(path: str | None):
    if path is None:
        yield
        return
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def worker(args) -> dict:
    """One preset in this process: load the slice, prefill, decode; print one JSON line."""
    import gemma3n
    from gemma3n.matformer import effective_parameters

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = gemma3n.load(args.checkpoint, dtype=args.dtype, text_only=True, matformer=args.preset)
    load_s = time.perf_counter() - t0
    text = model.config.text
    ids = torch.randint(3, text.vocab_size_per_layer_input, (1, args.prompt_tokens), generator=torch.Generator())
    timer = TokenTimer("cpu")
    disk_before = _storage_read_bytes()
    model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=[-1], streamer=timer)
    disk_read = _storage_read_bytes() - disk_before
    steps = timer.step_seconds()
    return {
        "copy_bandwidth_GBps": copy_bandwidth_gbs(args.threads),
        "preset": args.preset,
        "layers": text.num_hidden_layers,
        "effective_params": effective_parameters(text),
        "text_params": sum(p.numel() for p in model.language_model.parameters()),
        "bytes_per_token": weight_bytes_per_token(model),
        "load_s": load_s,
        "step_s": steps,
        "median_step_s": statistics.median(steps),
        "loadavg_1m": os.getloadavg()[0],
        "storage_read_bytes_during_generate": disk_read,
    }


def _storage_read_bytes() -> int:
    """Bytes this process has read from storage so far (page-cache misses of the memory-mapped weights count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def copy_bandwidth_gbs(threads: int, repeat: int = 5) -> float:
    """Read + write GB/s of a 1 GiB tensor copy (median of ``repeat``): the machine's practical memory bound."""
    torch.set_num_threads(threads)
    src = torch.ones(1 << 28, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def run(args, save) -> dict:
    """Time every preset over the rounds; ``save(results)`` is called after each run (partial results survive)."""
    names = args.presets or list(PRESETS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    copies: list[float] = []  # measured by each run, right after its decode, under the same lock hold
    for r in range(args.rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--worker", "--preset", name, "--checkpoint", args.checkpoint]
            cmd += ["--dtype", args.dtype, "--threads", str(args.threads)]
            cmd += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            with maybe_locked(args.lock):
                done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if done.returncode:
                print(f"round {r + 1}: {name} failed:\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
                continue  # one failing preset does not stop the others
            result = json.loads(done.stdout.strip().splitlines()[-1])
            runs[name].append(result)
            copies.append(result["copy_bandwidth_GBps"])
            save(summarize(args, runs, copies, complete=False))
            print(
                f"round {r + 1}/{args.rounds} {name:14s} {1 / result['median_step_s']:6.3f} tok/s "
                f"(load {result['load_s']:.1f} s, load avg {result['loadavg_1m']:.2f})",
                flush=True,
            )
    return summarize(args, runs, copies, complete=True)


def static_figures(name: str, checkpoint: str, dtype: str) -> dict:
    """Layers, parameters and bytes per decoded token of a preset, from the sliced config on the meta device."""
    from gemma3n.config import Gemma3nConfig
    from gemma3n.matformer import effective_parameters, plan_slice, sliced_config
    from gemma3n.text_model import TextModel

    config = Gemma3nConfig.from_pretrained(checkpoint)
    text = sliced_config(config, plan_slice(config.text, name)).text
    with torch.device("meta"):
        lm = TextModel(text)
    params = sum(p.numel() for p in lm.parameters())
    table = lm.embed_tokens_per_layer.weight.numel()
    element = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return {
        "layers": text.num_hidden_layers,
        "effective_params": effective_parameters(text),
        "text_params": params,
        "bytes_per_token": (params - table) * element,  # as weight_bytes_per_token counts a loaded model
    }


def summarize(args, runs: dict[str, list[dict]], copies: list[float], *, complete: bool) -> dict:
    copy_gbs = statistics.median(copies) if copies else float("nan")
    rows = []
    for name in runs:
        row = {"preset": name, **static_figures(name, args.checkpoint, args.dtype)}
        if runs[name]:
            assert runs[name][0]["bytes_per_token"] == row["bytes_per_token"], name
            tok_s = [1 / r["median_step_s"] for r in runs[name]]
            median_tok_s = statistics.median(tok_s)
            gbs = row["bytes_per_token"] * median_tok_s / 1e9
            row |= {
                "decode_tok_s_median": median_tok_s,
                "decode_tok_s_range": [min(tok_s), max(tok_s)],
                "weight_GBps": gbs,
                "copy_bandwidth_GBps": statistics.median(r["copy_bandwidth_GBps"] for r in runs[name]),
                "fraction_of_copy_bandwidth": gbs / statistics.median(r["copy_bandwidth_GBps"] for r in runs[name]),
                "loadavg_1m": [r["loadavg_1m"] for r in runs[name]],
                "storage_read_GB": [r["storage_read_bytes_during_generate"] / 1e9 for r in runs[name]],
                "runs": runs[name],
            }
        rows.append(row)
    return {
        "checkpoint": args.checkpoint,
        "dtype": args.dtype,
        "threads": args.threads,
        "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "complete": complete,
        "copy_bandwidth_GBps": copy_gbs,
        "copy_bandwidth_runs_GBps": copies,
        "quantized": "not measured: gemma3n.load(..., quantize=...) does not exist in this tree",
        "rows": rows,
    }


def markdown(results: dict) -> str:
    lines = [
        f"MatFormer presets cut from {results['checkpoint']} while loading (random weights, E4B shape), "
        f"{results['dtype']}, CPU, {results['threads']} threads, torch {results['torch']}; "
        f"{results['rounds']} interleaved rounds, prompt {results['prompt_tokens']}, "
        f"{results['new_tokens']} new tokens per run; copy bandwidth {results['copy_bandwidth_GBps']:.1f} GB/s "
        f"(read + write). Quantized: {results['quantized']}."
        + ("" if results["complete"] else " PARTIAL: the run was still going or was stopped."),
        "",
        "| preset | layers | params/token (B) | text params (B) | bytes/token (GB) | decode tok/s (median, range) "
        "| weight GB/s | of copy bw (same run) | load avg | read from disk (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        if "runs" not in row:
            lines.append(
                f"| {row['preset']} | {row['layers']} | {row['effective_params'] / 1e9:.3f} | "
                f"{row['text_params'] / 1e9:.3f} | {row['bytes_per_token'] / 1e9:.2f} | not timed | | | | |"
            )
            continue
        low, high = row["decode_tok_s_range"]
        loads = "-".join(f"{x:.1f}" for x in (min(row["loadavg_1m"]), max(row["loadavg_1m"])))
        lines.append(
            f"| {row['preset']} | {row['layers']} | {row['effective_params'] / 1e9:.3f} | "
            f"{row['text_params'] / 1e9:.3f} | {row['bytes_per_token'] / 1e9:.2f} | "
            f"{row['decode_tok_s_median']:.3f} ({low:.3f}-{high:.3f}) | {row['weight_GBps']:.2f} | "
            f"{row['fraction_of_copy_bandwidth']:.0%} | {loads} | "
            f"{max(row['storage_read_GB']):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/work/cache/e4b", help="E4B-shaped checkpoint directory")
    parser.add_argument("--presets", nargs="*", default=None, help="default: every preset")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=5)
    parser.add_argument("--lock", default=None, help="flock this file around each run (e.g. /tmp/gemma3n-heavy.lock)")
    parser.add_argument("--out", default=str(HERE / "results" / "matformer_e4b_cpu.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if not (Path(args.checkpoint) / "config.json").is_file():
        parser.error(f"no checkpoint at {args.checkpoint} (build one: benchmarks/published_checkpoint.py --preset e4b)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results: dict) -> None:
        out.write_text(json.dumps(results, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(results))

    results = run(args, save)
    save(results)
    print(markdown(results))


if __name__ == "__main__":
    main()
