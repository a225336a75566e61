"""The CPU vision tower run image by image against one call for the whole batch, in one process, alternating.

    python benchmarks/vision_images_per_call.py --lock /tmp/gemma3n-heavy.lock    # ~2 min

E2B-shaped MobileNet v5 tower (gemma3n's ``VisionTower``, one set of random weights for both modes), 768x768 images,
eager, gradient-free. The two settings of ``VisionTower.cpu_images_per_call`` (1 and None) alternate call by call
for ``--rounds`` rounds after one warm-up call each, in one process, so a change in machine speed hits both alike.
Writes ``benchmarks/results/vision_images_per_call.{json,md}``: ms per image per round, medians, and the paired ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from locking import maybe_locked

from gemma3n.config import Gemma3nConfig
from gemma3n.encoders.vision import VisionTower
from gemma3n.presets import preset_config_dict

HERE = Path(__file__).resolve().parent


def random_e2b_tower(dtype: torch.dtype) -> VisionTower:
    """The E2B vision tower with random weights (fan-in scaled, norm weights 1), gradient-free, in ``dtype``."""
    config = Gemma3nConfig.from_dict(preset_config_dict("e2b"))
    with torch.device("meta"):
        tower = VisionTower(config.vision, config.vision_soft_tokens_per_image)
    tower = tower.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in tower.parameters():
            if param.dim() > 1:
                param.copy_(torch.randn(param.shape, generator=generator) / param[0].numel() ** 0.5)
            else:
                param.fill_(1.0)
        for name, buffer in tower.named_buffers():
            buffer.zero_() if "mean" in name else buffer.fill_(1.0)
    return tower.to(dtype).eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--lock", default=None, help="flock file held for the run (the shared machine's heavy lock)")
    parser.add_argument("--out", default=str(HERE / "results" / "vision_images_per_call"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    with maybe_locked(args.lock):
        tower = random_e2b_tower(dtype)
        pixels = torch.rand(args.batch, 3, 768, 768, generator=torch.Generator().manual_seed(3)).to(dtype)
        modes = {"image by image (1)": 1, "whole batch (None)": None}
        times: dict[str, list[float]] = {name: [] for name in modes}
        load = [os.getloadavg()[0]]
        with torch.no_grad():
            for per_call in modes.values():  # warm-up: packed weights, allocator
                tower.cpu_images_per_call = per_call
                tower(pixels)
            for r in range(args.rounds):
                order = list(modes.items()) if r % 2 == 0 else list(modes.items())[::-1]
                for name, per_call in order:
                    tower.cpu_images_per_call = per_call
                    start = time.perf_counter()
                    tower(pixels)
                    times[name].append((time.perf_counter() - start) * 1000 / args.batch)
        load.append(os.getloadavg()[0])
    one, whole = times["image by image (1)"], times["whole batch (None)"]
    result = {
        "batch": args.batch,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "ms_per_image": times,
        "median_ms_per_image": {name: statistics.median(v) for name, v in times.items()},
        "paired_ratio_whole_over_one": [w / o for w, o in zip(whole, one, strict=True)],
        "load_average_1min": load,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    lines = [
        f"`python benchmarks/vision_images_per_call.py --batch {args.batch} --rounds {args.rounds}` ({args.dtype}, "
        f"{result['threads']} threads, torch {torch.__version__}, load average {load[0]:.1f} -> {load[1]:.1f})",
        "",
        "| mode | ms per image, median | per round |",
        "|---|---|---|",
    ]
    for name, values in times.items():
        lines.append(f"| {name} | {statistics.median(values):.0f} | {', '.join(f'{v:.0f}' for v in values)} |")
    ratios = result["paired_ratio_whole_over_one"]
    lines += ["", f"Whole batch / image by image, paired by round: {', '.join(f'{r:.3f}' for r in ratios)}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
