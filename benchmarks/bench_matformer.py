"""Every published MatFormer preset cut from one E4B-shaped checkpoint, in bf16, int8 and int4: parameters, bytes per
token, CPU decode speed, load time and memory, in one run.

    python benchmarks/bench_matformer.py --checkpoint /work/cache/e4b --lock /tmp/gemma3n-heavy.lock

Each (preset, precision) is loaded with ``gemma3n.load(E4B, matformer=NAME, text_only=True, dtype=bfloat16,
quantize=None | "int8" | "int4")`` (the slice is cut while loading, from the memory map, and only the sliced tensors
are quantized) in its own process, so peak RSS is that run's own; the precisions of a preset run back to back, and
``--rounds`` rounds go over every preset, so that a change in machine load over time hits them alike. A run prefills
``--prompt-tokens`` random tokens, then decodes ``--new-tokens`` greedily; each decode step is timed through a streamer
(the median step of a run is its figure; medians and ranges over rounds are reported). ``--lock`` takes that file's
flock around each run (short holds on a shared machine).

Bytes per token: what a batch-1 decode step reads of the weights: every text weight but the per-layer table (of which
it gathers one row per layer) and, with a quantized LM head, the token table (then only row-gathered); in bf16 the tied
token table is counted once, as the LM head reads all of it. Quantized layers count what they hold: int8 one byte per
weight plus one bf16 scale per output channel; int4 half a byte per weight (rows padded to 64) plus a bf16 scale and
zero per 64 inputs; layers left in bf16 (the AltUp router and coefficients, norms) count 2 bytes per weight. The
figure is computed for every preset from the sliced config on the meta device and checked against the loaded model.
KV-cache reads are not counted (a few MB at these prompt lengths). The copy bandwidth (read + write bytes of a 1 GiB
copy) is measured inside each run, right after its decode; achieved bandwidth = bytes per token x tokens/s.

Threads: decode runs on ``--threads`` (default 1). On this shared 2-core machine other sessions' test runs do not
take the lock; with 2 OpenMP threads, a thread that is descheduled stalls its partner at every barrier, and a single
decode-sized matmul then took ~8 ms instead of ~1.3 ms on one thread (measured 19:16 UTC, load average 3.4; int8,
int4 and bf16 alike), so 2-thread decode timings measured the scheduler more than the code (kept for reference in
``results/matformer_e4b_cpu_2threads_partial.*``). Loading uses ``--load-threads`` (default 2): quantization runs one
tensor per thread with single-threaded ops, which has no such barriers.

Memory: peak RSS (VmHWM: counts the memory-mapped checkpoint pages the run touched as well as its own
memory), the anonymous and file-backed parts of RSS after decoding, MemAvailable before loading, and the bytes read
from storage and major page faults during ``generate`` (page-cache misses of the mapped bf16 weights: when the page
cache cannot hold them, a decode step re-reads them from disk and is no longer bound by memory bandwidth).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_generation import TokenTimer
from locking import maybe_locked
from run_meta import peak_rss_gb

from gemma3n.matformer import PRESETS

HERE = Path(__file__).resolve().parent
PRECISIONS = ("bf16", "int8", "int4")
# measured first, so that a run cut short still has the two ends and a middle size
FIRST_PRESETS = ("E2B", "E4B", "E2.98B")


def worker(args) -> dict:
    """One (preset, precision) in this process: load the slice, prefill, decode; print one JSON line."""
    import gemma3n
    from gemma3n.matformer import effective_parameters

    # loading quantizes one tensor per thread (single-threaded ops, no barriers): --load-threads; decode: --threads
    torch.set_num_threads(args.load_threads)
    available_before = _meminfo_bytes("MemAvailable")
    quantize = None if args.precision == "bf16" else args.precision
    t0 = time.perf_counter()
    model = gemma3n.load(
        args.checkpoint, dtype=torch.bfloat16, text_only=True, matformer=args.preset, quantize=quantize
    )
    load_s = time.perf_counter() - t0
    torch.set_num_threads(args.threads)
    text = model.config.text
    ids = torch.randint(3, text.vocab_size_per_layer_input, (1, args.prompt_tokens), generator=torch.Generator())
    timer = DiskTimer("cpu")
    disk_before, usage_before = _storage_read_bytes(), resource.getrusage(resource.RUSAGE_SELF)
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=[-1], streamer=timer)
    generate_s = time.perf_counter() - t1
    disk_read = _storage_read_bytes() - disk_before
    usage = resource.getrusage(resource.RUSAGE_SELF)
    faults = usage.ru_majflt - usage_before.ru_majflt
    cpu_s = usage.ru_utime + usage.ru_stime - usage_before.ru_utime - usage_before.ru_stime
    steps = timer.step_seconds()
    rss = _status_bytes(("RssAnon", "RssFile"))
    return {
        "copy_bandwidth_GBps": copy_bandwidth_gbs(args.threads),
        "preset": args.preset,
        "precision": args.precision,
        "layers": text.num_hidden_layers,
        "effective_params": effective_parameters(text),
        "text_params": sum(p.numel() for p in model.language_model.parameters()),
        "bytes_per_token": weight_bytes_per_token(model),
        "load_s": load_s,
        "step_s": steps,
        "median_step_s": statistics.median(steps),
        "loadavg_1m": os.getloadavg()[0],
        "peak_rss_GB": peak_rss_gb(),
        "rss_anon_GB": rss["RssAnon"] / 1e9,
        "rss_file_GB": rss["RssFile"] / 1e9,
        "mem_available_before_GB": available_before / 1e9,
        "storage_read_bytes_during_generate": disk_read,
        "major_faults_during_generate": faults,
        # read after the first generated token: page-cache misses of the decode steps themselves (prefill excluded)
        "storage_read_bytes_during_decode_steps": timer.reads[-1] - timer.reads[1],
        # CPU seconds of this process per second of generate: --threads when it had the cores to itself
        "cpu_cores_used_during_generate": cpu_s / generate_s,
    }


class DiskTimer(TokenTimer):
    """A :class:`TokenTimer` that also records this process's storage reads at each streamed step."""

    def __init__(self, device: str):
        super().__init__(device)
        self.reads: list[int] = []

    def put(self, tokens) -> None:
        super().put(tokens)
        self.reads.append(_storage_read_bytes())


def weight_bytes_per_token(model) -> int:
    """Bytes of weights a batch-1 decode step reads from the loaded text decoder (see the module docstring)."""
    lm = model.language_model
    skip = {id(lm.embed_tokens_per_layer.weight)}
    if lm.lm_head is not None:  # a quantized head: the token table itself is only row-gathered
        skip.add(id(lm.embed_tokens.weight))
    tensors = {id(t): t for t in [*lm.parameters(), *lm.buffers()]}
    return sum(t.numel() * t.element_size() for i, t in tensors.items() if i not in skip)


def _storage_read_bytes() -> int:
    """Bytes this process has read from storage so far (page-cache misses of the memory-mapped weights count)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    return 0


def _status_bytes(keys: tuple[str, ...]) -> dict[str, int]:
    """Fields of /proc/self/status given in kB, in bytes."""
    values = dict.fromkeys(keys, 0)
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) * 1024
    return values


def _meminfo_bytes(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name == key:
            return int(rest.split()[0]) * 1024
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
    """Time every (preset, precision) over the rounds; ``save(results)`` is called after each run."""
    names = args.presets or [*FIRST_PRESETS, *(name for name in PRESETS if name not in FIRST_PRESETS)]
    keys = [(name, precision) for name in names for precision in args.precisions]
    runs: dict[tuple[str, str], list[dict]] = {key: [] for key in keys}
    copies: list[float] = []  # measured by each run, right after its decode, under the same lock hold
    started = time.time()
    for r in range(args.rounds):
        for name, precision in keys:
            cmd = [sys.executable, __file__, "--worker", "--preset", name, "--precision", precision]
            cmd += ["--checkpoint", args.checkpoint, "--threads", str(args.threads)]
            cmd += ["--load-threads", str(args.load_threads)]
            cmd += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
            t0 = time.perf_counter()
            with maybe_locked(args.lock):
                done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
            if done.returncode:
                print(f"round {r + 1}: {name} {precision} failed:\n{done.stderr[-2000:]}", file=sys.stderr, flush=True)
                continue  # one failing run does not stop the others
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["process_s"] = time.perf_counter() - t0
            runs[(name, precision)].append(result)
            copies.append(result["copy_bandwidth_GBps"])
            save(summarize(args, runs, copies, started, complete=False))
            print(
                f"round {r + 1}/{args.rounds} {name:14s} {precision} {1 / result['median_step_s']:6.3f} tok/s "
                f"(load {result['load_s']:.1f} s, peak RSS {result['peak_rss_GB']:.1f} GB, "
                f"read {result['storage_read_bytes_during_generate'] / 1e9:.2f} GB during decode, "
                f"load avg {result['loadavg_1m']:.2f})",
                flush=True,
            )
    return summarize(args, runs, copies, started, complete=True)


def _quantized_linear_bytes(out_features: int, in_features: int, precision: str, scale_bytes: int) -> int:
    """Bytes an Int8Linear / Int4Linear of this shape holds (gemma3n.quantize's layouts)."""
    from gemma3n.quantize import DEFAULT_INT4_GROUP_SIZE

    if precision == "int8":
        return out_features * in_features + out_features * scale_bytes  # int8 weight + one scale per row
    rows = -(-out_features // 64) * 64  # packed rows padded to whole 64-row blocks
    groups = in_features // DEFAULT_INT4_GROUP_SIZE
    return rows * in_features // 2 + groups * rows * 2 * scale_bytes  # two 4-bit values per byte + scale and zero


@functools.cache
def static_figures(name: str, checkpoint: str, precision: str) -> dict:
    """Layers, parameters and bytes per decoded token of a preset, from the sliced config on the meta device."""
    from torch import nn

    from gemma3n.config import Gemma3nConfig
    from gemma3n.matformer import effective_parameters, plan_slice, sliced_config
    from gemma3n.quantize import is_quantizable
    from gemma3n.text_model import TextModel

    config = Gemma3nConfig.from_pretrained(checkpoint)
    text = sliced_config(config, plan_slice(config.text, name)).text
    with torch.device("meta"):
        lm = TextModel(text)
    params = sum(p.numel() for p in lm.parameters())
    element = 2  # bf16
    read = params - lm.embed_tokens_per_layer.weight.numel()  # the per-layer table is row-gathered
    nbytes = read * element
    if precision != "bf16":
        for module in lm.modules():
            if isinstance(module, nn.Linear) and is_quantizable(module, precision):
                nbytes -= module.weight.numel() * element
                nbytes += _quantized_linear_bytes(module.out_features, module.in_features, precision, element)
        table = lm.embed_tokens.weight  # the LM head becomes a quantized copy; the table is only row-gathered
        nbytes += _quantized_linear_bytes(*table.shape, precision, element) - table.numel() * element
    return {
        "layers": text.num_hidden_layers,
        "effective_params": effective_parameters(text),
        "text_params": params,
        "bytes_per_token": nbytes,
    }


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(args, runs: dict[tuple[str, str], list[dict]], copies: list[float], started: float, *, complete: bool):
    copy_gbs = statistics.median(copies) if copies else float("nan")
    rows = []
    for (name, precision), done in runs.items():
        row = {"preset": name, "precision": precision, **static_figures(name, args.checkpoint, precision)}
        if done:
            measured = done[0]["bytes_per_token"]
            assert measured == row["bytes_per_token"], (name, precision, measured, row["bytes_per_token"])
            tok_s = [1 / r["median_step_s"] for r in done]
            median_tok_s = statistics.median(tok_s)
            gbs = row["bytes_per_token"] * median_tok_s / 1e9
            copy = statistics.median(r["copy_bandwidth_GBps"] for r in done)
            row |= {
                "decode_tok_s": _spread(tok_s),
                "weight_GBps": gbs,
                "copy_bandwidth_GBps": copy,
                "fraction_of_copy_bandwidth": gbs / copy,
                "load_s": _spread([r["load_s"] for r in done]),
                "peak_rss_GB": _spread([r["peak_rss_GB"] for r in done]),
                "loadavg_1m": [r["loadavg_1m"] for r in done],
                "storage_read_GB": [r["storage_read_bytes_during_generate"] / 1e9 for r in done],
                "runs": done,
            }
        rows.append(row)
    return {
        "command": " ".join(["python", "benchmarks/bench_matformer.py", *sys.argv[1:]]),
        "started_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(started)),
        "finished_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "checkpoint": args.checkpoint,
        "dtype": "bfloat16",
        "threads": args.threads,
        "load_threads": args.load_threads,
        "rounds": args.rounds,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "mem_total_GB": _meminfo_bytes("MemTotal") / 1e9,
        "complete": complete,
        "copy_bandwidth_GBps": copy_gbs,
        "copy_bandwidth_runs_GBps": copies,
        "rows": rows,
    }


def markdown(results: dict) -> str:
    copies = results["copy_bandwidth_runs_GBps"]
    copy_range = f" ({min(copies):.1f}-{max(copies):.1f})" if copies else ""
    lines = [
        f"MatFormer presets cut from {results['checkpoint']} while loading (random weights, E4B shape), bf16 "
        f"activations, weights bf16 / int8 / int4 (`quantize=`), CPU ({results['cpu']}, "
        f"{results['mem_total_GB']:.0f} GB RAM, shared), {results['threads']} decode thread(s) "
        f"({results.get('load_threads', results['threads'])} while loading), torch {results['torch']}; "
        f"{results['rounds']} round(s), prompt {results['prompt_tokens']}, {results['new_tokens']} new tokens per run "
        f"(figure: median decode step); each run in its own process under the lock. Copy bandwidth "
        f"{results['copy_bandwidth_GBps']:.1f}{copy_range} GB/s (read + write of a 1 GiB copy, measured in each run). "
        f"{results['started_utc']} - {results['finished_utc']} UTC."
        + ("" if results["complete"] else " PARTIAL: the run was still going or was stopped."),
        "",
        f"Command: `{results['command']}`" + (f" ({results['note']})" if results.get("note") else ""),
        "",
        "| preset | weights | layers | params/token (B) | text params (B) | bytes/token (GB) "
        "| decode tok/s: median step (best step) | weight GB/s: median (best) | of copy bw (same run): median (best) "
        "| load s | peak RSS GB | read from disk in generate (GB) | CPU cores used in generate | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        head = (
            f"| {row['preset']} | {row['precision']} | {row['layers']} | {row['effective_params'] / 1e9:.3f} | "
            f"{row['text_params'] / 1e9:.3f} | {row['bytes_per_token'] / 1e9:.2f} |"
        )
        if "runs" not in row:
            lines.append(head + " not timed | | | | | | | |")
            continue
        tok = row["decode_tok_s"]
        spread = f" ({tok['min']:.3f}-{tok['max']:.3f} over rounds)" if len(row["runs"]) > 1 else ""
        best = 1 / min(step for r in row["runs"] for step in r["step_s"])
        best_gbs = row["bytes_per_token"] * best / 1e9
        loads = sorted({f"{x:.1f}" for x in (min(row["loadavg_1m"]), max(row["loadavg_1m"]))})
        lines.append(
            head + f" {tok['median']:.3f}{spread} ({best:.3f}) | {row['weight_GBps']:.2f} ({best_gbs:.2f}) | "
            f"{row['fraction_of_copy_bandwidth']:.0%} ({best_gbs / row['copy_bandwidth_GBps']:.0%}) | "
            f"{row['load_s']['median']:.1f} | {row['peak_rss_GB']['median']:.2f} | {max(row['storage_read_GB']):.2f} | "
            f"{_cores(row['runs'])} | {'-'.join(loads)} |"
        )
    lines += [
        "",
        "Reading the table: bytes/token counts what a decode step reads (int8: 1 byte per weight + a bf16 scale per "
        "row; int4: half a byte + a bf16 scale and zero per 64 weights; LM head quantized too; per-layer table "
        "row-gathered). 'CPU cores used in generate' is this process's CPU seconds per second of generate: "
        f"{results['threads']} when it had the cores to itself; less means other processes (on this shared machine: "
        "other sessions' test runs, which do not take the lock) held the CPU. With 2 OpenMP threads a descheduled "
        "thread stalls the other at every barrier, so such steps run several times slower; the best step of a run is "
        "its least disturbed figure. Peak RSS (VmHWM) includes the checkpoint pages the process touched through "
        "the memory map (quantizing reads every sliced weight once; a slice that skips layers copies the per-layer "
        "table), so it is above the resident size while decoding (anonymous + file RSS after decode, in the JSON).",
    ]
    return "\n".join(lines) + "\n" + memory_notes(results)


def _cores(runs: list[dict]) -> str:
    cores = [r["cpu_cores_used_during_generate"] for r in runs if "cpu_cores_used_during_generate" in r]
    return f"{statistics.median(cores):.2f}" if cores else "-"


def memory_notes(results: dict) -> str:
    """Where decode re-read memory-mapped weights from disk (page-cache misses), with the run's memory figures."""
    lines = []
    for row in results["rows"]:
        for r in row.get("runs", []):
            read = r["storage_read_bytes_during_generate"] / 1e9
            steps = r.get("storage_read_bytes_during_decode_steps")
            in_steps = "not recorded" if steps is None else f"{steps / 1e9:.2f} GB"
            if read >= 0.5:
                lines.append(
                    f"- {row['preset']} {row['precision']}: {read:.2f} GB read from disk during generate "
                    f"({r['major_faults_during_generate']} major page faults), of which in the decode steps after "
                    f"the first token: {in_steps}; RSS after decode "
                    f"{r['rss_anon_GB']:.1f} GB anonymous + {r['rss_file_GB']:.1f} GB file-backed, MemAvailable "
                    f"before loading {r['mem_available_before_GB']:.1f} GB."
                )
    if not lines:
        return ""
    head = (
        "\nRuns that read memory-mapped weights from disk during generate (prefill touches every weight first: a "
        "read there is a page not yet cached; a read in the later decode steps is a page the cache did not keep, "
        "i.e. eviction of file pages; the machine has no swap):\n\n"
    )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="/work/cache/e4b", help="E4B-shaped checkpoint directory")
    parser.add_argument("--presets", nargs="*", default=None, help="default: every preset")
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--threads", type=int, default=1, help="decode threads (see the module docstring)")
    parser.add_argument("--load-threads", type=int, default=2, help="threads quantizing tensors while loading")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=6)
    parser.add_argument("--lock", default=None, help="flock this file around each run (e.g. /tmp/gemma3n-heavy.lock)")
    parser.add_argument("--out", default=str(HERE / "results" / "matformer_e4b_cpu.json"))
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the --out JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="bf16", choices=PRECISIONS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.render:  # rewrite the markdown from the saved JSON
        out = Path(args.out)
        out.with_suffix(".md").write_text(markdown(json.loads(out.read_text())))
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
