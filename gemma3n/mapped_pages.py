"""This process's file mappings, and dropping a mapped tensor's pages from its resident memory (Linux).

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


def release_mapped_pages(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> bool:
    """Drop a memory-mapped checkpoint tensor's pages from this process's resident memory; True if done.

    Only a tensor lying inside a file mapping is touched (``mappings``, default: read now): its unmodified pages are
    re-read from the file on the next access, so the data stays valid. Anonymous memory is never released.
    """
    if not sys.platform.startswith("linux") or not in_file_mapping(tensor, mappings):
        return False
    page = mmap.PAGESIZE
    begin = tensor.data_ptr()
    end = begin + tensor.numel() * tensor.element_size()
    first, last = -(-begin // page) * page, end // page * page  # whole pages inside the tensor only
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(mmap.MADV_DONTNEED))
    return True
