"""Peak memory of the whole multimodal E2B model in use: load, then one image, then one 30 s clip, per precision.

    python benchmarks/bench_multimodal_memory.py --model /work/cache/e2b --lock /tmp/gemma3n-heavy.lock

Each configuration runs in its own fresh process (its VmHWM, the peak resident set from /proc/self/status, is its
own), configurations interleaved over ``--rounds``; ``--lock`` is held around each process, not the whole run. A
configuration is a precision (``bf16``; ``int8`` / ``int4``: ``gemma3n.load(path, quantize=...)``) and the towers'
weight mode: ``streamed`` (``low_memory=True``, the default with ``quantize``: each tower block's mapped weight pages
are dropped after the block has run and no packed convolution copy is kept) or ``resident`` (``low_memory=False``:
the towers' pages stay mapped in and the vision convolutions keep their oneDNN-packed copies).

Phases, as a user would run them: ``gemma3n.load``; an "image-text-to-text" pipeline call with one 768x768 image;
an "automatic-speech-recognition" pipeline call with one 30 s clip (both greedy, ``--new-tokens`` tokens). VmHWM,
VmRSS and the anonymous / file-backed parts are recorded after each phase. Then the towers are timed alone
(``--tower-calls`` calls each after the pipelines' warm-up; in the streamed mode every call re-reads the weights from
the page cache). Writes JSON and a markdown table (``--out``, default benchmarks/results/multimodal_memory_e2b.*).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from locking import maybe_locked  # noqa: E402

GB = 1e9
CONFIGS = ("int4-streamed", "int4-resident", "int8-streamed", "int8-resident", "bf16-streamed", "bf16-resident")
FIELDS = ("VmHWM", "VmRSS", "RssAnon", "RssFile")


def memory_kb() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in kB."""
    fields = {}
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in FIELDS:
                fields[key] = int(value.split()[0])
    return fields


def child(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image

    import gemma3n

    torch.set_num_threads(args.threads)
    precision, _, mode = args.child.partition("-")
    record: dict = {"config": args.child, "precision": precision, "towers": mode, "phases": {}}
    start = time.perf_counter()
    model = gemma3n.load(args.model, quantize=None if precision == "bf16" else precision, low_memory=mode == "streamed")
    record["load_s"] = time.perf_counter() - start
    record["phases"]["load"] = memory_kb()
    settings = {"max_new_tokens": args.new_tokens, "progress": False}

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (768, 768, 3), dtype=np.uint8))
    vision = gemma3n.pipeline("image-text-to-text", model=model)
    start = time.perf_counter()
    vision(images=image, text="<image_soft_token>Describe the image.", **settings)
    record["image_call_s"] = time.perf_counter() - start
    record["phases"]["image"] = memory_kb()

    wave = (0.1 * rng.standard_normal(16000 * 30)).astype(np.float32)
    asr = gemma3n.pipeline("automatic-speech-recognition", model=model)
    start = time.perf_counter()
    asr({"raw": wave, "sampling_rate": 16000}, **settings)
    record["audio_call_s"] = time.perf_counter() - start
    record["phases"]["audio"] = memory_kb()

    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(1)).to(model.dtype)
    features = torch.randn(1, 3000, 128, generator=torch.Generator().manual_seed(2)).to(model.dtype)
    valid = torch.ones(1, 3000, dtype=torch.bool)
    for name, call in (
        ("vision", lambda: model.vision_tower(pixels)),
        ("audio", lambda: model.audio_tower(features, valid)),
    ):
        times = []
        with torch.inference_mode():
            for _ in range(args.tower_calls):
                begin = time.perf_counter()
                call()
                times.append(1000 * (time.perf_counter() - begin))
        record[f"{name}_tower_ms"] = times
    record["phases"]["towers_timed"] = memory_kb()
    print("RESULT " + json.dumps(record), flush=True)


def overhead_child(args: argparse.Namespace) -> None:
    """Tower times of the three weight modes in one process (bf16 weights), interleaved call by call: ``resident``,
    ``repacked`` (packed vision weights made and freed per call, pages kept) and ``streamed`` (both, and each block's
    pages dropped after it)."""
    import torch

    import gemma3n

    torch.set_num_threads(args.threads)
    model = gemma3n.load(args.model, low_memory=False)
    pixels = torch.randn(1, 3, 768, 768, generator=torch.Generator().manual_seed(1)).to(model.dtype)
    features = torch.randn(1, 3000, 128, generator=torch.Generator().manual_seed(2)).to(model.dtype)
    valid = torch.ones(1, 3000, dtype=torch.bool)
    modes = {
        "resident": lambda: model.stream_tower_weights(False),
        "repacked": lambda: model.stream_tower_weights(False).vision_tower.keep_packed_weights(False),
        "streamed": lambda: model.stream_tower_weights(True),
    }
    times: dict = {f"{tower}_{mode}": [] for tower in ("vision", "audio") for mode in modes}
    outputs: dict = {}
    with torch.inference_mode():
        for _ in range(args.overhead_rounds):
            for mode, switch in modes.items():
                switch()
                model.vision_tower(pixels)  # resident: packs the weights; all: maps the pages in again
                for tower, call in (
                    ("vision", lambda: model.vision_tower(pixels)),
                    ("audio", lambda: model.audio_tower(features, valid)[0]),
                ):
                    begin = time.perf_counter()
                    out = call()
                    times[f"{tower}_{mode}"].append(1000 * (time.perf_counter() - begin))
                    if tower in outputs:
                        assert torch.equal(out, outputs[tower]), f"{tower} output changed in mode {mode}"
                    outputs[tower] = out
    print("RESULT " + json.dumps({"config": "overhead", "times_ms": times}), flush=True)


def warm_page_cache(model_dir: str) -> float:
    """Read the checkpoint's files once (seconds taken), so every process starts from the same page cache: the
    streamed towers re-read their weights from it, and a first process should not pay for a cold disk alone."""
    begin = time.perf_counter()
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with open(file, "rb", buffering=0) as fh:
            while fh.read(64 << 20):
                pass
    return time.perf_counter() - begin


def run_child(args: argparse.Namespace, config: str) -> dict:
    cmd = [sys.executable, __file__, "--child", config, "--model", args.model, "--threads", str(args.threads)]
    cmd += ["--new-tokens", str(args.new_tokens), "--tower-calls", str(args.tower_calls)]
    cmd += ["--overhead-rounds", str(args.overhead_rounds)]
    with maybe_locked(args.lock):
        warm_s = warm_page_cache(args.model)
        load_avg = os.getloadavg()[0]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(done.stdout[-2000:], done.stderr[-4000:], file=sys.stderr)
        return {"config": config, "error": f"exit code {done.returncode}"}
    record = json.loads(lines[-1].removeprefix("RESULT "))
    record["load_average_1min"] = load_avg
    record["page_cache_warm_s"] = warm_s
    return record


def summarize(records: list[dict]) -> dict:
    """Per configuration: median (and range) of every phase's VmHWM and of the tower times."""
    table = {}
    for config in dict.fromkeys(r["config"] for r in records):
        runs = [r for r in records if r["config"] == config and "error" not in r]
        if not runs:
            continue
        row: dict = {"runs": len(runs)}
        for phase in ("load", "image", "audio", "towers_timed"):
            values = [r["phases"][phase]["VmHWM"] * 1024 / GB for r in runs]
            row[f"hwm_{phase}_gb"] = (statistics.median(values), min(values), max(values))
        for tower in ("vision", "audio"):
            values = [t for r in runs for t in r[f"{tower}_tower_ms"]]
            row[f"{tower}_ms"] = (statistics.median(values), min(values), max(values))
        row["load_s"] = statistics.median(r["load_s"] for r in runs)
        row["load_average"] = [round(r["load_average_1min"], 2) for r in runs]
        table[config] = row
    return table


def markdown(summary: dict, args: argparse.Namespace, commit: str) -> str:
    def cell(value: tuple, digits: int) -> str:
        med, lo, hi = value
        return f"{med:.{digits}f}" if lo == hi else f"{med:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"

    lines = [
        f"# Multimodal E2B peak memory (commit {commit})",
        "",
        f"`python benchmarks/bench_multimodal_memory.py --model {args.model} --rounds {args.rounds}"
        + (f" --lock {args.lock}" if args.lock else "")
        + "`",
        "",
        f"Random-weight E2B (bf16 checkpoint), {args.threads} threads, {args.new_tokens} new tokens per call. Peak RSS"
        " = VmHWM after each phase, in GB (1e9 bytes), cumulative over the process. `streamed` = `low_memory=True`"
        " (default with `quantize=`), `resident` = `low_memory=False` (the previous behaviour). Tower times: median"
        f" (range) of {args.tower_calls} calls per process after the pipelines' warm-up, in ms.",
        "",
        "| config | runs | after load | after image | after 30 s audio | vision tower ms | audio tower ms | load s |"
        " load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for config, row in summary.items():
        lines.append(
            f"| {config} | {row['runs']} | {cell(row['hwm_load_gb'], 2)} | {cell(row['hwm_image_gb'], 2)} | "
            f"{cell(row['hwm_audio_gb'], 2)} | {cell(row['vision_ms'], 0)} | {cell(row['audio_ms'], 0)} | "
            f"{row['load_s']:.1f} | {', '.join(map(str, row['load_average']))} |"
        )
    return "\n".join(lines) + "\n"


def overhead_markdown(record: dict | None, args: argparse.Namespace) -> str:
    if record is None:
        return ""
    times = record["times_ms"]
    lines = [
        "",
        f"Tower time by weight mode, one process (bf16 weights), modes interleaved over {args.overhead_rounds} rounds"
        " (ms, median and range; outputs checked bit-equal across modes). `repacked`: vision convolutions packed per"
        " call, pages kept; `streamed`: the `low_memory` path.",
        "",
        "| tower | resident | repacked | streamed | streamed / resident |",
        "|---|---|---|---|---|",
    ]
    for tower in ("vision", "audio"):
        cells = []
        for mode in ("resident", "repacked", "streamed"):
            values = times[f"{tower}_{mode}"]
            cells.append(f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})")
        ratio = statistics.median(times[f"{tower}_streamed"]) / statistics.median(times[f"{tower}_resident"])
        lines.append(f"| {tower} | {' | '.join(cells)} | {ratio:.2f}x |")
    return "\n".join(lines) + "\n"


def resumed_records(log: str) -> list[dict]:
    """The finished processes' records from the stderr log of an interrupted run (one JSON object per line)."""
    records = []
    for line in Path(log).read_text(encoding="utf-8").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if "error" not in record:
                records.append(record)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/cache/e2b")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=torch_threads_default())
    parser.add_argument("--new-tokens", type=int, default=4)
    parser.add_argument("--tower-calls", type=int, default=3)
    parser.add_argument(
        "--overhead-rounds", type=int, default=3, help="rounds of the in-process tower timing (0: none)"
    )
    parser.add_argument("--resume", default=None, help="stderr log of an interrupted run: reuse its finished records")
    parser.add_argument("--lock", default=None, help="flock file held around each process")
    parser.add_argument("--out", default=str(HERE / "results" / "multimodal_memory_e2b"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        overhead_child(args) if args.child == "overhead" else child(args)
        return
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE, check=False
    ).stdout.strip()
    records = resumed_records(args.resume) if args.resume else []
    if args.overhead_rounds and not any(r["config"] == "overhead" for r in records):
        print("tower overhead (one process)", file=sys.stderr, flush=True)
        records.append(run_child(args, "overhead"))
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    for round_index in range(args.rounds):
        for config in args.configs:
            if sum(r["config"] == config for r in records) > round_index:
                continue  # done in the resumed run
            print(f"round {round_index + 1}/{args.rounds}: {config}", file=sys.stderr, flush=True)
            records.append(run_child(args, config))
            print(json.dumps(records[-1]), file=sys.stderr, flush=True)
    summary = summarize([r for r in records if r["config"] != "overhead"])
    overhead = next((r for r in records if r["config"] == "overhead" and "error" not in r), None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"commit": commit, "args": vars(args), "summary": summary, "records": records}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    text = markdown(summary, args, commit) + overhead_markdown(overhead, args)
    out.with_suffix(".md").write_text(text, encoding="utf-8")
    print(text)


def torch_threads_default() -> int:
    """The cores this process may use (what torch picks by default)."""
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
