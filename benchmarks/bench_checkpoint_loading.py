"""Checkpoint reading: gemma3n's own safetensors header parser (checkpoint.py) against the library's ``safe_open``.

    python benchmarks/bench_checkpoint_loading.py --model /work/cache/e2b --lock /tmp/gemma3n-heavy.lock

For each round, in alternating order, every (implementation, operation, cache state) runs in its own child process:
``read`` (``read_checkpoint_tensors``), ``touch`` (read, then fault in every page of every tensor: what a first
forward pass costs on top), ``load_text`` (``gemma3n.load(..., text_only=True)``) and ``load_full`` (``gemma3n.load``).
"cold" drops the shards from the page cache first (``posix_fadvise(DONTNEED)``, which only works for pages no other
process maps; the resident bytes left are reported). Each child reports the time of the operation, its peak RSS
(VmHWM) and its anonymous / file-backed RSS after the operation, and how many bytes of the returned tensors (or of the
model's parameters and buffers) lie in file-backed mappings of the shards, i.e. are zero-copy views of the file.
The same run measures memory copy bandwidth and the cold sequential read bandwidth of the disk (plain ``read``), the
hardware limits the operations are compared to. Writes JSON + a markdown table into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from locking import maybe_locked

IMPLEMENTATIONS = ("parser", "safetensors")
OPERATIONS = ("read", "touch", "load_text", "load_full")
RESULTS = Path(__file__).parent / "results"


# ---- the alternative: reading through the safetensors library, as checkpoint.py did in commit 1989248 (branch
# loader), its precise errors left out ------------------------------------------------------------------------------
def safe_open_read_checkpoint_tensors(path, prefix: str = ""):
    """Every tensor of the checkpoint through ``safe_open(...).get_tensor`` (views of the library's memory map)."""
    from safetensors import safe_open

    from gemma3n.checkpoint import weight_files

    tensors = {}
    for file in weight_files(path):
        with safe_open(file, framework="pt", device="cpu") as handle:
            for name in handle.keys():
                if name.startswith(prefix):
                    tensors[name[len(prefix) :]] = handle.get_tensor(name)
    return tensors


# ---- child: one measurement ----------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of this process, in bytes."""
    wanted = ("VmHWM", "VmRSS", "RssAnon", "RssFile")
    values = {}
    with open("/proc/self/status", encoding="utf-8") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in wanted:
                values[key] = int(rest.split()[0]) * 1024
    return values


def _shard_mappings(files: list[Path]) -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of the checkpoint's shard files."""
    names = {str(f.resolve()) for f in files}
    ranges = []
    with open("/proc/self/maps", encoding="utf-8") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() in names:
                begin, end = (int(a, 16) for a in fields[0].split("-"))
                ranges.append((begin, end))
    return ranges


def _mapped_bytes(tensors, ranges: list[tuple[int, int]]) -> tuple[int, int]:
    """(bytes lying in the given mappings, total bytes) over distinct tensors."""
    inside = total = 0
    seen = set()
    for t in tensors:
        if t.device.type != "cpu" or t.is_meta or (t.data_ptr(), t.numel()) in seen:
            continue
        seen.add((t.data_ptr(), t.numel()))
        size = t.numel() * t.element_size()
        total += size
        if any(lo <= t.data_ptr() and t.data_ptr() + size <= hi for lo, hi in ranges):
            inside += size
    return inside, total


def _drop_from_page_cache(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _resident_bytes(files: list[Path]) -> int | None:
    """Bytes of the files in the page cache (util-linux ``fincore``), None when it is not installed."""
    try:
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return sum(int(v) for v in out.split())


def _touch_every_page(tensors) -> int:
    """Fault in every page of every tensor (one byte per 4 KiB); returns a checksum so nothing is skipped."""
    import torch

    checksum = 0
    for t in tensors.values():
        if t.numel():
            flat = t.reshape(-1).view(torch.uint8)
            checksum += int(flat[::4096].sum())
    return checksum


def child(args: argparse.Namespace) -> None:
    import torch

    import gemma3n
    import gemma3n.model
    from gemma3n import checkpoint

    torch.set_num_threads(args.threads)
    files = checkpoint.weight_files(args.model)
    if args.impl == "safetensors":
        gemma3n.model.read_checkpoint_tensors = safe_open_read_checkpoint_tensors
        reader = safe_open_read_checkpoint_tensors
    else:
        reader = checkpoint.read_checkpoint_tensors
    resident_before = None
    if args.cold:
        _drop_from_page_cache(files)
        resident_before = _resident_bytes(files)
    before = _status()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    start = time.perf_counter()
    if args.op in ("read", "touch"):
        tensors = reader(args.model)
        if args.op == "touch":
            _touch_every_page(tensors)
        held = list(tensors.values())
    else:
        model = gemma3n.load(args.model, text_only=args.op == "load_text")
        held = [*model.parameters(), *model.buffers()]
    seconds = time.perf_counter() - start
    major_faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults_before
    after = _status()
    inside, total = _mapped_bytes(held, _shard_mappings(files))
    result = {
        "impl": args.impl,
        "op": args.op,
        "cold": args.cold,
        "seconds": seconds,
        "rss_before": before["VmRSS"],
        "peak_rss": after["VmHWM"],
        "rss_after": after["VmRSS"],
        "rss_anon_after": after["RssAnon"],
        "rss_file_after": after["RssFile"],
        "anon_growth": after["RssAnon"] - before["RssAnon"],
        "bytes_in_file_mappings": inside,
        "bytes_total": total,
        "resident_before": resident_before,
        "major_faults": major_faults,
    }
    print("RESULT " + json.dumps(result), flush=True)


# ---- hardware limits -------------------------------------------------------------------------------------------------
def copy_bandwidth_gbs() -> float:
    """Best of 5 copies of 512 MiB between two tensors, counting read + write bytes."""
    import torch

    src = torch.ones(128 * 2**20, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def cold_read_bandwidth_gbs(files: list[Path], limit: int = 3 * 2**30) -> float:
    """Sequential ``read`` (64 MiB chunks) of up to ``limit`` bytes of the largest shard, after dropping it from the
    page cache."""
    largest = max(files, key=lambda f: f.stat().st_size)
    _drop_from_page_cache([largest])
    done = 0
    start = time.perf_counter()
    with open(largest, "rb", buffering=0) as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        while done < limit and (chunk := fh.read(64 * 2**20)):
            done += len(chunk)
    return done / (time.perf_counter() - start) / 1e9


# ---- parent ----------------------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, impl: str, op: str, cold: bool) -> dict:
    command = [sys.executable, __file__, "--child", "--impl", impl, "--op", op, "--model", str(args.model)]
    command += ["--threads", str(args.threads)] + (["--cold"] if cold else [])
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"child {impl}/{op}/{'cold' if cold else 'warm'} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def summarize(runs: list[dict]) -> list[dict]:
    rows = []
    for op in OPERATIONS:
        for cold in (False, True):
            for impl in IMPLEMENTATIONS:
                group = [r for r in runs if r["impl"] == impl and r["op"] == op and r["cold"] == cold]
                if not group:
                    continue

                def stat(key, scale=1.0, group=group):
                    values = [r[key] / scale for r in group]
                    return {"median": statistics.median(values), "min": min(values), "max": max(values)}

                rows.append(
                    {
                        "op": op,
                        "cache": "cold" if cold else "warm",
                        "impl": impl,
                        "rounds": len(group),
                        "seconds": stat("seconds"),
                        "peak_rss_gb": stat("peak_rss", 1e9),
                        "rss_anon_after_gb": stat("rss_anon_after", 1e9),
                        "anon_growth_gb": stat("anon_growth", 1e9),
                        "rss_file_after_gb": stat("rss_file_after", 1e9),
                        "major_faults": stat("major_faults"),
                        "in_file_mappings": min(r["bytes_in_file_mappings"] / max(r["bytes_total"], 1) for r in group),
                        "bytes_total_gb": group[0]["bytes_total"] / 1e9,
                        "resident_before_gb": max((r["resident_before"] or 0) for r in group) / 1e9 if cold else None,
                    }
                )
    return rows


def markdown(meta: dict, rows: list[dict]) -> str:
    def span(s, fmt="{:.2f}"):
        return f"{fmt.format(s['median'])} ({fmt.format(s['min'])}-{fmt.format(s['max'])})"

    lines = [
        "# Checkpoint loading: hand-written safetensors parser vs the safetensors library (`safe_open`)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Checkpoint: {meta['model']} ({meta['checkpoint_gb']:.2f} GB in {meta['shards']} shards); safetensors "
        f"{meta['safetensors']}, torch {meta['torch']}; {meta['threads']} threads; "
        f"{meta['rounds']} interleaved rounds, each measurement in its own process; "
        "median (min-max). Load average before / after: "
        f"{meta['loadavg_before']} / {meta['loadavg_after']}.",
        "",
        f"Hardware limits measured in the same run: memory copy {meta['copy_gbs']:.1f} GB/s (read + write); cold "
        f"sequential disk read {meta['disk_gbs']:.2f} GB/s (median of "
        f"{', '.join(f'{x:.2f}' for x in meta['disk_gbs_runs'])}: plain `read` of 3 GiB of the largest shard after "
        "`posix_fadvise(DONTNEED)`, before and after the rounds).",
        "",
        "`in file map`: fraction of the returned tensors' (or the model's parameters' and buffers') bytes lying in a "
        "mapping of the shard files, i.e. zero-copy views. `anon +`: growth of anonymous RSS during the operation "
        "(copies). `resident`: bytes of the shards still in the page cache after the drop (cold runs).",
        "",
        "| operation | cache | implementation | seconds | major faults | peak RSS GB | anon + GB | file RSS after GB "
        "| in file map | resident GB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        resident = "" if r["resident_before_gb"] is None else f"{r['resident_before_gb']:.2f}"
        lines.append(
            f"| {r['op']} | {r['cache']} | {r['impl']} | {span(r['seconds'], '{:.3f}')} "
            f"| {span(r['major_faults'], '{:.0f}')} | {span(r['peak_rss_gb'])} "
            f"| {span(r['anon_growth_gb'])} | {span(r['rss_file_after_gb'])} | {r['in_file_mappings']:.3f} "
            f"| {resident} |"
        )
    touch = {(r["impl"], r["cache"]): r for r in rows if r["op"] == "touch"}
    if touch:
        lines += [
            "",
            "Page-in throughput of `touch` (checkpoint bytes / median seconds). Cold, against the plain `read` "
            "figure above (a reference more than a bound: the kernel's readahead on a mapping can beat 64 MiB reads); "
            "warm, pages are only mapped, not copied, so the figure depends on how much of the file the page cache "
            "kept (see file RSS) and the memory copy bandwidth is context, not a bound:",
        ]
        for (impl, cache), r in sorted(touch.items()):
            gbs = r["bytes_total_gb"] / r["seconds"]["median"]
            bound = f" = {gbs / meta['disk_gbs']:.0%} of the disk read" if cache == "cold" else ""
            lines.append(f"- {impl}, {cache}: {gbs:.2f} GB/s{bound}")
    return "\n".join(lines) + "\n"


def parent(args: argparse.Namespace) -> None:
    import safetensors
    import torch

    from gemma3n.checkpoint import weight_files

    files = weight_files(args.model)
    ops = args.ops
    caches = [True, False] if not args.warm_only else [False]  # cold first: it pages in what the warm run needs
    loadavg_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with maybe_locked(args.lock):
        copy_gbs = copy_bandwidth_gbs()
        disk_gbs = [cold_read_bandwidth_gbs(files)] if not args.warm_only else []
    runs = []
    for round_index in range(args.rounds):
        order = IMPLEMENTATIONS if round_index % 2 == 0 else IMPLEMENTATIONS[::-1]
        with maybe_locked(args.lock):  # one round at a time under the shared lock, so other jobs get their turn
            for op in ops:
                for impl in order:
                    for cold in caches:
                        result = run_child(args, impl, op, cold)
                        runs.append(result)
                        print(
                            f"round {round_index + 1}/{args.rounds} {op:9s} {'cold' if cold else 'warm'} {impl:11s} "
                            f"{result['seconds']:7.3f} s  peak {result['peak_rss'] / 1e9:5.2f} GB  "
                            f"anon+ {result['anon_growth'] / 1e9:5.2f} GB  "
                            f"mapped {result['bytes_in_file_mappings'] / max(result['bytes_total'], 1):.3f}",
                            flush=True,
                        )
    if not args.warm_only:
        with maybe_locked(args.lock):
            disk_gbs.append(cold_read_bandwidth_gbs(files))
    meta = {
        "command": "python benchmarks/bench_checkpoint_loading.py " + " ".join(sys.argv[1:]),
        "model": str(args.model),
        "checkpoint_gb": sum(f.stat().st_size for f in files) / 1e9,
        "shards": len(files),
        "safetensors": safetensors.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "rounds": args.rounds,
        "loadavg_before": loadavg_before,
        "loadavg_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "copy_gbs": copy_gbs,
        "disk_gbs": statistics.median(disk_gbs) if disk_gbs else float("nan"),
        "disk_gbs_runs": disk_gbs,
    }
    rows = summarize(runs)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"checkpoint_{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/work/cache/e2b"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ops", nargs="+", choices=OPERATIONS, default=list(OPERATIONS))
    parser.add_argument("--warm-only", action="store_true", help="skip the cold (page cache dropped) runs")
    parser.add_argument("--lock", help="file to flock around each round (shared machines)")
    parser.add_argument("--tag", default="e2b", help="results file stem: checkpoint_<tag>.json / .md")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--op", choices=OPERATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.model.exists():
        parser.error(f"no checkpoint at {args.model} (build one: benchmarks/published_checkpoint.py --preset e2b)")
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()
