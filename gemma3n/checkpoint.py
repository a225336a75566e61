"""Safetensors checkpoint reading: one file or a sharded index, memory-mapped, names as published.

We parse the safetensors header ourselves (8-byte little-endian length, a JSON header, then raw bytes) and check it
against the file's size, so every tensor is a zero-copy view of a copy-on-write memory map and a truncated or corrupt
file is reported by name before any tensor is touched. Not ``safetensors.safe_open``: its ``get_tensor`` (0.8.0) is a
view of the same kind of map but faults in the first page of every tensor, so on the E2B checkpoint (1526 tensors,
10.8 GB, cold page cache) reading took 3.3 s instead of 0.02 s and a text-only load 3.5 s instead of 0.14 s, for no
memory saved (benchmarks/bench_checkpoint_loading.py, results in benchmarks/results/checkpoint_e2b.md).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (``model.safetensors`` or the shards of its index)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if path.is_file():
        return [path]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from None
        files = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {', '.join(missing)}")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(path.glob("*.safetensors"))
    if found:
        return found
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


class _Entry(NamedTuple):
    """One tensor of a safetensors header: its dtype, shape and byte range in the data section."""

    dtype: torch.dtype
    shape: list[int]
    start: int
    stop: int


def _parse_entries(file: Path, header: object) -> dict[str, dict]:
    """The header's tensor entries, checked for the fields every entry needs (a corrupt header is named)."""
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a corrupt safetensors header: a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        shape = info.get("shape") if isinstance(info, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and o >= 0 for o in offsets)
            and offsets[0] <= offsets[1]
            and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)
        ):
            raise CheckpointError(f"{file} has a corrupt safetensors header: bad entry for tensor '{name}': {info}")
    return header


def _read_header(file: Path) -> tuple[dict[str, _Entry], int]:
    """Every tensor entry of ``file`` and where its data section starts, validated against the file's size."""
    size = file.stat().st_size
    with open(file, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{file} is truncated: {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise CheckpointError(f"{file} is truncated or corrupt: header of {header_len} bytes in a {size}-byte file")
        try:
            header = json.loads(fh.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{file} has a corrupt safetensors header: {err}") from None
    header = _parse_entries(file, header)
    data_start = 8 + header_len
    end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if data_start + end > size:
        raise CheckpointError(f"{file} is truncated: its header needs {data_start + end} bytes but the file has {size}")
    entries = {}
    for name, info in header.items():
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{file}: tensor '{name}' has unsupported dtype {info.get('dtype')}")
        start, stop = info["data_offsets"]
        if stop - start != math.prod(info["shape"]) * dtype.itemsize:
            raise CheckpointError(
                f"{file}: tensor '{name}' has {stop - start} bytes for shape {info['shape']} of {info['dtype']}"
            )
        entries[name] = _Entry(dtype, info["shape"], start, stop)
    if data_start + end < size:
        raise CheckpointError(f"{file} is corrupt: {size - data_start - end} bytes after its last tensor")
    return entries, data_start


def _open_file(file: Path) -> dict[str, torch.Tensor]:
    entries, data_start = _read_header(file)
    if not entries:
        return {}
    buffer = np.memmap(file, dtype=np.uint8, mode="c")  # copy-on-write: pages shared until written
    tensors = {}
    for name, entry in entries.items():
        raw = torch.from_numpy(buffer[data_start + entry.start : data_start + entry.stop])
        tensors[name] = raw.view(entry.dtype).reshape(entry.shape)
    return tensors


def read_checkpoint_tensors(path: str | Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint whose names start with ``prefix``, with the prefix removed (memory-mapped views)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        for name, tensor in _open_file(file).items():
            if name.startswith(prefix):
                tensors[name[len(prefix) :]] = tensor
    return tensors


def checkpoint_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype a checkpoint was saved in (the most common one among its tensors)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return max(counts, key=counts.get) if counts else torch.float32


def _listing(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def attach_weights(
    module: torch.nn.Module,
    tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
    device_overrides: dict[str, torch.device | str] | None = None,
) -> None:
    """Attach ``tensors`` (already renamed to ``module``'s state-dict names) to a module built on the meta device.

    Floating tensors are cast to ``dtype`` and moved to ``device`` (or ``device_overrides[name]``). Names in
    ``ignore`` are skipped silently; any other missing, unexpected or mis-shaped tensor is an error listing the names.
    """
    expected = module.state_dict(keep_vars=True)
    ignore = set(ignore)
    given = {k: v for k, v in tensors.items() if k not in ignore}
    missing = set(expected) - set(given)
    unexpected = set(given) - set(expected)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    mismatched = [
        f"{k} (checkpoint {tuple(given[k].shape)}, model {tuple(expected[k].shape)})"
        for k in set(given) & set(expected)
        if tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    state = {}
    for name, tensor in given.items():
        target_dtype = dtype if tensor.is_floating_point() else tensor.dtype
        target_device = (device_overrides or {}).get(name, device)
        state[name] = tensor.to(device=target_device, dtype=target_dtype)
    module.load_state_dict(state, strict=True, assign=True)
    leftovers = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if leftovers:
        raise CheckpointError(f"tensors still unmaterialized after loading {source}: {_listing(leftovers)}")
