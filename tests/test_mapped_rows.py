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
from gemma3n.text_model.mapped_rows import GATHER_CHUNK, advise_row_reads, gather_rows

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


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    with open("/proc/self/smaps", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    inside = False
    for line in lines:
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            begin, end = (int(a, 16) for a in fields[0].split("-"))
            inside = begin <= address < end
        elif inside and fields[0] == "VmFlags:":
            return set(fields[1:])
    raise AssertionError(f"no mapping holds {address:#x}")


def _middle(tensor: torch.Tensor) -> int:
    return tensor.data_ptr() + tensor.numel() * tensor.element_size() // 2


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


def test_a_mapped_table_is_advised_for_random_reads(mapped_table):
    # "rr" is the kernel's mark for madvise(MADV_RANDOM): a fault reads the page, not the read-ahead window around it
    assert "rr" not in _vm_flags(_middle(mapped_table))
    assert advise_row_reads(nn.Embedding.from_pretrained(mapped_table, freeze=True))
    assert "rr" in _vm_flags(_middle(mapped_table))
    anonymous = mapped_table.clone()
    assert not advise_row_reads(nn.Embedding.from_pretrained(anonymous, freeze=True))  # nothing to advise
    assert "rr" not in _vm_flags(_middle(anonymous))
    with torch.inference_mode():  # the data is unchanged
        assert torch.equal(mapped_table, anonymous)


@pytest.mark.filterwarnings("ignore:quantize='int8' with float32")  # fp32 keeps the checkpoint's own mapping
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_load_advises_the_tables_only_gathered(tiny_lm, quantize):
    import gemma3n

    model = gemma3n.load(tiny_lm[1], quantize=quantize)
    text = model.language_model
    assert "rr" in _vm_flags(_middle(text.embed_tokens_per_layer.weight))
    # the tied LM head streams the whole token table each step: read-ahead stays on for it; a quantized head
    # leaves the token table to the row gathers
    assert ("rr" in _vm_flags(_middle(text.embed_tokens.weight))) == (quantize is not None)
