"""Captioning throughput: gemma3n's "image-text-to-text" pipeline vs transformers' own, images per minute.

    python benchmarks/bench_captioning.py --model /work/cache/e2b --images 16 --batch-sizes 1 4 --rounds 2
    python benchmarks/bench_captioning.py --model tiny-random --images 4 --batch-sizes 2 --rounds 1   # smoke run

The same ``--images`` pictures of mixed sizes (random pixels, fixed seed: 640x480, 480x640, 1024x768, 300x300, ...)
are captioned with the same one-turn chat prompt, greedy, exactly ``--new-tokens`` tokens (no early stop), by both
implementations on the same checkpoint. Each (implementation, batch size, round) runs in its own child process (an
E2B model each, ~11 GB in bf16) while holding /tmp/gemma3n-heavy.lock; rounds alternate the two implementations. A
child loads the model, captions one warm-up image, then times the whole set (preprocessing included). Writes JSON and
a markdown table (``--out``, default benchmarks/results/captioning_cpu.{json,md}).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

LOCK = "/tmp/gemma3n-heavy.lock"
SIZES = [(640, 480), (480, 640), (1024, 768), (300, 300), (800, 600), (768, 768), (1280, 720), (512, 384)]
PROMPT = "Write a one-sentence caption for this image."


def make_images(count: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in (SIZES * count)[:count]]


def messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]


def run_child(impl: str, model: str, count: int, batch: int, new_tokens: int, dtype: str) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    images = make_images(count)
    gen = {"max_new_tokens": new_tokens, "do_sample": False}
    # exactly new_tokens each: no stop token (gemma3n) or a minimum length (transformers)
    gen.update({"eos_token_ids": []} if impl == "gemma3n" else {"min_new_tokens": new_tokens})
    start = time.perf_counter()
    if impl == "gemma3n":
        import gemma3n

        pipe = gemma3n.pipeline("image-text-to-text", model=model, device="cpu", dtype=dtype, batch_size=batch)

        def caption(items):
            return pipe(text=[messages(im) for im in items], generate_kwargs=gen)
    else:
        import transformers

        pipe = transformers.pipeline("image-text-to-text", model=model, device="cpu", dtype=getattr(torch, dtype))
        # batched generation needs left padding; the pipeline refuses batches while its parts disagree on the side
        for part in (pipe.tokenizer, getattr(pipe, "feature_extractor", None), getattr(pipe, "processor", None)):
            if part is not None and hasattr(part, "padding_side"):
                part.padding_side = "left"

        def caption(items):
            return pipe(text=[messages(im) for im in items], batch_size=batch, generate_kwargs=gen)

    load_s = time.perf_counter() - start
    caption(images[:1])  # warm-up
    start = time.perf_counter()
    out = caption(images)
    seconds = time.perf_counter() - start
    return {
        "impl": impl,
        "batch": batch,
        "load_s": load_s,
        "seconds": seconds,
        "images_per_minute": 60 * count / seconds,
        "load_average_1min": os.getloadavg()[0],
        "first_caption": str(out[0])[:200],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/cache/e2b")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/captioning_cpu")
    parser.add_argument("--lock", default=LOCK, help="lock file held by each child run (light smoke runs: any file)")
    parser.add_argument("--child", choices=["gemma3n", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        res = run_child(args.child, args.model, args.images, args.batch_sizes[0], args.new_tokens, args.dtype)
        print(json.dumps(res))
        return

    runs = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(args.rounds):
        for batch in args.batch_sizes:
            for impl in ("transformers", "gemma3n"):
                command = [sys.executable, __file__, "--child", impl, "--model", args.model, "--dtype", args.dtype]
                command += [
                    "--images",
                    str(args.images),
                    "--batch-sizes",
                    str(batch),
                    "--new-tokens",
                    str(args.new_tokens),
                ]
                with open(LOCK, "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=os.environ)
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)

    lines = ["| implementation | batch | images/min (median, range) | load s | load avg |", "|---|---|---|---|---|"]
    best = {}
    for impl in ("transformers", "gemma3n"):
        for batch in args.batch_sizes:
            sel = [r for r in runs if r["impl"] == impl and r["batch"] == batch]
            ipm = [r["images_per_minute"] for r in sel]
            med = statistics.median(ipm)
            best[impl] = max(best.get(impl, 0.0), med)
            lines.append(
                f"| {impl} | {batch} | {med:.2f} ({min(ipm):.2f}-{max(ipm):.2f}) "
                f"| {statistics.median(r['load_s'] for r in sel):.1f} "
                f"| {statistics.median(r['load_average_1min'] for r in sel):.1f} |"
            )
    ratio = best["gemma3n"] / best["transformers"]
    lines.append(f"\nBest batch size each: gemma3n / transformers = {ratio:.2f}x images per minute.")
    command = " ".join([Path(sys.executable).name, *sys.argv])
    table = f"`{command}`, {args.images} images, {args.new_tokens} new tokens, {args.dtype}\n\n" + "\n".join(lines)
    out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs, "ratio": ratio}, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
