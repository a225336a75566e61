"""Random-weight checkpoints of the published Gemma 3n shapes (E2B, E4B), in the published file layout.

    python benchmarks/published_checkpoint.py --preset e2b --out /work/cache/e2b

The tensor names and shapes come from transformers' own ``Gemma3nForConditionalGeneration`` built on the meta device
(so transformers and gemma3n both load the result); values are random (norm scales near 1, matrices scaled by
1/sqrt(fan_in), as ``gemma3n.tiny_random`` draws them) and written shard by shard in bfloat16, so building never holds
the whole model in memory. Processor files (tokenizer with the published vocabulary size, 768x768 images, 256 image and
188 audio soft tokens) come from ``gemma3n.processors.tiny_files``. Written to a temporary folder, then renamed: an
interrupted build leaves nothing half-written. An existing complete checkpoint is reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

SHARD_BYTES = 2 << 30
CHUNK_ELEMENTS = 1 << 26  # values drawn at once for big tables


def reference_state_shapes(config_dict: dict) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """Published tensor names -> (shape, dtype), from transformers' model built on the meta device."""
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration

    config = Gemma3nConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = Gemma3nForConditionalGeneration(config)
    tied = {"lm_head.weight"} if config.get_text_config().tie_word_embeddings else set()
    return {k: (v.shape, v.dtype) for k, v in model.state_dict().items() if k not in tied}


def build(preset: str, out: Path, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    from safetensors.torch import save_file

    from gemma3n.presets import preset_config_dict
    from gemma3n.processors.tiny_files import write_tiny_processor_files
    from gemma3n.tiny_random import _random_like, generation_config_dict

    if (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file():
        print(f"reusing {out}")
        return out
    config = preset_config_dict(preset)
    shapes = reference_state_shapes(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=out.parent))
    try:
        generator = torch.Generator().manual_seed(seed)
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        shard_bytes, n_shards, total = 0, 0, 0
        names = sorted(shapes)

        def flush() -> None:
            nonlocal shard, shard_bytes, n_shards
            if not shard:
                return
            n_shards += 1
            file = f"model-{n_shards:05d}.safetensors"
            save_file(shard, str(staging / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
            shard, shard_bytes = {}, 0

        start = time.perf_counter()
        for name in names:
            shape, src_dtype = shapes[name]
            if src_dtype.is_floating_point and len(shape) == 2 and shape.numel() > CHUNK_ELEMENTS:
                # big tables (per-layer embeddings: 2B values) drawn a block of rows at a time, so float32 noise for
                # the whole table is never held; the fan-in scaling depends only on the row width
                value = torch.empty(shape, dtype=dtype)
                rows = max(1, CHUNK_ELEMENTS // shape[1])
                for r in range(0, shape[0], rows):
                    block = torch.empty((min(rows, shape[0] - r), shape[1]), device="meta")
                    value[r : r + rows] = _random_like(name, block, generator).to(dtype)
            elif src_dtype.is_floating_point:
                value = _random_like(name, torch.empty(shape, device="meta"), generator).to(dtype)
            else:
                value = torch.zeros(shape, dtype=src_dtype)
            nbytes = value.numel() * value.element_size()
            if shard and shard_bytes + nbytes > SHARD_BYTES:
                flush()
            shard[name] = value.contiguous()
            shard_bytes += nbytes
            total += nbytes
        flush()
        # name the shards "-of-N" as the published files do
        renames = {}
        for i in range(1, n_shards + 1):
            old = staging / f"model-{i:05d}.safetensors"
            new = f"model-{i:05d}-of-{n_shards:05d}.safetensors"
            old.rename(staging / new)
            renames[old.name] = new
        weight_map = {k: renames[v] for k, v in weight_map.items()}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        generation = generation_config_dict()
        generation.pop("max_new_tokens", None)
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
        write_tiny_processor_files(staging, image_size=(768, 768), image_seq_length=256, audio_seq_length=188)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
        print(f"wrote {out}: {total / 1e9:.2f} GB in {n_shards} shards, {time.perf_counter() - start:.0f} s")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["e2b", "e4b"], default="e2b")
    parser.add_argument("--out", type=Path, default=None, help="default: ~/.cache/gemma3n-bench/<preset>")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = args.out or Path.home() / ".cache" / "gemma3n-bench" / args.preset
    build(args.preset, out, seed=args.seed)


if __name__ == "__main__":
    main()
