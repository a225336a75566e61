"""Vision and audio towers (each with its embedder): gemma3n vs transformers on the same random weights, E2B shape.

    python benchmarks/bench_encoders.py                       # vision + audio, bf16 + fp32, batch 1 and 4
    python benchmarks/bench_encoders.py --parts vision --dtypes bfloat16 --batch-sizes 1 --rounds 2
    python benchmarks/bench_encoders.py --device cuda --no-compiled --out benchmarks/results/encoders_gpu

Each (tower, dtype) runs in its own child process (the two fp32 audio towers hold ~6 GB) while holding
/tmp/gemma3n-heavy.lock, so the machine's other heavy jobs do not overlap it. Inside a child, transformers' module,
ours, and ours through ``enable_compile()`` (torch.compile with inductor freezing; ``--no-compiled`` leaves it out), all
sharing one set of weights, alternate call by call over ``--rounds`` rounds after one warm-up call each (its time is
reported: for the compiled variant it is the one-time compilation); the figures are medians with their ranges, per
image (768x768) or per 30 s clip (3000 log-mel frames).

All implementations of a child share its allocator setting, so the child runs with gemma3n's default, torch's
transparent huge pages for large buffers (``THP_MEM_ALLOC_ENABLE=1``, see gemma3n/huge_pages.py), unless the
environment sets the variable. transformers' own default is without them, and huge pages speed up its towers too, so
the comparison is conservative for gemma3n. The table records the setting.

The same child measures what the hardware allows: a large matmul in the tower's dtype (GFLOP/s) and a 1 GiB copy
(GB/s); each tower figure is given as achieved GFLOP/s (its FLOPs counted by torch's FlopCounterMode on the meta
device) and as a fraction of that matmul rate. Writes JSON and a markdown table (``--out``, default
benchmarks/results/encoders_cpu.{json,md}).
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

import torch
from child_env import child_env, thp_setting

LOCK = "/tmp/gemma3n-heavy.lock"
IMAGE_SIZE = 768
CLIP_FRAMES = 3000  # 30 s at the processor's 10 ms hop
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


# ---- model construction (child process) -----------------------------------------------------------------------------


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (constant inits such as norm weights = 1 or layer scales = 1e-5 replaced)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.rand(p.shape, generator=generator)
            if p.numel() > 1 and p.min() != p.max():
                continue
            if name.endswith("gamma"):
                p.copy_(0.05 + 0.25 * noise)
            else:
                p.copy_(0.5 + noise)


def build_pair(part: str, dtype: torch.dtype, compiled: bool, device: str = "cpu"):
    """({name: callable} for transformers, gemma3n and (``compiled``) gemma3n-compiled, input factory(batch), flops per
    item), all on one set of shared random weights on ``device``. On CUDA the vision tower also runs with its weights
    and activations channels-last (``VisionTower.to_channels_last``)."""
    import transformers
    from transformers.models.gemma3n import modeling_gemma3n as hf

    from gemma3n.config import Gemma3nConfig
    from gemma3n.encoders.audio import AudioEncoder
    from gemma3n.encoders.embedder import MultimodalEmbedder
    from gemma3n.encoders.vision import VisionTower
    from gemma3n.presets import preset_config_dict

    published = preset_config_dict("e2b")
    ref_config = transformers.Gemma3nConfig(**{k: v for k, v in published.items() if k != "model_type"})
    ours_config = Gemma3nConfig.from_dict(published)
    torch.manual_seed(0)
    if part == "vision":
        tower = transformers.AutoModel.from_config(ref_config.vision_config).eval()
        section, ours_section = ref_config.vision_config, ours_config.vision
    else:
        tower = hf.Gemma3nAudioEncoder(ref_config.audio_config).eval()
        section, ours_section = ref_config.audio_config, ours_config.audio
    embed = hf.Gemma3nMultimodalEmbedder(section, ref_config.text_config).eval()
    _randomise(tower, 1)
    _randomise(embed, 2)
    tower, embed = tower.to(device, dtype).requires_grad_(False), embed.to(device, dtype).requires_grad_(False)

    def our_modules():
        with torch.device("meta"):
            if part == "vision":
                our_tower = VisionTower(ours_section, ours_config.vision_soft_tokens_per_image)
            else:
                our_tower = AudioEncoder(ours_section)
            our_embed = MultimodalEmbedder.from_config(ours_section, ours_config.text)
        # our towers use the checkpoint's own names: the reference state dicts load as they are (same tensors)
        our_tower.load_state_dict(dict(tower.state_dict()), strict=True, assign=True)
        our_embed.load_state_dict(dict(embed.state_dict()), strict=True, assign=True)
        return our_tower.eval(), our_embed.eval()

    our_tower, our_embed = our_modules()
    variants = {}
    if compiled:
        compiled_tower, compiled_embed = our_modules()
        variants["gemma3n-compiled"] = (compiled_tower.enable_compile(), compiled_embed)
    if part == "vision" and device != "cpu":
        nhwc_tower, nhwc_embed = our_modules()
        variants["gemma3n-channels-last"] = (nhwc_tower.to_channels_last(), nhwc_embed)

    if part == "vision":
        hidden, tokens = section.hidden_size, ref_config.vision_soft_tokens_per_image

        def reference(pixels):
            # transformers' Gemma3nModel.get_image_features, step by step
            fmap = tower(pixel_values=pixels, do_pooling=False, return_dict=True).last_hidden_state
            soft = fmap.reshape(fmap.shape[0], hidden, tokens).permute(0, 2, 1) * hidden**0.5
            return embed(inputs_embeds=soft)

        def ours(pixels, our_tower, our_embed):
            return our_embed.embed_soft(our_tower(pixels))

        def inputs(batch):
            pixels = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
            return (pixels.to(device, dtype),)

        flops = _count_flops(
            lambda: transformers.AutoModel.from_config(ref_config.vision_config),
            lambda m: m(pixel_values=torch.empty(1, 3, IMAGE_SIZE, IMAGE_SIZE), do_pooling=False),
        )
    else:

        def reference(features, valid):
            out = tower(features, ~valid, return_dict=True)  # transformers' mask: True = padded frame
            return embed(inputs_embeds=out.last_hidden_state)

        def ours(features, valid, our_tower, our_embed):
            encodings, _ = our_tower(features, valid)
            return our_embed.embed_soft(encodings)

        def inputs(batch):
            generator = torch.Generator().manual_seed(3)
            features = torch.randn(batch, CLIP_FRAMES, section.input_feat_size, generator=generator)
            return features.to(device, dtype), torch.ones(batch, CLIP_FRAMES, dtype=torch.bool, device=device)

        flops = _count_flops(
            lambda: hf.Gemma3nAudioEncoder(ref_config.audio_config),
            lambda m: m(
                torch.empty(1, CLIP_FRAMES, section.input_feat_size), torch.zeros(1, CLIP_FRAMES, dtype=torch.bool)
            ),
        )
    impls = {"transformers": reference}
    for name, (variant_tower, variant_embed) in {"gemma3n": (our_tower, our_embed), **variants}.items():
        impls[name] = functools.partial(ours, our_tower=variant_tower, our_embed=variant_embed)
    return impls, inputs, flops


def _count_flops(build, run) -> float:
    """FLOPs of one item through the reference tower, counted on the meta device (no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with torch.device("meta"):
            model = build()
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                run(model)
    except (RuntimeError, NotImplementedError) as err:  # a data-dependent step that meta tensors cannot run
        print(f"FLOP count failed: {err}", file=sys.stderr)
        return float("nan")
    return float(counter.get_total_flops())


MATMUL_SIZES = (1024, 2048, 4096)


def hardware_limits(dtype: torch.dtype, device: str = "cpu") -> dict:
    """Matmul GFLOP/s in ``dtype`` (square n x n, best of 3 per n; the peak is the best n) and copy bandwidth (1 GiB).

    oneDNN picks different kernels per size (with AMX, bf16 at n = 4096 runs ~3x faster than at n = 2048 on this
    machine type), so one size can understate what the hardware does.
    """
    per_size = {}
    for n in MATMUL_SIZES if device == "cpu" else (4096, 8192):
        a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
        a @ b
        best = min(_timed(lambda a=a, b=b: a @ b, device) for _ in range(3))
        per_size[n] = 2 * n**3 / best / 1e9
    src = torch.empty(2**30, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    copy = min(_timed(lambda: dst.copy_(src), device) for _ in range(3))
    peak_n = max(per_size, key=per_size.get)
    return {
        "matmul_gflops": per_size[peak_n],
        "matmul_peak_n": peak_n,
        "matmul_gflops_per_n": per_size,
        "copy_gbs": 2 * src.numel() / copy / 1e9,
    }


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _timed(fn, device: str = "cpu") -> float:
    """Seconds of one ``fn()`` call (on CUDA, from an idle device to the end of its work)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run_child(
    part: str, dtype_name: str, batch_sizes: list[int], rounds: int, compiled: bool, device: str = "cpu"
) -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if device != "cpu":  # fp32 means fp32: no TF32 in cuDNN's convolutions (its default) or cuBLAS
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dtype = DTYPES[dtype_name]
    impls, inputs, flops = build_pair(part, dtype, compiled, device)
    limits = hardware_limits(dtype, device)
    rows = []
    with torch.no_grad():
        for batch in batch_sizes:
            args = inputs(batch)
            # warm-up: oneDNN primitives, packed weights; for the compiled variant, the compilation
            first_call_s, outs = {}, {}
            for name, fn in impls.items():
                _sync(device)
                start = time.perf_counter()
                out = fn(*args)
                _sync(device)
                first_call_s[name] = time.perf_counter() - start
                outs[name] = out.double()
            ref_out = outs["transformers"]
            rel = {name: float((out - ref_out).norm() / ref_out.norm()) for name, out in outs.items()}
            del outs
            times = {name: [] for name in impls}
            load = []
            for _ in range(rounds):
                for name, fn in impls.items():
                    times[name].append(_timed(lambda fn=fn: fn(*args), device) / batch)
                load.append(os.getloadavg()[0])
            row = {"part": part, "dtype": dtype_name, "batch": batch, "impls": {}}
            for name, values in times.items():
                median = statistics.median(values)
                row["impls"][name] = {
                    "ms_per_item_median": 1e3 * median,
                    "ms_per_item_min": 1e3 * min(values),
                    "ms_per_item_max": 1e3 * max(values),
                    "first_call_s": first_call_s[name],
                    "gflops": flops / median / 1e9,
                    "fraction_of_matmul": flops / median / 1e9 / limits["matmul_gflops"],
                    "rel_diff_vs_transformers": rel[name],
                    "speedup_median": statistics.median(times["transformers"]) / median,
                    "speedup_per_round": [r / o for r, o in zip(times["transformers"], values, strict=True)],
                }
            row["load_average_1min"] = load
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    info = {"device": torch.cuda.get_device_name() if device != "cpu" else "cpu"}
    return {
        "rows": rows,
        "limits": limits,
        "gflop_per_item": flops / 1e9,
        "threads": torch.get_num_threads(),
        "thp": thp_setting(),
        **info,
    }


# ---- orchestration ---------------------------------------------------------------------------------------------------


def markdown(results: list[dict]) -> str:
    lines = [
        "| tower | dtype | batch | implementation | ms/item (range) | speedup vs transformers (per round) "
        "| GFLOP/s (of peak matmul) | first call s | rel. diff vs transformers | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for row in res["rows"]:
            for name, r in row["impls"].items():
                per_round = ", ".join(f"{s:.2f}" for s in r["speedup_per_round"])
                lines.append(
                    f"| {row['part']} | {row['dtype']} | {row['batch']} | {name} "
                    f"| {r['ms_per_item_median']:.0f} ({r['ms_per_item_min']:.0f}-{r['ms_per_item_max']:.0f}) "
                    f"| {r['speedup_median']:.2f}x ({per_round}) "
                    f"| {r['gflops']:.0f} ({100 * r['fraction_of_matmul']:.0f}%) | {r['first_call_s']:.1f} "
                    f"| {r['rel_diff_vs_transformers']:.1e} | {statistics.median(row['load_average_1min']):.1f} |"
                )
            t = row["impls"]["transformers"]
            lines.append(
                f"| {row['part']} | {row['dtype']} | {row['batch']} | *3x transformers would need* "
                f"| {t['ms_per_item_median'] / 3:.0f} | 3.00x "
                f"| {3 * t['gflops']:.0f} ({300 * t['fraction_of_matmul']:.0f}%) | | | |"
            )
    lines.append("")
    for res in results:
        lim = res["limits"]
        sizes = ", ".join(f"{n}: {g:.0f}" for n, g in lim["matmul_gflops_per_n"].items())
        lines.append(
            f"- {res['part']} {res['dtype']}: {res['gflop_per_item']:.0f} GFLOP per item; same process: "
            f"{lim['matmul_gflops']:.0f} GFLOP/s peak matmul (best of n = {sizes}), "
            f"{lim['copy_gbs']:.1f} GB/s copy, "
            f"{res['threads']} threads, device {res.get('device', 'cpu')}, "
            f"THP_MEM_ALLOC_ENABLE {res.get('thp', 'unset')} (all implementations)"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["vision", "audio"], choices=["vision", "audio"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compiled", action="store_true", help="leave out the torch.compile variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs: set --out, e.g. encoders_gpu)")
    parser.add_argument("--out", default="benchmarks/results/encoders_cpu")
    parser.add_argument("--child", nargs=2, metavar=("PART", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_child(
            args.child[0], args.child[1], args.batch_sizes, args.rounds, not args.no_compiled, args.device
        )
        print(json.dumps(result))
        return

    results = []
    for dtype in args.dtypes:  # bf16 first (the faster runs): a run cut short still has both towers
        for part in args.parts:
            command = [sys.executable, __file__, "--child", part, dtype, "--rounds", str(args.rounds)]
            command += ["--batch-sizes", *map(str, args.batch_sizes)] + (["--no-compiled"] if args.no_compiled else [])
            command += ["--device", args.device]
            print(f"{part} {dtype}: waiting for {LOCK} ...", file=sys.stderr, flush=True)
            with open(LOCK, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, env=child_env("gemma3n"))
            res = json.loads(done.stdout.strip().splitlines()[-1])
            res.update(part=part, dtype=dtype)
            results.append(res)
            print(markdown([res]), file=sys.stderr, flush=True)
            write_results(Path(args.out), results)  # after every child: a partial run still leaves its figures
    print(markdown(results))


def write_results(out: Path, results: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    info = {"command": command, "torch": torch.__version__, "cpus": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"info": info, "results": results}, indent=2))
    out.with_suffix(".md").write_text(f"`{command}` (torch {torch.__version__})\n\n" + markdown(results))


if __name__ == "__main__":
    main()
