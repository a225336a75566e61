"""This process's file mappings; dropping a mapped tensor's pages from its resident memory, and advising random reads
of a mapped table (Linux).

Checkpoint weights are views of the safetensors files' memory maps (``gemma3n.checkpoint``). Quantization, the
streamed towers (``gemma3n.low_memory``) and the embedding-table row gathers (``gemma3n.text_model.mapped_rows``)
drop the pages they are done with; the page cache keeps the data, so a later read maps it back.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch


def file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process's file-backed memory mappings (Linux; empty elsewhere)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # inode and a path: a file
            begin, end = (int(a, 16) for a in fields[0].split("-"))
            ranges.append((begin, end))
    return ranges


def in_file_mapping(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> bool:
    """Whether ``tensor``'s bytes lie inside one file mapping (``mappings``, default: read now)."""
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    return any(lo <= begin and end <= hi for lo, hi in (file_mappings() if mappings is None else mappings))


def advise_pages(tensor: torch.Tensor, advice: int, whole_pages_only: bool) -> None:
    """``madvise(advice)`` over a CPU tensor's pages (Linux): only the pages wholly inside it, or every page it
    touches. The caller checks that the tensor lies in a file mapping."""
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    if whole_pages_only:
        first, last = -(-begin // page) * page, end // page * page
    else:
        first, last = begin // page * page, -(-end // page) * page
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(advice))


def advise_random_reads(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> bool:
    """Tell the kernel that a memory-mapped checkpoint tensor is read a few rows at a time (``madvise(MADV_RANDOM)``);
    True if done (a tensor inside a file mapping, on Linux).

    A page fault in a file mapping otherwise reads the whole read-ahead window around the page from disk: with the
    E2B per-layer table (3.8 GB) out of the page cache, one row of a new token took 7-12 ms to gather that way,
    0.4-0.5 ms with this advice (``benchmarks/cold_row_gathers.py``). Pages already cached are unaffected, and the
    advice changes no data. The advice covers every page the tensor touches: it only turns read-ahead off there.
    """
    if not sys.platform.startswith("linux") or not in_file_mapping(tensor, mappings):
        return False
    advise_pages(tensor, mmap.MADV_RANDOM, whole_pages_only=False)
    return True


def release_mapped_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> bool:
    """Drop a memory-mapped checkpoint tensor's pages from this process's resident memory; True if done.

    Only a tensor lying inside a file mapping is touched (``mappings``, default: read now): its unmodified pages are
    re-read from the file on the next access, so the data stays valid. Anonymous memory is never released.
    """
    if not sys.platform.startswith("linux") or not in_file_mapping(tensor, mappings):
        return False
    advise_pages(tensor, mmap.MADV_DONTNEED, whole_pages_only=True)  # never a page shared with a neighbouring tensor
    return True
