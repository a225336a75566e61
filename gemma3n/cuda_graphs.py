"""Decode steps replayed from CUDA graphs: a whole step's kernels launched at once.

On a GPU, an eager Gemma 3n decode step at small batch is bound by launching its thousands of small kernels (AltUp,
LAuReL, per-layer inputs, norms, ...), not by memory: E2B decodes at about 2% of the H200's bandwidth eagerly. A CUDA
graph records the step's kernels once and replays them with one launch: 4.7x the eager steps' speed there at batch 1
(benchmarks/results/gpu_decode_graphs_e2b.md).

The step is graph-safe by construction: its inputs are device tensors (the cache slot ``start`` too), it never syncs
with the host, and its shapes change only with the attention bucket (``KVCache.visible``), so one graph per bucket
serves all steps of a ``generate`` call. Replays run exactly the captured kernels, so tokens equal eager decoding's.
"""

from __future__ import annotations

from typing import Any

import torch

from .text_model import KVCache


def cuda_graphs_supported(model: Any) -> bool:
    """Whether ``model``'s decode step can be captured: a model that declares it (Gemma 3n), every weight on CUDA
    (a per-layer table kept on the host, ``ple_device="cpu"``, gathers rows on the host each step)."""
    if not getattr(model, "supports_cuda_graphs", False):
        return False
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.device.type == "cuda" for t in tensors)


class CudaGraphDecodeStep:
    """A drop-in for :func:`gemma3n.generation.decode_step` bound to one generate call's model and cache.

    Inputs are copied into static buffers (tokens and positions [B, 1], slot 0-d), the graph of the current attention
    bucket is captured on first use (after one eager warm-up step on a side stream, which writes the same keys and
    values the replay writes) and replayed; the logits [B, V] are returned as a fresh tensor.
    """

    def __init__(self, model: Any, cache: KVCache, batch_size: int):
        device = cache.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _run_step(self) -> torch.Tensor:
        from .generation import decode_step  # generation imports this module

        return decode_step(self.model, self.tokens, self.positions, self.cache, self.start)

    def _capture(self) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        side = torch.cuda.Stream(device=self.cache.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: lazy library set-up happens here
            self._run_step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._run_step()
        return graph, logits

    def __call__(
        self, model: Any, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: torch.Tensor
    ) -> torch.Tensor:
        if model is not self.model or cache is not self.cache:
            raise ValueError("a CudaGraphDecodeStep serves the model and cache it was made for")
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        self.start.copy_(start)
        entry = self.graphs.get(cache.visible)
        if entry is None:
            entry = self.graphs[cache.visible] = self._capture()
        graph, logits = entry
        graph.replay()
        return logits.clone()
