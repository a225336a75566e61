"""Row gathers from a memory-mapped embedding table that is not in the page cache: default read-ahead against the
random-read advice gemma3n gives the tables only read by row gathers (``madvise(MADV_RANDOM)``).

    flock /tmp/gemma3n-heavy.lock python benchmarks/cold_row_gathers.py --model /work/cache/e2b \
        --out benchmarks/results/cold_row_gathers

The E2B per-layer table (262,144 x 7,680 bf16, 3.8 GB) is read one row per new token in a decode step and one row
per prompt token in prefill. When its file is not in the page cache (a machine with less memory than the checkpoint,
or any first run), every new row is a disk read. Each round and variant first drops the table's file from the page
cache (``posix_fadvise(POSIX_FADV_DONTNEED)``, after unmapping this process's pages of it), sets the advice, then
times ``--decode-rows`` single-row gathers of rows never read before in this run (as decode steps do) and one gather
of ``--prompt-rows`` rows (as a prompt does). Variants alternate over ``--rounds``; medians and ranges. Writes JSON
and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import statistics
import time
from pathlib import Path

import torch
from run_meta import run_meta, write_json

from gemma3n.checkpoint import read_checkpoint_tensors
from gemma3n.mapped_pages import advise_pages, advise_random_reads, release_mapped_pages

TABLE = "model.language_model.embed_tokens_per_layer.weight"


def table_file(model: Path) -> Path:
    """The safetensors file holding the per-layer table."""
    index = model / "model.safetensors.index.json"
    if index.exists():
        return model / json.loads(index.read_text())["weight_map"][TABLE]
    return model / "model.safetensors"


def drop_from_page_cache(table: torch.Tensor, path: Path) -> None:
    """Unmap this process's pages of ``table``, then ask the kernel to drop ``path`` from the page cache."""
    release_mapped_pages(table)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/work/cache/e2b"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--decode-rows", type=int, default=32)
    parser.add_argument("--prompt-rows", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cold_row_gathers")
    args = parser.parse_args()
    load_before = os.getloadavg()
    table = read_checkpoint_tensors(args.model)[TABLE]
    path = table_file(args.model)
    rng = random.Random(0)
    unread = list(range(table.shape[0]))
    rng.shuffle(unread)  # rows handed out once each: every timed gather reads rows this run has not read

    def fresh_rows(n: int) -> list[int]:
        return [unread.pop() for _ in range(n)]

    variants = {
        "read-ahead (kernel default)": lambda: advise_pages(table, mmap.MADV_NORMAL, whole_pages_only=False),
        "random reads (gemma3n)": lambda: advise_random_reads(table),
    }
    decode_ms: dict[str, list[float]] = {name: [] for name in variants}
    decode_max_ms: dict[str, list[float]] = {name: [] for name in variants}
    prompt_ms: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for round_index in range(args.rounds):
            order = list(variants) if round_index % 2 == 0 else list(reversed(variants))
            for name in order:
                drop_from_page_cache(table, path)
                variants[name]()
                per_row = []
                for row in fresh_rows(args.decode_rows):
                    start = time.perf_counter()
                    table[row].clone()
                    per_row.append((time.perf_counter() - start) * 1e3)
                decode_ms[name].append(statistics.median(per_row))
                decode_max_ms[name].append(max(per_row))
                ids = torch.tensor(fresh_rows(args.prompt_rows))
                start = time.perf_counter()
                torch.index_select(table, 0, ids)
                prompt_ms[name].append((time.perf_counter() - start) * 1e3)
                print(
                    f"round {round_index + 1} {name}: decode row {decode_ms[name][-1]:.3f} ms (max "
                    f"{decode_max_ms[name][-1]:.2f}), prompt of {args.prompt_rows} rows {prompt_ms[name][-1]:.1f} ms",
                    flush=True,
                )
    meta = run_meta(f"python benchmarks/cold_row_gathers.py --rounds {args.rounds} --out {args.out}", load_before)
    meta.update(table=list(table.shape), dtype=str(table.dtype), file=path.name, file_bytes=path.stat().st_size)
    rows = [
        {
            "variant": name,
            "decode_row_ms": decode_ms[name],
            "decode_row_max_ms": decode_max_ms[name],
            "prompt_ms": prompt_ms[name],
        }
        for name in variants
    ]
    write_json(args.out, meta, rows)

    def cell(values: list[float], digits: int) -> str:
        return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"

    lines = [
        "# Row gathers from the per-layer embedding table out of the page cache: read-ahead against random reads",
        "",
        f"`{meta['command']}`; table {tuple(table.shape)} {table.dtype} in {path.name} ({path.stat().st_size / 1e9:.2f}"
        f" GB); torch {torch.__version__}; load average {tuple(round(x, 2) for x in load_before)} before, "
        f"{tuple(round(x, 2) for x in meta['load_average_after'])} after. Each round drops the file from the page "
        f"cache first; medians over {args.rounds} rounds (range). A decode row is one token's row, each never read "
        "before in the run.",
        "",
        f"| advice | decode: ms per row (median of {args.decode_rows}) | decode: slowest row, ms | prompt of "
        f"{args.prompt_rows} rows, ms |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {name} | {cell(decode_ms[name], 3)} | {cell(decode_max_ms[name], 2)} | {cell(prompt_ms[name], 1)} |"
        for name in variants
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
