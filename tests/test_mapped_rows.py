"""Row gathers from a memory-mapped table leave none of its pages mapped (gemma3n/text_model/mapped_rows.py)."""

from __future__ import annotations

import mmap
import struct
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from gemma3n.checkpoint import read_checkpoint_tensors
from gemma3n.text_model.mapped_rows import GATHER_CHUNK, gather_rows

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux page maps")


def _present_pages(tensor: torch.Tensor) -> int:
    """How many pages of ``tensor`` are mapped into this process (/proc/self/pagemap bit 63)."""
    page = mmap.PAGESIZE
    begin = tensor.data_ptr() // page
    end = -(-(tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page)
    with open("/proc/self/pagemap", "rb") as fh:
        fh.seek(begin * 8)
        entries = struct.unpack(f"{end - begin}Q", fh.read((end - begin) * 8))
    return sum(entry >> 63 for entry in entries)


@pytest.fixture
def mapped_table(tmp_path) -> torch.Tensor:
    table = torch.randn(4096, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 4 MB
    save_file({"table": table}, str(tmp_path / "model.safetensors"))
    return read_checkpoint_tensors(tmp_path)["table"]


def test_gather_equals_embedding_and_drops_the_pages(mapped_table):
    embedding = nn.Embedding.from_pretrained(mapped_table, freeze=True)
    assert embedding.weight.data_ptr() == mapped_table.data_ptr()  # still the file mapping
    ids = torch.randint(0, 4096, (3, GATHER_CHUNK + 7), generator=torch.Generator().manual_seed(1))
    ids[0, :3] = torch.tensor([0, 4095, 4095])  # both ends of the table, and a repeat
    with torch.inference_mode():
        got = gather_rows(embedding, ids)
        # at most the two pages the table shares with its neighbours in the file (never released: not all its own)
        assert _present_pages(mapped_table) <= 2
        want = F.embedding(ids, mapped_table)  # the plain gather maps the rows it reads: the check can fail
        assert _present_pages(mapped_table) >= 8
    assert got.shape == (3, GATHER_CHUNK + 7, 512) and torch.equal(got, want)


def test_anonymous_and_tied_tables_gather_as_usual(mapped_table):
    anonymous = nn.Embedding.from_pretrained(mapped_table.clone(), freeze=True)
    ids = torch.arange(0, 4096, 37)
    with torch.inference_mode():
        assert torch.equal(gather_rows(anonymous, ids), mapped_table[ids])
        assert torch.equal(anonymous.weight, mapped_table)  # anonymous memory is never released
        tied = nn.Embedding.from_pretrained(mapped_table, freeze=True)
        tied(torch.arange(4096))  # maps the whole table, as the tied LM head's reads do
        before = _present_pages(mapped_table)
        assert torch.equal(gather_rows(tied, ids, release=False), mapped_table[ids])
        assert _present_pages(mapped_table) == before
