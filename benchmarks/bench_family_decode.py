"""Gemma 2 (and Gemma) CPU decode: gemma3n vs transformers on the same random weights, in one process, interleaved.

    flock /tmp/gemma3n-heavy.lock python benchmarks/bench_family_decode.py            # small preset, fp32
    python benchmarks/bench_family_decode.py --family gemma --rounds 5 --batch-sizes 1 4

The small CPU preset keeps the published vocabulary (256,000) and Gemma 2's structure (alternating sliding / full
layers, soft-caps, grouped heads) at a width a 2-core CPU decodes in milliseconds: hidden 256, 8 layers, MLP 1024,
4 query heads over 2 key/value heads of 64, window 128 (the prompt of 128 plus the new tokens crosses it).

transformers builds the model (fp32) and writes it with ``save_pretrained``; gemma3n loads that checkpoint. Each
round runs every implementation once per batch size, in a rotated order: gemma3n eager, gemma3n compiled
(``generate(compile=True)``, compiled in a warm-up before the rounds), transformers with its default attention
(SDPA, which ignores Gemma 2's attention soft-cap) and transformers eager (the exact model). Decode speed is taken
from streamer timestamps: new tokens after the first / time from the first to the last, so prefill is excluded.
Both sides decode greedily with no end id, the same number of tokens. The copy bandwidth is measured in the same run
and each figure is also given as achieved weight bandwidth (bytes of weights read per step x steps/s).
Writes JSON and a markdown table into benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

import gemma3n

HERE = Path(__file__).resolve().parent

PRESETS = {
    "small": dict(
        vocab_size=256_000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=8192,
        sliding_window=128,
        query_pre_attn_scalar=64,
    ),
}


class StepClock:
    """A streamer (``put`` / ``end``) that records when each step's tokens arrive."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, tokens):
        if not self.prompt_seen:  # the first put is the prompt
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def tokens_per_second(self, batch: int) -> float:
        steps = len(self.times) - 1
        return batch * steps / (self.times[-1] - self.times[0])


def copy_bandwidth_gbs(size_bytes: int = 1 << 30, repeat: int = 5) -> float:
    """Read + write bytes per second of a large tensor copy (best of ``repeat``)."""
    src = torch.empty(size_bytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * size_bytes / best / 1e9


def build(family: str, preset: str, folder: Path) -> transformers.PreTrainedModel:
    config = dict(PRESETS[preset], pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gemma":
        for key in ("sliding_window", "query_pre_attn_scalar"):
            config.pop(key)
        cfg, cls = transformers.GemmaConfig(**config), transformers.GemmaForCausalLM
    else:
        cfg, cls = transformers.Gemma2Config(**config), transformers.Gemma2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(folder)
    return model


def weight_bytes_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter (the tied table once: the LM head reads all of it)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--family", choices=["gemma", "gemma2"], default="gemma2")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default=None, help="results file stem (default family_decode_<family>_cpu)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    name = args.name or f"family_decode_{args.family}_cpu"

    with tempfile.TemporaryDirectory() as tmp:
        reference = build(args.family, args.preset, Path(tmp))
        reference_eager = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="eager").eval()
        reference_default = transformers.AutoModelForCausalLM.from_pretrained(tmp).eval()
        ours = gemma3n.load(tmp, dtype="float32")
    del reference
    bytes_per_step = weight_bytes_per_step(ours)
    g = torch.Generator().manual_seed(0)

    def prompt(batch: int) -> torch.Tensor:
        return torch.randint(3, PRESETS[args.preset]["vocab_size"], (batch, args.prompt_tokens), generator=g)

    def run_ours(ids: torch.Tensor, compile: bool) -> float:
        clock = StepClock()
        ours.generate(ids, max_new_tokens=args.new_tokens, eos_token_id=[], streamer=clock, compile=compile)
        return clock.tokens_per_second(ids.shape[0])

    def run_reference(model, ids: torch.Tensor) -> float:
        clock = StepClock()
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        return clock.tokens_per_second(ids.shape[0])

    impls = {
        "gemma3n eager": lambda ids: run_ours(ids, False),
        "gemma3n compiled": lambda ids: run_ours(ids, True),
        "transformers (default attention)": lambda ids: run_reference(reference_default, ids),
        "transformers (eager attention)": lambda ids: run_reference(reference_eager, ids),
    }
    started = time.perf_counter()
    for batch in args.batch_sizes:  # warm-up: compile, first-call kernel setup, allocator
        for run in impls.values():
            run(prompt(batch))
    warmup_s = time.perf_counter() - started
    load_before = os.getloadavg()
    copy_gbs = [copy_bandwidth_gbs()]
    results: dict[str, dict[int, list[float]]] = {k: {b: [] for b in args.batch_sizes} for k in impls}
    names = list(impls)
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for batch in args.batch_sizes:
            ids = prompt(batch)
            for impl in order:
                results[impl][batch].append(impls[impl](ids))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    copy_gbs.append(copy_bandwidth_gbs())
    load_after = os.getloadavg()

    bw = statistics.median(copy_gbs)
    rows = []
    for batch in args.batch_sizes:
        base = statistics.median(results["transformers (default attention)"][batch])
        for impl in names:
            runs = results[impl][batch]
            med = statistics.median(runs)
            steps_per_s = med / batch
            rows.append(
                dict(
                    implementation=impl,
                    batch=batch,
                    tok_s_median=med,
                    tok_s_min=min(runs),
                    tok_s_max=max(runs),
                    vs_transformers_default=med / base,
                    weight_gbs=bytes_per_step * steps_per_s / 1e9,
                    of_copy_bandwidth=bytes_per_step * steps_per_s / 1e9 / bw,
                )
            )
    out = dict(
        command=f"python benchmarks/bench_family_decode.py --family {args.family} --rounds {args.rounds}",
        args=vars(args),
        machine=dict(platform=platform.platform(), cpu=platform.processor(), threads=args.threads),
        torch=torch.__version__,
        transformers=transformers.__version__,
        weight_bytes_per_step=bytes_per_step,
        copy_bandwidth_gbs=copy_gbs,
        load_average_before=load_before,
        load_average_after=load_after,
        warmup_s=warmup_s,
        rows=rows,
        raw={impl: {str(b): v for b, v in d.items()} for impl, d in results.items()},
    )
    results_dir = HERE / "results"
    (results_dir / f"{name}.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"# {args.family} decode on CPU, preset {args.preset}, fp32: gemma3n vs transformers",
        "",
        f"`python benchmarks/bench_family_decode.py --family {args.family} --rounds {args.rounds}` — "
        f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens (greedy, no end id), {args.rounds} "
        f"interleaved rounds; weights read per step {bytes_per_step / 1e6:.0f} MB; copy bandwidth "
        f"{bw:.1f} GB/s (read + write, same run); load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
        f"after (1 min). Warm-up (incl. compiling) {warmup_s:.0f} s.",
        "",
        "| implementation | batch | decode tok/s, median (range) | vs transformers default | weight GB/s "
        "| of copy bw |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['implementation']} | {row['batch']} | {row['tok_s_median']:.1f} "
            f"({row['tok_s_min']:.1f}-{row['tok_s_max']:.1f}) | {row['vs_transformers_default']:.2f}x | "
            f"{row['weight_gbs']:.1f} | {row['of_copy_bandwidth']:.0%} |"
        )
    (results_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
