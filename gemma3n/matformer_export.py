"""Write a MatFormer slice of a checkpoint as a new checkpoint directory in the published layout.

The weights are streamed into safetensors shards tensor by tensor (in row chunks), so writing an E2B-sized slice of
E4B never holds more than one chunk in memory besides the source memory map. The safetensors library only writes
whole dicts of tensors (it would need the multi-gigabyte per-layer table gathered in memory), hence the small writer
here; the format is the one :mod:`gemma3n.checkpoint` reads: 8-byte little-endian header length, a JSON header padded
with spaces to 8 bytes, then the raw tensor bytes in header order.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import SAFETENSORS_DTYPES, read_checkpoint_tensors, weight_files
from .config import ConfigError, Gemma3nConfig
from .matformer import KeptColumns, MatformerSpec, plan_slice, slice_config_dict, slice_tensors, text_prefix

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_CHUNK_BYTES = 64 << 20  # rows copied per write: bounded memory for the big tables
DEFAULT_SHARD_BYTES = 4 << 30

Progress = Callable[[str], None]


def _nbytes(tensor: torch.Tensor | KeptColumns) -> int:
    return math.prod(tensor.shape) * torch.empty((), dtype=tensor.dtype).element_size()


def _write_tensor(fh, tensor: torch.Tensor | KeptColumns) -> None:
    rows = tensor.shape[0] if len(tensor.shape) else 1
    if not len(tensor.shape) or rows == 0:
        fh.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # type: ignore[union-attr]
        return
    row_bytes = max(1, _nbytes(tensor) // rows)
    step = max(1, _CHUNK_BYTES // row_bytes)
    for start in range(0, rows, step):
        chunk = tensor[start : start + step].contiguous()  # [n, ...]
        fh.write(chunk.reshape(-1).view(torch.uint8).numpy().data)


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor | KeptColumns]) -> None:
    """One safetensors file holding ``tensors`` (written in name order, streamed in row chunks)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        tensor = tensors[name]
        size = _nbytes(tensor)
        header[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name in names:
            _write_tensor(fh, tensors[name])


def write_sharded(
    directory: Path,
    tensors: Mapping[str, torch.Tensor | KeptColumns],
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
) -> list[Path]:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards plus ``model.safetensors.index.json``."""
    shards: list[dict[str, torch.Tensor | KeptColumns]] = [{}]
    used = 0
    for name in sorted(tensors):
        size = _nbytes(tensors[name])
        if shards[-1] and used + size > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][name] = tensors[name]
        used += size
    if len(shards) == 1:
        files = [directory / "model.safetensors"]
    else:
        files = [directory / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for i, (file, shard) in enumerate(zip(files, shards, strict=True)):
        if progress:
            size = sum(_nbytes(t) for t in shard.values())
            progress(f"writing {file.name} ({i + 1}/{len(files)}, {len(shard)} tensors, {size / 1e9:.2f} GB)")
        write_safetensors(file, shard)
    if len(files) > 1:
        index = {
            "metadata": {"total_size": sum(_nbytes(t) for t in tensors.values())},
            "weight_map": {name: file.name for file, shard in zip(files, shards, strict=True) for name in shard},
        }
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files


def write_sliced_checkpoint(
    source: str | Path,
    output: str | Path,
    matformer: MatformerSpec | Mapping[str, Any] | str,
    *,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Progress | None = None,
) -> Path:
    """Cut a MatFormer slice of the checkpoint ``source`` into the new directory ``output``.

    ``output`` gets the sliced weights (same dtype as the source), a ``config.json`` whose text section describes the
    slice, and every other file of ``source`` (tokenizer, processor, chat template, generation config) copied. It is
    written in a temporary sibling directory and renamed at the end, so a failed run leaves nothing half-written.
    """
    source, output = Path(source), Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise FileExistsError(f"output {output} already exists and is not an empty directory")
    config_file = source / "config.json"
    config = Gemma3nConfig.from_pretrained(source)
    plan = plan_slice(config.text, matformer)
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    new_raw = slice_config_dict(raw, plan)
    try:
        Gemma3nConfig.from_dict(new_raw)
    except ConfigError as err:  # should not happen after plan_slice; never write a config we cannot read back
        raise ConfigError(f"the sliced config.json would be invalid: {err}") from None
    tensors = slice_tensors(read_checkpoint_tensors(source), plan, text_prefix(config), lazy_table=True)
    weights = {p.resolve() for p in weight_files(source)} | {(source / "model.safetensors.index.json").resolve()}

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        for item in sorted(source.iterdir()):
            if item.is_file() and item.name != "config.json" and item.resolve() not in weights:
                shutil.copy2(item, staging / item.name)
        (staging / "config.json").write_text(json.dumps(new_raw, indent=2) + "\n", encoding="utf-8")
        write_sharded(staging, tensors, max_shard_bytes=max_shard_bytes, progress=progress)
        if output.exists():
            output.rmdir()
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output
