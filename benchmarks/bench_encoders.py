"""Vision and audio towers (each with its embedder): gemma3n vs transformers on the same random weights, E2B shape.

    python benchmarks/bench_encoders.py                       # vision + audio, bf16 + fp32, batch 1 and 4
    python benchmarks/bench_encoders.py --parts vision --dtypes bfloat16 --batch-sizes 1 --rounds 2
    python benchmarks/bench_encoders.py --device cuda --no-compiled --out benchmarks/results/encoders_gpu

Each (tower, dtype) runs in two child processes while holding /tmp/gemma3n-heavy.lock, so the machine's other heavy
jobs do not overlap it: one for transformers' module, one for ours and ours through ``enable_compile()``
(torch.compile with inductor freezing; ``--no-compiled`` leaves it out), each child building the same random weights.
Each implementation gets one warm-up call (its time is reported: for the compiled variant it is the one-time
compilation), then ``--rounds`` rounds in which each child times its implementations once, the children's order
alternating; the figures are medians with their ranges, per image (768x768) or per 30 s clip (3000 log-mel frames).

Two processes because each implementation runs with its own users' allocator default: gemma3n's child with torch's
transparent huge pages for large buffers (``THP_MEM_ALLOC_ENABLE=1``, what ``import gemma3n`` sets), transformers'
with torch's default (unset), unless the environment sets the variable for both (benchmarks/child_env.py). In one
shared process transformers would get gemma3n's setting: its bf16 vision tower took 4312 / 4873 ms per image (batch
1 / 4) with it, against 4828 / 5898 without it in a run an hour later (encoders_cpu_split_bf16). The table records each
child's setting.

Each child measures what the hardware allows: a large matmul in the tower's dtype (GFLOP/s) and a 1 GiB copy
(GB/s); each tower figure is given as achieved GFLOP/s (its FLOPs counted by torch's FlopCounterMode on the meta
device) and as a fraction of the gemma3n child's matmul rate. Writes JSON and a markdown table (``--out``, default
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
from child_env import child_env, restore_thp, thp_setting

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


GROUPS = ("transformers", "gemma3n")  # one child process each: transformers' module; ours (eager, compiled, ...)


def _group(name: str) -> str:
    return "transformers" if name == "transformers" else "gemma3n"


def serve(part: str, dtype_name: str, group: str, compiled: bool, device: str = "cpu") -> None:
    """Child process: build the towers, then answer the parent's commands, one JSON line each on the protocol stream.

    ``warm B``: one untimed call per implementation of ``group`` at batch B (for the compiled variant, the
    compilation), with each output's relative difference to transformers' (the gemma3n child calls the reference
    once for it); ``time B``: one timed call per implementation. Anything else the libraries print goes to stderr.
    """
    thp = thp_setting()  # as the parent set it for this group, before anything imports gemma3n
    import gemma3n  # noqa: F401 - build_pair imports it; it sets THP_MEM_ALLOC_ENABLE when unset

    restore_thp(thp)  # so transformers' child keeps torch's default
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # stray prints (Python or C) must not corrupt the protocol

    def reply(message: dict) -> None:
        protocol.write(json.dumps(message) + "\n")
        protocol.flush()

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if device != "cpu":  # fp32 means fp32: no TF32 in cuDNN's convolutions (its default) or cuBLAS
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    dtype = DTYPES[dtype_name]
    impls, inputs, flops = build_pair(part, dtype, compiled and group == "gemma3n", device)
    names = [name for name in impls if _group(name) == group]
    limits = hardware_limits(dtype, device)
    device_name = torch.cuda.get_device_name() if device != "cpu" else "cpu"
    threads = torch.get_num_threads()
    reply({"impls": names, "limits": limits, "flops": flops, "threads": threads, "thp": thp, "device": device_name})
    with torch.no_grad():
        for line in sys.stdin:
            command, batch = line.split()
            args = inputs(int(batch))
            if command == "warm":
                ref = None if group == "transformers" else impls["transformers"](*args).double()
                first_call_s, rel = {}, {}
                for name in names:
                    _sync(device)
                    start = time.perf_counter()
                    out = impls[name](*args)
                    _sync(device)
                    first_call_s[name] = time.perf_counter() - start
                    rel[name] = 0.0 if ref is None else float((out.double() - ref).norm() / ref.norm())
                del ref
                reply({"first_call_s": first_call_s, "rel": rel})
            else:
                reply({"times": {name: _timed(lambda n=name: impls[n](*args), device) / int(batch) for name in names}})


class Child:
    """A ``serve`` process for one group, with its own environment (see child_env)."""

    def __init__(self, part: str, dtype: str, group: str, args: argparse.Namespace):
        command = [sys.executable, __file__, "--serve", part, dtype, group, "--device", args.device]
        command += ["--no-compiled"] if args.no_compiled else []
        self.group = group
        self.process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env(group)
        )
        self.hello = self.read()  # what serve() built and measured

    def read(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.group} child exited ({self.process.wait()}); its stderr is above")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=120)


def run_pair(part: str, dtype_name: str, args: argparse.Namespace) -> dict:
    """Both children for one (tower, dtype); per batch size: a warm-up each, then ``rounds`` rounds in which each child
    times its implementations once, the order alternating between rounds."""
    children = [Child(part, dtype_name, group, args) for group in GROUPS]
    try:
        ours = children[1].hello
        names = [name for child in children for name in child.hello["impls"]]
        flops, rows = ours["flops"], []
        for batch in args.batch_sizes:
            first_call_s, rel = {}, {}
            for child in children:
                warm = child.ask(f"warm {batch}")
                first_call_s.update(warm["first_call_s"])
                rel.update(warm["rel"])
            times, load = {name: [] for name in names}, []
            for round_ in range(args.rounds):
                for child in children if round_ % 2 == 0 else children[::-1]:
                    for name, seconds in child.ask(f"time {batch}")["times"].items():
                        times[name].append(seconds)
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
                    "fraction_of_matmul": flops / median / 1e9 / ours["limits"]["matmul_gflops"],
                    "rel_diff_vs_transformers": rel[name],
                    "speedup_median": statistics.median(times["transformers"]) / median,
                    "speedup_per_round": [r / o for r, o in zip(times["transformers"], values, strict=True)],
                }
            row["load_average_1min"] = load
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        for child in children:
            child.close()
    return {
        "rows": rows,
        "limits": ours["limits"],
        "limits_transformers_process": children[0].hello["limits"],
        "gflop_per_item": flops / 1e9,
        "threads": ours["threads"],
        "thp": {child.group: child.hello["thp"] for child in children},
        "device": ours["device"],
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
            f"- {res['part']} {res['dtype']}: {res['gflop_per_item']:.0f} GFLOP per item; gemma3n's process: "
            f"{lim['matmul_gflops']:.0f} GFLOP/s peak matmul (best of n = {sizes}), "
            f"{lim['copy_gbs']:.1f} GB/s copy, "
            f"{res['threads']} threads, device {res.get('device', 'cpu')}; "
            f"THP_MEM_ALLOC_ENABLE per process: {_thp_text(res.get('thp', 'unset'))}"
        )
    return "\n".join(lines) + "\n"


def _thp_text(thp: dict | str) -> str:
    return ", ".join(f"{group} {value}" for group, value in thp.items()) if isinstance(thp, dict) else thp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["vision", "audio"], choices=["vision", "audio"])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], choices=list(DTYPES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-compiled", action="store_true", help="leave out the torch.compile variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (GPU runs: set --out, e.g. encoders_gpu)")
    parser.add_argument("--out", default="benchmarks/results/encoders_cpu")
    parser.add_argument("--serve", nargs=3, metavar=("PART", "DTYPE", "GROUP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(*args.serve, compiled=not args.no_compiled, device=args.device)
        return

    results = []
    for dtype in args.dtypes:  # bf16 first (the faster runs): a run cut short still has both towers
        for part in args.parts:
            print(f"{part} {dtype}: waiting for {LOCK} ...", file=sys.stderr, flush=True)
            with open(LOCK, "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                res = run_pair(part, dtype, args)
            res.update(part=part, dtype=dtype)
            results.append(res)
            print(markdown([res]), file=sys.stderr, flush=True)
            write_results(Path(args.out), results)  # after every pair: a partial run still leaves its figures
    print(markdown(results))


def write_results(out: Path, results: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    info = {"command": command, "torch": torch.__version__, "cpus": os.cpu_count()}
    out.with_suffix(".json").write_text(json.dumps({"info": info, "results": results}, indent=2))
    out.with_suffix(".md").write_text(f"`{command}` (torch {torch.__version__})\n\n" + markdown(results))


if __name__ == "__main__":
    main()
