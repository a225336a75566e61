"""CPU decode of the E2B shape: gemma3n at bf16 / int8 / int4 against transformers bf16, and against the copy bandwidth.

    flock /tmp/gemma3n-heavy.lock python benchmarks/bench_cpu_decode.py            # all four, 3 rounds (~10-15 min)
    flock /tmp/gemma3n-heavy.lock python benchmarks/bench_cpu_decode.py --impls gemma3n-bf16 transformers-bf16

Uses (and builds once, cached) an E2B-shaped random checkpoint in the published layout (``published_checkpoint.py``,
default ``/work/cache/e2b``). Each implementation runs in its own process (so peak RSS is its own), one after the
other, interleaved over rounds (a change in machine speed hits all alike); each round also measures the copy bandwidth.
Per implementation: decode tok/s at batch 1 and 4 (median interval between streamed tokens, greedy, after a
``--prompt-tokens`` prompt), prefill tok/s at 128 and 512 tokens, time to first token for a 128-token prompt, peak RSS.

Bandwidth limit: a decode step reads every text-decoder weight once, except the two row-gathered tables (token and
per-layer embeddings), plus the whole LM head (the tied token table, or its quantized copy). The copy bandwidth counts
the bytes a copy reads plus the bytes it writes (as the issue counts it: a 1 GB copy in 84 ms is 24 GB/s), and stands
for the read bandwidth: ``weight bytes per token / copy GB/s`` bounds the batch-1 step time ("limit tok/s"); "fraction"
is the achieved weight GB/s over the copy GB/s of the same round. Unquantized gemma3n decode skips the inactive channels
of the sparse MLP layers (``gemma3n.text_model.sparse_decode``); its bytes are still counted whole, as the limit is.
Writes ``benchmarks/results/cpu_decode_e2b.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from child_env import USER_THP, child_env, thp_setting
from kernel_ceilings import LAYERS
from run_meta import peak_rss_gb

HERE = Path(__file__).resolve().parent
IMPLS = ["gemma3n-bf16", "gemma3n-int8", "gemma3n-int4", "transformers-bf16"]
EXTRA_IMPLS = ["gemma3n-bf16-eager", "gemma3n-bf16-compile", "gemma3n-int8-compile", "gemma3n-int4-compile"]
KERNELS = "kernels"  # the child measuring each matmul kernel's ceiling (kernel_ceilings.py)
RESULT_MARK = "RESULT_JSON "


# ---- measurements inside one child process ------------------------------------------------------------------------
class TokenTimer:
    """Streamer (``put``/``end``, the protocol of both libraries): the time each step's tokens arrive."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _tokens) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_seconds(self) -> list[float]:
        stamps = self.times[1:]  # the first put is the prompt
        return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]


def weight_bytes_per_token(model) -> int:
    """Bytes one batch-1 decode step reads from gemma3n's text decoder (see the module docstring)."""
    from gemma3n.compile_policy import decode_weight_bytes  # gemma3n children only: importing it sets huge pages

    return decode_weight_bytes(model)


def reference_weight_bytes_per_token(model) -> int:
    """The same count for transformers' model: its text decoder without the per-layer table (the token table counts
    once, as the tied LM head)."""
    lm = model.model.language_model
    kept = [p for name, p in lm.named_parameters() if "embed_tokens_per_layer" not in name]
    return sum(p.numel() * p.element_size() for p in kept)


def run_child(args) -> dict:
    torch.set_num_threads(args.threads)
    impl = args.child
    library, precision = impl.split("-")[0], impl.split("-")[1]
    mode = impl.split("-")[2] if impl.count("-") >= 2 else None
    result: dict = {"impl": impl, "threads": torch.get_num_threads(), "thp": thp_setting()}
    vocab = 262_144
    gen = torch.Generator().manual_seed(0)
    prompts = {n: torch.randint(3, vocab, (1, n), generator=gen) for n in sorted({128, 512, args.prompt_tokens})}
    batch_prompt = torch.randint(3, vocab, (4, args.prompt_tokens), generator=gen)

    t0 = time.perf_counter()
    if library == "gemma3n":
        import gemma3n

        kwargs = {"dtype": torch.bfloat16}
        if precision != "bf16":
            if "quantize" not in inspect.signature(gemma3n.load).parameters:
                return {**result, "available": False, "reason": "installed gemma3n.load has no quantize argument"}
            kwargs["quantize"] = precision
        model = gemma3n.load(args.model, **kwargs)
        result["weight_bytes_per_token"] = weight_bytes_per_token(model)
        compile_steps = {"compile": True, "eager": False}.get(mode)

        def generate(ids, new, streamer=None):
            extra = {} if compile_steps is None else {"compile": compile_steps}
            return model.generate(
                ids, max_new_tokens=new, do_sample=False, eos_token_id=[-1], streamer=streamer, **extra
            )

        def prefill(ids):
            from gemma3n.text_model import KVCache

            cache = KVCache(model.config.text, 1, ids.shape[1] + 1, dtype=model.dtype, device="cpu")
            with torch.inference_mode():
                return model(ids, cache=cache, logits_to_keep=1)
    else:
        from transformers import AutoModelForImageTextToText

        model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        result["weight_bytes_per_token"] = reference_weight_bytes_per_token(model)

        def generate(ids, new, streamer=None):
            with torch.inference_mode():
                return model.generate(
                    input_ids=ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=streamer
                )

        def prefill(ids):
            with torch.inference_mode():
                return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    result["load_s"] = time.perf_counter() - t0
    result["available"] = True

    # time to first token (prefill + the first sampled token), after a warm-up
    first = prompts[128]
    t0 = time.perf_counter()
    generate(first, 1)
    result["first_call_s"] = time.perf_counter() - t0
    ttft = []
    for _ in range(2):
        t0 = time.perf_counter()
        generate(first, 1)
        ttft.append(time.perf_counter() - t0)
    result["ttft_128_s"] = min(ttft)

    for n in (128, 512):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            prefill(prompts[n])
            times.append(time.perf_counter() - t0)
        result[f"prefill_{n}_tok_s"] = n / min(times)

    for batch in (1, 4):
        ids = prompts[args.prompt_tokens] if batch == 1 else batch_prompt
        if library == "gemma3n" and args.job_steps:
            # the weight layout a job of --job-steps planned steps at this batch size gets from the pipelines and
            # the CLI (gemma3n.text_model.packed_weights); generate alone decides for its own --new-tokens steps
            from gemma3n.text_model.packed_weights import is_packed, pack_if_pays

            t0 = time.perf_counter()
            packed_before = is_packed(model)
            result[f"packed_b{batch}"] = pack_if_pays(model, batch, args.job_steps, compiled=bool(compile_steps))
            if result[f"packed_b{batch}"] and not packed_before:
                result["pack_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        generate(ids, 3)  # warm-up (and, for compiled steps, the compile of this batch size)
        result[f"warmup_b{batch}_s"] = time.perf_counter() - t0
        timer = TokenTimer()
        generate(ids, args.new_tokens, timer)
        steps = timer.step_seconds()
        result[f"decode_b{batch}_step_s"] = steps
        result[f"decode_b{batch}_tok_s"] = batch / statistics.median(steps)
    result["peak_rss_gb"] = peak_rss_gb()
    if library == "gemma3n":
        from gemma3n.row_kernels import row_kernel_status

        result["row_kernel"] = row_kernel_status()  # "on", or "off: why" (few-row bf16, int8 and int4 products)
    return result


COPY_BYTES_COUNTED = "read+write"  # results before this key counted a copy's source bytes only (half the figure)


def copy_bandwidth_gbs(threads: int, gib: float = 1.0) -> float:
    """Median bytes/s of copying a ``gib`` GiB tensor, counting the bytes read and the bytes written."""
    torch.set_num_threads(threads)
    src = torch.empty(int(gib * (1 << 30)) // 2, dtype=torch.bfloat16).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


# ---- the parent: rounds, tables ------------------------------------------------------------------------------------
def ensure_checkpoint(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    sys.path.insert(0, str(HERE))
    from published_checkpoint import build

    print(f"building the E2B-shaped random checkpoint in {path} (once)", flush=True)
    return build("e2b", path)


def spawn(args, impl: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", impl, "--model", str(args.model)]
    cmd += ["--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--job-steps", str(args.job_steps)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(impl))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "impl": impl,
            "available": False,
            "reason": f"child failed (exit {proc.returncode}): {' | '.join(tail)}",
        }
    result = json.loads(lines[-1][len(RESULT_MARK) :])
    result["process_s"] = time.perf_counter() - t0
    return result


def summarize(rounds: list[dict], impls: list[str]) -> dict:
    """Per implementation: medians and ranges over rounds, fraction of the same round's copy-bandwidth limit."""
    summary: dict = {}
    bf16_bytes = None
    for r in rounds:
        for res in r["results"].values():
            if res.get("available") and res["impl"].startswith("gemma3n-bf16"):
                bf16_bytes = res["weight_bytes_per_token"]
    for impl in impls:
        runs = [(r["copy_gbs"], r["results"][impl]) for r in rounds if impl in r["results"]]
        ok = [(bw, res) for bw, res in runs if res.get("available")]
        if not ok:
            summary[impl] = {"available": False, "reason": runs[0][1].get("reason", "") if runs else "not run"}
            continue
        nbytes = ok[0][1].get("weight_bytes_per_token", bf16_bytes)
        row: dict = {"available": True, "rounds": len(ok), "weight_bytes_per_token": nbytes}
        keys = ["decode_b1_tok_s", "decode_b4_tok_s", "prefill_128_tok_s", "prefill_512_tok_s", "ttft_128_s"]
        keys += ["peak_rss_gb", "load_s", "first_call_s", "warmup_b1_s"]
        for key in keys:
            values = [res[key] for _, res in ok]
            row[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        for key in ("packed_b1", "packed_b4"):
            row[key] = any(res.get(key) for _, res in ok)
        if any("row_kernel" in res for _, res in ok):
            row["row_kernel"] = sorted({res["row_kernel"] for _, res in ok if "row_kernel" in res})
        packing = [res["pack_s"] for _, res in ok if "pack_s" in res]
        if packing:
            row["pack_s"] = {"median": statistics.median(packing), "min": min(packing), "max": max(packing)}
        if nbytes:
            fractions = [nbytes * res["decode_b1_tok_s"] / 1e9 / bw for bw, res in ok]
            row["weight_gbs_b1"] = nbytes * row["decode_b1_tok_s"]["median"] / 1e9
            row["limit_b1_tok_s"] = statistics.median(bw for bw, _ in ok) * 1e9 / nbytes
            row["fraction_of_copy_limit"] = {
                "median": statistics.median(fractions),
                "min": min(fractions),
                "max": max(fractions),
            }
        b4_over_b1 = [res["decode_b4_tok_s"] / res["decode_b1_tok_s"] for _, res in ok]
        row["b4_over_b1"] = statistics.median(b4_over_b1)
        summary[impl] = row
    ref = "transformers-bf16"
    for impl, row in summary.items():
        if impl == ref or not row.get("available") or not summary.get(ref, {}).get("available"):
            continue
        ratios = []
        for r in rounds:  # per-round ratio: both ran in the same round
            ours, theirs = r["results"].get(impl, {}), r["results"].get(ref, {})
            if ours.get("available") and theirs.get("available"):
                ratios.append(ours["decode_b1_tok_s"] / theirs["decode_b1_tok_s"])
        if ratios:
            row["decode_b1_vs_transformers"] = {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            }
    return summary


def summarize_kernels(rounds: list[dict], summary: dict) -> dict:
    """Per kernel: medians and ranges over rounds of its GB/s, its fraction of the read bandwidth, and the decode
    tok/s it allows at batch 1 (the precision's bytes per token, layers and LM head each at their measured GB/s)."""
    measured = [r["kernels"] for r in rounds if r.get("kernels", {}).get("available")]
    if not measured:
        return {}

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    copies = [r["copy_gbs"] for r in rounds if r.get("kernels", {}).get("available")]
    out: dict = {"read_gbs": spread([m["read_gbs"] for m in measured]), "copy_gbs": spread(copies), "kernels": {}}
    out["bf16_few_row_kernel"] = sorted({m["bf16_few_row_kernel"] for m in measured if "bf16_few_row_kernel" in m})
    for name in measured[0]["kernels"]:
        triples = [(m["kernels"][name], m["read_gbs"], c) for m, c in zip(measured, copies, strict=True)]
        runs = [run for run, _, _ in triples]
        row = {key: spread([run[key] for run in runs]) for key in runs[0] if key.endswith("_gbs")}
        row["of_read_b1"] = spread([run["layers_b1_gbs"] / read for run, read, _ in triples])
        row["of_copy_b1"] = spread([run["layers_b1_gbs"] / copy for run, _, copy in triples])
        precision = name.split()[0]
        impl = summary.get(f"gemma3n-{precision}", {})
        per_token = impl.get("weight_bytes_per_token") if impl.get("available") else None
        if per_token:  # the LM head's share at the head's rate, the rest at the layers' rate
            head = runs[0]["lm_head_bytes"]
            seconds = (per_token - head) / (row["layers_b1_gbs"]["median"] * 1e9) + head / (
                row["lm_head_b1_gbs"]["median"] * 1e9
            )
            row["ceiling_b1_tok_s"] = 1 / seconds
        out["kernels"][name] = row
    return out


def markdown(results: dict) -> str:
    copy = results["copy_gbs"]
    lines = [
        f"E2B shape, random bf16 checkpoint, CPU, {results['threads']} threads, torch {results['torch']}, "
        f"{results['rounds']} rounds, {results['new_tokens']} decode tokens after a {results['prompt_tokens']}-token "
        f"prompt; copy bandwidth {copy['median']:.1f} GB/s ({copy['min']:.1f}-{copy['max']:.1f}; bytes read + written)"
        f"; load average "
        f"{results['load_average_start']} at start, {results['load_average_end']} at end. Medians over rounds, "
        "(range) in brackets. torch's huge-page setting (THP_MEM_ALLOC_ENABLE): "
        + (
            f"{USER_THP} for every child (set by the user)."
            if USER_THP is not None
            else "1 for gemma3n's children (gemma3n sets it on import), torch's default (unset) for transformers'."
        ),
        "",
        "| implementation | decode b1 tok/s | limit tok/s | weight GB/s | fraction of copy limit | vs transformers | "
        "decode b4 tok/s (x b1) | prefill 128 tok/s | prefill 512 tok/s | TTFT 128 s | peak RSS GB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(cell: dict, digits: int = 2) -> str:
        return f"{cell['median']:.{digits}f} ({cell['min']:.{digits}f}-{cell['max']:.{digits}f})"

    for impl, row in results["summary"].items():
        if not row.get("available"):
            lines.append(f"| {impl} | not available: {row.get('reason', '')} |" + " |" * 9)
            continue
        frac = row.get("fraction_of_copy_limit")
        versus = row.get("decode_b1_vs_transformers")
        lines.append(
            f"| {impl} | {fmt(row['decode_b1_tok_s'])} | {row.get('limit_b1_tok_s', float('nan')):.2f} | "
            f"{row.get('weight_gbs_b1', float('nan')):.2f} | "
            f"{fmt(frac) if frac else '-'} | {fmt(versus) + 'x' if versus else '-'} | "
            f"{fmt(row['decode_b4_tok_s'])} ({row['b4_over_b1']:.2f}x) | {fmt(row['prefill_128_tok_s'], 0)} | "
            f"{fmt(row['prefill_512_tok_s'], 0)} | {fmt(row['ttft_128_s'])} | {fmt(row['peak_rss_gb'])} |"
        )
    lines.append("")
    packed = [
        f"{impl} (batch {', '.join(str(b) for b in (1, 4) if row.get(f'packed_b{b}'))}; packing "
        f"{fmt(row['pack_s']) if row.get('pack_s') else '?'} s)"
        for impl, row in results["summary"].items()
        if row.get("packed_b1") or row.get("packed_b4")
    ]
    row_kernel = [
        f"{impl} {', '.join(row['row_kernel'])}" for impl, row in results["summary"].items() if row.get("row_kernel")
    ]
    if row_kernel:
        lines.append("gemma3n's CPU row kernels (gemma3n.row_kernels, bf16 int8 int4): " + "; ".join(row_kernel) + ".")
    if packed:
        lines.append(
            f"bf16 weights packed for oneDNN (gemma3n.text_model.packed_weights), as a job of "
            f"{results.get('job_steps', '?')} planned decode steps decides: " + "; ".join(packed) + "."
        )
    lines.append("Weight bytes read per decode token: " + ", ".join(
        f"{impl} {row['weight_bytes_per_token'] / 1e9:.2f} GB"
        for impl, row in results["summary"].items()
        if row.get("available") and row.get("weight_bytes_per_token")
    ) + ".")  # fmt: skip
    kernels = results.get("kernel_summary")
    if kernels:
        read = kernels["read_gbs"]
        lines += [
            "",
            f"Matmul kernels alone (``kernel_ceilings.py``, same rounds): GB/s of weight read, over {LAYERS} E2B "
            f"layers' matrices and over the LM head, 1 and 4 rows; read bandwidth (amax over 1 GiB of float32) "
            f"{fmt(read, 1)} GB/s, "
            f"copy {fmt(kernels['copy_gbs'], 1)} GB/s (read + written) in the same rounds. The ceiling is the decode "
            "tok/s the kernel allows with no other work in the step."
            + (
                f" gemma3n's bf16 few-row kernel here: {', '.join(kernels['bf16_few_row_kernel'])}."
                if kernels.get("bf16_few_row_kernel")
                else ""
            ),
            "",
            "| kernel | layers b1 GB/s | of read bandwidth | of copy | LM head b1 GB/s | layers b4 GB/s | "
            "LM head b4 GB/s | ceiling b1 tok/s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in kernels["kernels"].items():
            ceiling = row.get("ceiling_b1_tok_s")
            lines.append(
                f"| {name} | {fmt(row['layers_b1_gbs'], 1)} | {fmt(row['of_read_b1'])} | {fmt(row['of_copy_b1'])} | "
                f"{fmt(row['lm_head_b1_gbs'], 1)} | {fmt(row['layers_b4_gbs'], 1)} | {fmt(row['lm_head_b4_gbs'], 1)} | "
                f"{f'{ceiling:.2f}' if ceiling else '-'} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/work/cache/e2b"))
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS + EXTRA_IMPLS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument(
        "--job-steps",
        type=int,
        default=1024,
        help="planned decode steps of the job each gemma3n batch size stands for (decides packed weights); 0: "
        "generate decides alone",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cpu_decode_e2b.json")
    parser.add_argument("--render", action="store_true", help="only re-write the markdown table from --out's JSON")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.render:
        results = json.loads(args.out.read_text())
        if results.get("copy_bytes_counted") != COPY_BYTES_COUNTED:  # an older run: copies counted source bytes only
            for r in results["per_round"]:
                r["copy_gbs"] *= 2
            results["copy_bytes_counted"] = COPY_BYTES_COUNTED
        copies = [r["copy_gbs"] for r in results["per_round"]]
        results["copy_gbs"] = {"median": statistics.median(copies), "min": min(copies), "max": max(copies)}
        results["summary"] = summarize(results["per_round"], results["impls"])
        results["kernel_summary"] = summarize_kernels(results["per_round"], results["summary"])
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(markdown(results) + "\n")
        print(markdown(results))
        return
    if args.child == KERNELS:
        from kernel_ceilings import kernel_ceilings

        print(RESULT_MARK + json.dumps({"impl": KERNELS, "available": True, **kernel_ceilings(args.threads)}))
        return
    if args.child:
        print(RESULT_MARK + json.dumps(run_child(args)), flush=True)
        return

    ensure_checkpoint(args.model)
    results: dict = {
        "model": str(args.model),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "new_tokens": args.new_tokens,
        "prompt_tokens": args.prompt_tokens,
        "job_steps": args.job_steps,
        "impls": args.impls,
        "copy_bytes_counted": COPY_BYTES_COUNTED,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "per_round": [],
    }
    for r in range(args.rounds):
        bw = copy_bandwidth_gbs(args.threads)
        print(f"round {r + 1}/{args.rounds}: copy {bw:.1f} GB/s", flush=True)
        round_results = {}
        for impl in args.impls:
            res = spawn(args, impl)
            round_results[impl] = res
            if res.get("available"):
                print(
                    f"  {impl:<22} decode b1 {res['decode_b1_tok_s']:.2f}, b4 {res['decode_b4_tok_s']:.2f} tok/s, "
                    f"prefill 512 {res['prefill_512_tok_s']:.0f} tok/s, TTFT {res['ttft_128_s']:.2f} s, "
                    f"RSS {res['peak_rss_gb']:.2f} GB ({res['process_s']:.0f} s)",
                    flush=True,
                )
            else:
                print(f"  {impl:<22} not available: {res.get('reason')}", flush=True)
        kernels = spawn(args, KERNELS)
        if kernels.get("available"):
            print(f"  kernels: read {kernels['read_gbs']:.1f} GB/s; " + ", ".join(
                f"{name} {k['layers_b1_gbs']:.1f}" for name, k in kernels["kernels"].items()
            ) + " GB/s (layers, 1 row)", flush=True)  # fmt: skip
        results["per_round"].append({"copy_gbs": bw, "results": round_results, "kernels": kernels})
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    copies = [r["copy_gbs"] for r in results["per_round"]]
    results["copy_gbs"] = {"median": statistics.median(copies), "min": min(copies), "max": max(copies)}
    results["summary"] = summarize(results["per_round"], args.impls)
    results["kernel_summary"] = summarize_kernels(results["per_round"], results["summary"])
    table = markdown(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
