"""Row gathers from a memory-mapped embedding table that leave none of the table's pages mapped (eager, CPU).

The token and per-layer tables stay in the checkpoint's file mapping and are read a few rows at a time. On kernels
that fill the page cache in large folios, a fault maps the whole folio around a row: on this machine type (Linux
6.18, 8 MB read-ahead) about 1 MB of the token table per 4 KB row, so a 512-token prompt mapped 0.5 GB of it into the
process (peak RSS). Here the rows are gathered in chunks of ``GATHER_CHUNK`` and the table's pages are dropped from
this process after each chunk (``madvise(MADV_DONTNEED)``; the page cache keeps them, so the next gather faults them
back in cheaply). Compiled graphs, other devices and tables that are not file-mapped gather as usual.

A row that is not in the page cache at all is read from disk on its first gather. The tables read only by gathers
are marked for random reads at load (:func:`advise_row_reads`), so that read fetches the row's pages rather than
the whole read-ahead window around them.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..mapped_pages import advise_random_reads, in_file_mapping, release_mapped_pages

GATHER_CHUNK = 64  # rows per gather between releases: at most this many folios of a table mapped at once
# A page-cache folio is at most 2 MB (PMD order) and lies around the row it was faulted in for: dropping this much on
# either side of each row gathered unmaps it whole, without walking the rest of a multi-GB table.
_FOLIO_REACH = 2 << 20


def gather_rows(table: nn.Embedding, ids: torch.Tensor, release: bool = True) -> torch.Tensor:
    """``table(ids)`` [*ids.shape, dim]; with ``release``, a file-mapped CPU table keeps none of its pages mapped."""
    weight = table.weight
    plain = not release or torch.compiler.is_compiling() or ids.device.type != "cpu"
    if plain or (torch.is_grad_enabled() and weight.requires_grad) or not _file_mapped(table):
        return table(ids)
    flat = ids.reshape(-1)
    out = torch.empty(flat.numel(), weight.shape[1], dtype=weight.dtype)
    # _file_mapped checked that this weight object lies in a file mapping, and the module keeps it alive
    base, row_bytes = weight.data_ptr(), weight.stride(0) * weight.element_size()
    own_range = [(base, base + weight.numel() * weight.element_size())]
    with torch.no_grad():
        for start in range(0, flat.numel(), GATHER_CHUNK):
            rows = flat[start : start + GATHER_CHUNK]
            torch.index_select(weight, 0, rows, out=out[start : start + rows.numel()])
            for lo, hi in _merged_windows(rows.tolist(), row_bytes):
                release_mapped_pages(weight[lo:hi], own_range)
    return out.view(*ids.shape, weight.shape[1])


def advise_row_reads(table: nn.Embedding) -> bool:
    """Mark a file-mapped CPU table for random reads (:func:`gemma3n.mapped_pages.advise_random_reads`): a gather of
    an uncached row then reads that row's pages from disk, not the read-ahead window around it. True if marked."""
    weight = table.weight
    return weight.device.type == "cpu" and advise_random_reads(weight.detach())


def _merged_windows(rows: list[int], row_bytes: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) reaching ``_FOLIO_REACH`` bytes beyond each row on both sides, merged."""
    reach = -(-_FOLIO_REACH // row_bytes)
    windows: list[tuple[int, int]] = []
    for row in sorted(set(rows)):
        lo, hi = max(row - reach, 0), row + 1 + reach
        if windows and lo <= windows[-1][1]:
            windows[-1] = (windows[-1][0], max(windows[-1][1], hi))
        else:
            windows.append((lo, hi))
    return windows


def _file_mapped(table: nn.Embedding) -> bool:
    """Whether ``table.weight`` lies in a file mapping, checked once per weight object (a weak reference, so a
    replaced weight is checked again)."""
    weight = table.weight
    cached = table.__dict__.get("_file_mapped_check")
    if cached is not None and cached[0]() is weight:
        return cached[1]
    mapped = in_file_mapping(weight)
    table.__dict__["_file_mapped_check"] = (weakref.ref(weight), mapped)
    return mapped
