"""Towers whose weights stay on disk: each block's memory-mapped weight pages are dropped after the block has run.

The checkpoint is memory-mapped (:mod:`gemma3n.checkpoint`), so a tower weight is resident only while its pages are
mapped in. :func:`stream_tower_weights` hooks a tower's blocks: after each block's forward, the pages of that block's
weights are released (``madvise(MADV_DONTNEED)`` through :func:`gemma3n.mapped_pages.release_mapped_pages`) and the next
call reads them again, from the page cache when the file is still there (from disk otherwise). So a tower costs about
one block of weights plus its activations at a time instead of all its weights for the rest of the process (E2B, bf16:
vision 0.6 GB, audio 1.37 GB). The computation is unchanged: the same weights go through the same kernels.

Only tensors lying inside a file mapping and never written in place are touched: a weight that was cast or copied at
load (another dtype, another device) is ordinary memory, and a mapped weight changed in place (its version counter
moved) holds private copies of its pages, which releasing would throw away; both stay as they are. ``Gemma3n.load``
turns this on with ``low_memory=True``, the default when ``quantize=`` is given (see
``benchmarks/results/multimodal_memory_e2b.md`` for the memory and time it costs).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .mapped_pages import file_mappings, release_mapped_pages


def sequential_blocks(module: nn.Module) -> Iterator[nn.Module]:
    """The modules that run one after another inside ``module``: its children, with ``nn.Sequential`` and
    ``nn.ModuleList`` containers opened recursively (a timm stage list, a conformer's block list)."""
    for child in module.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            yield from sequential_blocks(child)
        else:
            yield child


class _MappedWeights:
    """The file mappings of this process, read once per tower call and shared by the hooks of its blocks."""

    def __init__(self) -> None:
        self.mappings: list[tuple[int, int]] | None = None

    def read(self, module: nn.Module, args: object) -> None:
        if not torch.compiler.is_compiling():
            self.mappings = file_mappings()

    def forget(self, module: nn.Module, args: object, output: object) -> None:
        self.release(module)
        self.mappings = None

    def release(self, module: nn.Module, args: object = None, output: object = None) -> None:
        """Drop the mapped pages of every parameter and buffer of ``module`` (a no-op while compiling)."""
        if torch.compiler.is_compiling():
            return
        mappings = self.mappings if self.mappings is not None else file_mappings()
        for tensor in [*module.parameters(), *module.buffers()]:
            # a tensor written in place (version > 0) holds private copies of its pages: releasing would undo the write
            if tensor.device.type == "cpu" and tensor._version == 0:
                release_mapped_pages(tensor.detach(), mappings)


def stream_tower_weights(tower: nn.Module, root: nn.Module | None = None) -> list[RemovableHandle]:
    """Release each block's mapped weight pages after the block has run; return the hooks' handles.

    The blocks are :func:`sequential_blocks` of ``root`` (default: ``tower``); after the whole ``tower`` has run, the
    pages of all its weights are released too (parameters outside any block, and a tower called through a compiled
    graph, where the block hooks do not run). Remove the returned handles to turn it off.
    """
    state = _MappedWeights()
    handles = [tower.register_forward_pre_hook(state.read), tower.register_forward_hook(state.forget)]
    handles += [block.register_forward_hook(state.release) for block in sequential_blocks(root or tower)]
    return handles
