"""gemma3n vs transformers on the same random weights, in one process: decode, prefill, memory.

    # CPU, small shape (the check that our decode is >= 2x transformers'; --compile adds compiled decode steps):
    python benchmarks/bench_generation.py --preset small --device cpu --batch-sizes 1 4 --new-tokens 32 \
        --prefill-lengths 128 512 --repeat 5 --compile --out benchmarks/results/cpu_small.json
    # GPU, published E2B shape, bf16, with the int8 / int4 weight-only decoders beside it:
    python benchmarks/bench_generation.py --preset e2b --device cuda --dtype bfloat16 --quantize int8 int4 \
        --out bench_out/gpu_e2b.json

Both models share one set of random weights (transformers builds them; gemma3n attaches the same tensors through its
loader's name mapping); ``--quantize`` adds gemma3n models whose decoder and LM head are quantized from those weights.
Writes JSON and a markdown table; each batch-1 decode figure is also given as achieved weight bandwidth (bytes of
weights read per token x tokens/s) and as a fraction of a copy's bandwidth measured in the same run (or
--bandwidth-gbs).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch

from gemma3n.checkpoint import attach_weights
from gemma3n.config import Gemma3nConfig
from gemma3n.model import Gemma3n, _published_to_module_names
from gemma3n.presets import preset_config_dict
from gemma3n.quantize import QUANTIZE_MODES, quantize_checkpoint


def small_text_config() -> dict:
    """A CPU-sized decoder keeping every Gemma 3n feature (and the published vocabulary size)."""
    n = 8
    return {
        "model_type": "gemma3n_text",
        "vocab_size": 262_400,
        "vocab_size_per_layer_input": 262_144,
        "hidden_size": 256,
        "hidden_size_per_layer_input": 32,
        "intermediate_size": [1024] * n,
        "num_hidden_layers": n,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "sliding_window": 32,
        "layer_types": ["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)],
        "num_kv_shared_layers": 4,
        "activation_sparsity_pattern": [0.95] * 2 + [0.0] * (n - 2),
        "laurel_rank": 16,
        "altup_num_inputs": 4,
        "final_logit_softcapping": 30.0,
    }


def build_models(preset: str, device: str, dtype: torch.dtype, quantize: tuple[str, ...] = ()):
    """(transformers Gemma3nForCausalLM, our Gemma3n, {mode: our quantized Gemma3n}) on the same random text weights."""
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    text = small_text_config() if preset == "small" else preset_config_dict(preset)["text_config"]
    ref_config = Gemma3nTextConfig(**{k: v for k, v in text.items() if k != "model_type"})
    torch.manual_seed(0)
    with torch.device(device):
        ref = Gemma3nForCausalLM(ref_config).to(dtype).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # reference init leaves some weights 0; make all random
            if "norm" in name:
                p.normal_(1.0, 0.05)
            else:
                p.normal_(0.0, 0.02)
    config = Gemma3nConfig.from_dict(text)
    tensors = {k: v for k, v in ref.state_dict().items()}

    def ours_from_reference(mode: str | None) -> Gemma3n:
        with torch.device("meta"):
            model = Gemma3n(config)
        renamed, ignore = _published_to_module_names(tensors, model, text_only_layout=True)
        if mode is not None:
            renamed = quantize_checkpoint(model, renamed, mode, dtype=dtype, device=device)
        attach_weights(model, renamed, dtype=dtype, device=device, ignore=ignore, source="reference")
        return model.eval().requires_grad_(False)

    quantized = {}
    for mode in quantize:
        start = time.perf_counter()
        quantized[mode] = ours_from_reference(mode)
        print(f"quantized to {mode} in {time.perf_counter() - start:.1f} s", flush=True)
    return ref, ours_from_reference(None), quantized


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def base_impl(impl: str) -> str:
    """The model an implementation's name runs ("gemma3n int4 compiled" -> "gemma3n int4")."""
    return impl.removesuffix(" compiled").removesuffix(" eager")


def copy_bandwidth_gbs(device: str, size: int = 1 << 31) -> float:
    """Best of 5 copies of a ``size``-byte buffer (2 GiB: far beyond the caches), bytes read + written per second."""
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = min(timed(functools.partial(dst.copy_, src), device, 1) for _ in range(5))
    return 2 * size / best / 1e9


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weight_bytes_per_token(model: Gemma3n) -> int:
    """Bytes of weights a batch-1 decode step reads: all text weights (and quantized buffers) except the per-layer
    table (a row gather); the token table counts once, as the tied LM head, or not at all beside a quantized head."""
    lm = model.language_model
    tensors = list(lm.parameters()) + list(lm.buffers())
    total = sum(t.numel() * t.element_size() for t in tensors)
    tables = [lm.embed_tokens_per_layer.weight] + ([lm.embed_tokens.weight] if lm.lm_head is not None else [])
    return total - sum(t.numel() * t.element_size() for t in tables)


class TokenTimer:
    """A streamer (``put`` / ``end``, the protocol of both libraries) that records when each step's tokens arrive.

    The first ``put`` is the prompt; the interval between later puts is one decode step. The median interval is a
    direct decode timing, free of the noise of subtracting a prefill-only run from a full run.
    """

    def __init__(self, device: str):
        self.device = device
        self.times: list[float] = []

    def put(self, _tokens) -> None:
        sync(self.device)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def step_seconds(self) -> list[float]:
        stamps = self.times[1:]  # drop the prompt's put
        return [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]


def median_steps(runners: dict, device: str, repeat: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median decode-step seconds of each runner over ``repeat`` generate runs, after one warm-up run each (and the
    mean, as "NAME mean"), and the seconds of each warm-up run (for a compiled runner: the compilation).

    The runs are interleaved (one of each per round), so that a change in machine speed over time (a shared CPU)
    hits every implementation alike and the ratios stay fair.
    """
    warm_up = {}
    for name, run_with_streamer in runners.items():
        sync(device)
        start = time.perf_counter()
        run_with_streamer(TokenTimer(device))
        sync(device)
        warm_up[name] = time.perf_counter() - start
    steps: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeat):
        for name, run_with_streamer in runners.items():
            timer = TokenTimer(device)
            run_with_streamer(timer)
            steps[name] += timer.step_seconds()
    means = {f"{name} mean": statistics.fmean(values) for name, values in steps.items()}  # first steps included
    return {name: statistics.median(values) for name, values in steps.items()} | means, warm_up


def run(args) -> dict:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    ref, ours, quantized = build_models(args.preset, args.device, dtype, tuple(args.quantize))
    vocab = ours.config.text.vocab_size_per_layer_input
    gen = torch.Generator().manual_seed(0)
    results: dict = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "rows": [],
    }
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    models = {"gemma3n": ours, **{f"gemma3n {mode}": model for mode, model in quantized.items()}}
    bytes_per_token = {name: weight_bytes_per_token(model) for name, model in models.items()}
    bytes_per_token["transformers"] = bytes_per_token["gemma3n"]
    results["weight_bytes_per_token"] = bytes_per_token

    if args.bandwidth_gbs <= 0:
        args.bandwidth_gbs = copy_bandwidth_gbs(args.device)
    results["bandwidth_GBps"] = args.bandwidth_gbs
    partial = Path(args.out).with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)

    def add(name, impl, value, unit, **extra):
        row = {"benchmark": name, "impl": impl, "value": value, "unit": unit, **extra}
        results["rows"].append(row)
        print(f"{name:<28} {impl:<22} {value:10.2f} {unit}", flush=True)
        partial.write_text(json.dumps(results, indent=2))  # a run cut short keeps its rows

    new = args.new_tokens
    for batch in args.batch_sizes:
        ids = torch.randint(3, vocab, (batch, args.prompt_tokens), generator=gen).to(args.device)
        settings = dict(max_new_tokens=new, do_sample=False)

        def ours_generate(streamer, compile_steps=False, model=ours, cuda_graphs=None):
            return model.generate(
                ids, eos_token_id=[-1], streamer=streamer, compile=compile_steps, cuda_graphs=cuda_graphs, **settings
            )

        def ref_generate(streamer):
            with torch.no_grad():
                return ref.generate(
                    input_ids=ids, min_new_tokens=new, eos_token_id=None, pad_token_id=0, streamer=streamer, **settings
                )

        impls = [("transformers", ref_generate)]
        for name, model in models.items():
            impls.append((name, functools.partial(ours_generate, model=model)))
            if args.compile:
                impls.append((f"{name} compiled", functools.partial(ours_generate, model=model, compile_steps=True)))
            if args.device.startswith("cuda"):  # the default there replays CUDA graphs: eager steps beside them
                impls.append((f"{name} eager", functools.partial(ours_generate, model=model, cuda_graphs=False)))
        step_seconds, warm_up = median_steps(dict(impls), args.device, args.repeat)
        for impl, _ in impls:
            tok_s = batch / step_seconds[impl]
            # the mean over all steps includes each call's one-time work (a CUDA graph's capture) that the median skips
            extra = {"first_run_s": warm_up[impl], "tok_s_over_all_steps": batch / step_seconds[f"{impl} mean"]}
            if batch == 1:
                gbs = bytes_per_token[base_impl(impl)] * tok_s / 1e9
                extra.update(weight_GBps=gbs, fraction_of_bound=gbs / args.bandwidth_gbs)
            add(f"decode b{batch}", impl, tok_s, "tok/s", **extra)

    for length in args.prefill_lengths:
        ids = torch.randint(3, vocab, (1, length), generator=gen).to(args.device)
        from gemma3n.text_model import KVCache

        def ours_run(model=ours):
            cache = KVCache(model.config.text, 1, length + 1, dtype=dtype, device=args.device)
            with torch.inference_mode():
                return model(ids, cache=cache, logits_to_keep=1)

        def ref_run():
            with torch.no_grad():
                return ref(input_ids=ids, use_cache=True, logits_to_keep=1)

        runs = [("gemma3n", ours_run), ("transformers", ref_run)]
        runs += [(name, functools.partial(ours_run, model=m)) for name, m in models.items() if name != "gemma3n"]
        for impl, fn in runs:
            add(f"prefill {length}", impl, 1e3 * timed(fn, args.device, args.repeat), "ms")

    if args.device.startswith("cuda"):
        results["peak_memory_GB"] = torch.cuda.max_memory_allocated() / 1e9
    ratios = {}
    reference = {r["benchmark"]: r for r in results["rows"] if r["impl"] == "transformers"}
    for row in results["rows"]:
        if row["impl"] != "transformers":
            other = reference[row["benchmark"]]
            higher_better = row["unit"] == "tok/s"
            key = row["benchmark"] + {"gemma3n": ""}.get(row["impl"], f" ({row['impl'].removeprefix('gemma3n ')})")
            ratios[key] = row["value"] / other["value"] if higher_better else other["value"] / row["value"]
    results["speedup_vs_transformers"] = ratios
    return results


def markdown(results: dict) -> str:
    lines = [
        f"preset {results['preset']}, {results['device']}, {results['dtype']}, torch {results['torch']}",
        "",
        "| benchmark | gemma3n | transformers | speed-up |",
        "|---|---|---|---|",
    ]
    for name, ratio in results["speedup_vs_transformers"].items():
        benchmark, _, variant = name.partition(" (")
        rows = {r["impl"]: r for r in results["rows"] if r["benchmark"] == benchmark}
        ours = rows[f"gemma3n {variant[:-1]}" if variant else "gemma3n"]
        unit = ours["unit"]
        lines.append(
            f"| {name} | {ours['value']:.2f} {unit} | {rows['transformers']['value']:.2f} {unit} | {ratio:.2f}x |"
        )
    bound = results["bandwidth_GBps"]
    lines += ["", f"Batch-1 decode, weight bytes read per second against a copy's {bound:.0f} GB/s:"]
    for row in results["rows"]:
        if "weight_GBps" in row:
            lines.append(
                f"- {row['impl']}: {row['weight_GBps']:.0f} GB/s ({100 * row['fraction_of_bound']:.0f}%), "
                f"{results['weight_bytes_per_token'][base_impl(row['impl'])] / 1e9:.2f} GB per token"
            )
    if "peak_memory_GB" in results:
        lines.append(f"- peak GPU memory of the whole run: {results['peak_memory_GB']:.1f} GB")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["small", "e2b", "e4b"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-lengths", type=int, nargs="*", default=[128, 1024, 4096])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time gemma3n's compiled decode steps (each model)")
    parser.add_argument("--quantize", nargs="*", default=[], choices=QUANTIZE_MODES, help="also time these gemma3n")
    parser.add_argument(
        "--bandwidth-gbs", type=float, default=0.0, help="memory bandwidth bound, GB/s (default: a copy, measured)"
    )
    parser.add_argument("--out", default="bench_out/generation.json")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    results = run(args)
    table = markdown(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table + "\n")
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print("\n" + table)


if __name__ == "__main__":
    main()
