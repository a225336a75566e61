"""Checkpoint reading: tensors are zero-copy views of the file's memory map, and every bad file is named precisely."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gemma3n.checkpoint import CheckpointError, attach_weights, read_checkpoint_tensors, weight_files


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (skips the test when /proc is absent)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this platform: cannot see the process's memory mappings")
    target = str(path.resolve())
    ranges = []
    for line in maps.read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            begin, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((begin, end))
    return ranges


def _inside(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    return any(lo <= begin and end <= hi for lo, hi in ranges)


def _write_raw(file: Path, header: dict, data: bytes) -> None:
    """A safetensors file with exactly this header and data (for files the library itself would refuse to write)."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.fixture
def sharded(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A 2-shard checkpoint of ~4 MB with an index, in bf16, fp32 and int64."""
    gen = torch.Generator().manual_seed(0)
    first = {
        "model.embed.weight": torch.randn(512, 1024, generator=gen).to(torch.bfloat16),
        "model.norm.weight": torch.randn(1024, generator=gen),
    }
    second = {
        "model.proj.weight": torch.randn(1024, 768, generator=gen).to(torch.bfloat16),
        "model.positions": torch.arange(77),
        "other.scale": torch.ones(3),
    }
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    weight_map = {name: "model-00001-of-00002.safetensors" for name in first}
    weight_map |= {name: "model-00002-of-00002.safetensors" for name in second}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path, first | second


def test_tensors_are_views_of_the_file_mapping(sharded):
    directory, saved = sharded
    tensors = read_checkpoint_tensors(directory)
    assert tensors.keys() == saved.keys()
    shards = weight_files(directory)
    assert [s.name for s in shards] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name, tensor in tensors.items():
        assert tensor.dtype == saved[name].dtype and torch.equal(tensor, saved[name]), name
        shard = shards[0] if name in ("model.embed.weight", "model.norm.weight") else shards[1]
        assert _inside(tensor, _file_mappings(shard)), f"{name} is not a view of a mapping of {shard.name}"


def test_prefix_selects_and_strips_names(sharded):
    directory, saved = sharded
    tensors = read_checkpoint_tensors(directory, prefix="model.")
    assert sorted(tensors) == ["embed.weight", "norm.weight", "positions", "proj.weight"]
    assert torch.equal(tensors["proj.weight"], saved["model.proj.weight"])


def test_writes_to_a_tensor_do_not_reach_the_file(sharded):
    directory, saved = sharded
    before = {f: f.read_bytes() for f in weight_files(directory)}
    tensors = read_checkpoint_tensors(directory)
    tensors["model.norm.weight"].fill_(7.0)  # copy-on-write: only this process's page changes
    assert {f: f.read_bytes() for f in weight_files(directory)} == before
    assert torch.equal(read_checkpoint_tensors(directory)["model.norm.weight"], saved["model.norm.weight"])


def test_attached_weights_in_the_checkpoint_dtype_stay_in_the_mapping(sharded):
    directory, _ = sharded
    tensors = read_checkpoint_tensors(directory, prefix="model.")
    with torch.device("meta"):
        module = torch.nn.Module()
        module.embed = torch.nn.Embedding(512, 1024, dtype=torch.bfloat16)
        module.proj = torch.nn.Linear(768, 1024, bias=False, dtype=torch.bfloat16)
    given = {"embed.weight": tensors["embed.weight"], "proj.weight": tensors["proj.weight"]}
    attach_weights(module, given, dtype=torch.bfloat16, device="cpu")
    shards = weight_files(directory)
    assert _inside(module.embed.weight, _file_mappings(shards[0]))  # no second copy of a bf16 weight in RAM
    assert _inside(module.proj.weight, _file_mappings(shards[1]))
    attach_weights(module, given, dtype=torch.float32, device="cpu")  # a cast is a copy, and must be one
    assert not _inside(module.proj.weight, _file_mappings(shards[1]))


# ---- errors: each names the file and what is wrong with it ----------------------------------------------------------
@pytest.fixture
def single(tmp_path) -> Path:
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.arange(1000, dtype=torch.float32), "b": torch.ones(4, 4, dtype=torch.bfloat16)}, file)
    return file


def test_missing_checkpoint_and_missing_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint directory not found: .*nope"):
        read_checkpoint_tensors(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors or model\.safetensors\.index\.json in"):
        read_checkpoint_tensors(tmp_path)


def test_missing_shard_is_named(sharded):
    directory, _ = sharded
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard files that are missing: .*model-00002-of-00002"):
        read_checkpoint_tensors(directory)


def test_invalid_index_is_named(sharded):
    directory, _ = sharded
    (directory / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json is not a valid safetensors index"):
        read_checkpoint_tensors(directory)


def test_truncated_data_is_named_with_sizes(single):
    raw = single.read_bytes()
    single.write_bytes(raw[:-100])
    expected = rf"model\.safetensors is truncated: its header needs {len(raw)} bytes but the file has {len(raw) - 100}"
    with pytest.raises(CheckpointError, match=expected):
        read_checkpoint_tensors(single.parent)


def test_file_too_short_for_a_header(single):
    single.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: 3 bytes, too short for a safetensors"):
        read_checkpoint_tensors(single.parent)


def test_header_longer_than_the_file(single):
    single.write_bytes(single.read_bytes()[:40])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors is truncated or corrupt: header of \d+ bytes in a 40-byte file"
    ):
        read_checkpoint_tensors(single.parent)


def test_corrupt_header(single):
    raw = bytearray(single.read_bytes())
    raw[8] = ord("[")  # the JSON header's opening brace
    single.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors has a corrupt safetensors header"):
        read_checkpoint_tensors(single.parent)


@pytest.mark.parametrize("dtype", ["Q4", "F8_E4M3"])  # unknown to the format; known to it but not to gemma3n
def test_unsupported_dtype_is_named(tmp_path, dtype):
    _write_raw(
        tmp_path / "model.safetensors",
        {
            "ok": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "w": {"dtype": dtype, "shape": [8], "data_offsets": [8, 16]},
        },
        bytes(16),
    )
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor 'w' has unsupported dtype {dtype}"):
        read_checkpoint_tensors(tmp_path)


def test_bytes_past_the_last_tensor_are_refused(single):
    single.write_bytes(single.read_bytes() + bytes(64))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt: 64 bytes after its last tensor"):
        read_checkpoint_tensors(single.parent)


def test_byte_count_that_does_not_fit_the_shape(tmp_path):
    _write_raw(
        tmp_path / "model.safetensors", {"w": {"dtype": "F32", "shape": [3, 2], "data_offsets": [0, 16]}}, bytes(16)
    )
    with pytest.raises(CheckpointError, match=r"tensor 'w' has 16 bytes for shape \[3, 2\] of F32"):
        read_checkpoint_tensors(tmp_path)


@pytest.mark.parametrize(
    "entry",
    [
        {"dtype": "F32", "shape": [2]},
        {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]},
        {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]},
        [0, 8],
    ],
)
def test_malformed_header_entry(tmp_path, entry):
    _write_raw(tmp_path / "model.safetensors", {"w": entry}, bytes(8))
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors has a corrupt safetensors header: bad entry for tensor 'w'"
    ):
        read_checkpoint_tensors(tmp_path)
