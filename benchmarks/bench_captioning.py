"""Captioning throughput: gemma3n's "image-text-to-text" pipeline (eager and ``compile=True``) vs transformers' own,
images per minute.

    python benchmarks/bench_captioning.py --model /work/cache/e2b --images 16 --batch-sizes 1 4 --rounds 2
    python benchmarks/bench_captioning.py --model tiny-random --images 4 --batch-sizes 2 --rounds 1 \
        --lock /tmp/smoke.lock --out /tmp/captioning_smoke                                        # smoke run

The same ``--images`` pictures of mixed sizes (random pixels, fixed seed: 640x480, 480x640, 1024x768, 300x300, ...)
are captioned with the same one-turn chat prompt, greedy, exactly ``--new-tokens`` tokens (no early stop), by each
implementation on the same checkpoint: transformers' ``pipeline("image-text-to-text")``, gemma3n's eager pipeline and
gemma3n's with ``compile=True`` (compiled decode steps and vision tower). Each (implementation, batch size, round) runs
in its own child process (an E2B model each, ~11 GB in bf16) while holding the ``--lock`` file; within a round the
implementations alternate. A child loads the model, captions one warm-up batch (``batch`` images: every shape the
timed run uses is compiled there; its time is reported as ``warmup_s``), then times the whole set, preprocessing
included. Forward hooks on the vision tower and wrappers around the pipelines' preprocessing split the timed run into
tower, preprocessing and the rest (prefill and decoding of the language model). Writes JSON and a markdown table
(``--out``, default benchmarks/results/captioning_cpu.{json,md}).
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from child_env import child_env, thp_setting

LOCK = "/tmp/gemma3n-heavy.lock"
SIZES = [(640, 480), (480, 640), (1024, 768), (300, 300), (800, 600), (768, 768), (1280, 720), (512, 384)]
PROMPT = "Write a one-sentence caption for this image."
IMPLS = ("transformers", "gemma3n", "gemma3n-compile")


def make_images(count: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in (SIZES * count)[:count]]


def messages(image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}]


class Stopwatch:
    """Seconds spent inside wrapped callables and between a module's forward pre-hook and hook."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def wrap(self, owner: Any, attribute: str, name: str) -> None:
        original = getattr(owner, attribute)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

        setattr(owner, attribute, timed)

    def hook(self, module: Any, name: str) -> None:
        def before(*_):
            self._started[name] = time.perf_counter()

        def after(*_):
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - self._started.pop(name)

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def reset(self) -> None:
        self.seconds.clear()


def run_child(impl: str, model: str, count: int, batch: int, new_tokens: int, dtype: str) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    images = make_images(count)
    gen: dict[str, Any] = {"max_new_tokens": new_tokens, "do_sample": False}
    # exactly new_tokens each: no stop token (gemma3n) or a minimum length (transformers)
    gen.update({"eos_token_ids": []} if impl.startswith("gemma3n") else {"min_new_tokens": new_tokens})
    watch = Stopwatch()
    start = time.perf_counter()
    if impl.startswith("gemma3n"):
        import gemma3n

        if impl == "gemma3n-compile":
            gen["compile"] = True
        pipe = gemma3n.pipeline("image-text-to-text", model=model, device="cpu", dtype=dtype, batch_size=batch)
        watch.hook(pipe.model.vision_tower, "tower")
        watch.wrap(pipe, "preprocess", "preprocess")  # chat template
        watch.wrap(pipe, "model_inputs", "preprocess")  # processor: images and tokens

        def caption(items):
            return pipe(text=[messages(im) for im in items], generate_kwargs=gen)
    else:
        import transformers

        pipe = transformers.pipeline("image-text-to-text", model=model, device="cpu", dtype=getattr(torch, dtype))
        # batched generation needs left padding; the pipeline refuses batches while its parts disagree on the side
        for part in (pipe.tokenizer, getattr(pipe, "feature_extractor", None), getattr(pipe, "processor", None)):
            if part is not None and hasattr(part, "padding_side"):
                part.padding_side = "left"
        watch.hook(pipe.model.model.vision_tower, "tower")
        watch.wrap(pipe, "preprocess", "preprocess")  # chat template and processor

        def caption(items):
            return pipe(text=[messages(im) for im in items], batch_size=batch, generate_kwargs=gen)

    load_s = time.perf_counter() - start
    start = time.perf_counter()
    caption(images[:batch])  # warm-up: one full batch (compiles every shape the timed run uses)
    warmup_s = time.perf_counter() - start
    watch.reset()
    start = time.perf_counter()
    out = caption(images)
    seconds = time.perf_counter() - start
    tower_s, preprocess_s = watch.seconds.get("tower", 0.0), watch.seconds.get("preprocess", 0.0)
    return {
        "impl": impl,
        "thp": thp_setting(),
        "batch": batch,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "seconds": seconds,
        "tower_s": tower_s,
        "preprocess_s": preprocess_s,
        "rest_s": seconds - tower_s - preprocess_s,
        "images_per_minute": 60 * count / seconds,
        "load_average_1min": os.getloadavg()[0],
        "first_caption": str(out[0])[:200],
    }


def child_command(args: argparse.Namespace, impl: str, batch: int) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--child",
        impl,
        "--model",
        args.model,
        "--dtype",
        args.dtype,
        "--images",
        str(args.images),
        "--batch-sizes",
        str(batch),
        "--new-tokens",
        str(args.new_tokens),
    ]


def _median_range(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def table(runs: list[dict], args: argparse.Namespace, command: str) -> tuple[str, dict]:
    header = (
        "| implementation | batch | images/min (median, range) | vs transformers | tower s | preprocess s | "
        "LM prefill+decode s | warm-up s | load s | load avg |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    best: dict[str, float] = {}
    medians: dict[tuple[str, int], float] = {}
    for impl in args.impls:
        for batch in args.batch_sizes:
            sel = [r for r in runs if r["impl"] == impl and r["batch"] == batch]
            if not sel:
                continue
            ipm = [r["images_per_minute"] for r in sel]
            medians[impl, batch] = statistics.median(ipm)
            best[impl] = max(best.get(impl, 0.0), medians[impl, batch])
    for impl in args.impls:
        for batch in args.batch_sizes:
            sel = [r for r in runs if r["impl"] == impl and r["batch"] == batch]
            if not sel:
                continue
            base = medians.get(("transformers", batch))
            ratio = f"{medians[impl, batch] / base:.2f}x" if base else "-"

            def med(key: str, rows: list[dict] = sel) -> str:
                return f"{statistics.median(r[key] for r in rows):.1f}"

            lines.append(
                f"| {impl} | {batch} | {_median_range([r['images_per_minute'] for r in sel])} | {ratio} "
                f"| {med('tower_s')} | {med('preprocess_s')} | {med('rest_s')} | {med('warmup_s')} | {med('load_s')} "
                f"| {_median_range([r['load_average_1min'] for r in sel], 1)} |"
            )
    ratios = {}
    if "transformers" in best:
        for impl in args.impls:
            if impl != "transformers" and impl in best:
                ratios[impl] = best[impl] / best["transformers"]
                lines.append(
                    f"\nBest batch size each: {impl} / transformers = {ratios[impl]:.2f}x images per minute "
                    f"({best[impl]:.2f} vs {best['transformers']:.2f})."
                )
    intro = (
        f"`{command}`: {args.images} images of mixed sizes, {args.new_tokens} new tokens each (greedy, no early "
        f"stop), {args.dtype}, {os.environ.get('BENCH_THREADS', '2')} threads, {1 + max(r['round'] for r in runs)} "
        f"of {args.rounds} interleaved rounds done, each run in its own process. Seconds are medians over rounds "
        "for the whole timed set; 'LM prefill+decode' is the rest of the time (language model, sampling, "
        "postprocessing)."
    )
    thp = {r["impl"]: r.get("thp", "?") for r in runs}
    intro += " torch's huge-page setting (THP_MEM_ALLOC_ENABLE) per child: "
    intro += ", ".join(f"{impl} {value}" for impl, value in thp.items())
    intro += " (gemma3n sets it on import; transformers runs with torch's default unless the user set it)."
    return intro + "\n\n" + "\n".join(lines) + "\n", {"best_images_per_minute": best, "ratio_to_transformers": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="/work/cache/e2b", help="checkpoint directory, or tiny-random")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/captioning_cpu")
    parser.add_argument("--lock", default=LOCK, help="lock file held by each child run (light smoke runs: any file)")
    parser.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        res = run_child(args.child, args.model, args.images, args.batch_sizes[0], args.new_tokens, args.dtype)
        print(json.dumps(res))
        return
    if not Path(args.model).is_dir():  # a name such as tiny-random: transformers needs the directory
        from gemma3n.model_names import resolve_model_name

        args.model = str(resolve_model_name(args.model))

    runs = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    for round_index in range(args.rounds):
        for batch in args.batch_sizes:
            impls = args.impls if round_index % 2 == 0 else list(reversed(args.impls))
            for impl in impls:
                with open(args.lock, "w") as lock:
                    fcntl.flock(lock, fcntl.LOCK_EX)
                    command_line, env = child_command(args, impl, batch), child_env(impl)
                    done = subprocess.run(command_line, check=True, stdout=subprocess.PIPE, text=True, env=env)
                runs.append({"round": round_index, **json.loads(done.stdout.strip().splitlines()[-1])})
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
                # after every child: a cut-short run still leaves its numbers
                text, summary = table(runs, args, command)
                out.with_suffix(".json").write_text(json.dumps({"command": command, "runs": runs, **summary}, indent=2))
                out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
