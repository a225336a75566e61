"""Run a batch function at one fixed batch size, so a compiled tower sees one input shape whatever the batch.

A compiled function (``torch.compile(dynamic=False)``) compiles again for every new batch size: minutes per shape for
an E2B tower. :func:`run_in_fixed_batches` cuts a batch into chunks of exactly ``batch_size`` rows, fills the last one
up with copies of its final row (real inputs: no degenerate all-zero or all-masked rows), and drops the filler rows
from the outputs. Valid for functions whose rows do not interact (every tower here: per-image / per-clip networks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _fill(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` [n, ...] with its last row repeated up to ``rows`` rows."""
    missing = rows - x.shape[0]
    if missing <= 0:
        return x
    return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


def run_in_fixed_batches(
    fn: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]],
    batch_size: int,
    *inputs: torch.Tensor,
    fill: bool = True,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """``fn(*inputs)`` computed in calls of exactly ``batch_size`` rows each (all inputs share their first axis).

    ``fn`` returns a tensor or a tuple of tensors whose first axis is the batch; the result has the same structure
    with ``inputs[0].shape[0]`` rows. ``fill=False`` runs a short last chunk as it is (chunks of at most
    ``batch_size`` rows: for functions that take any batch, e.g. eager ones).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = inputs[0].shape[0]
    if total == batch_size:
        return fn(*inputs)
    pieces: list[torch.Tensor | tuple[torch.Tensor, ...]] = []
    for start in range(0, total, batch_size):
        rows = min(batch_size, total - start)
        out = fn(*(_fill(x[start : start + rows], batch_size if fill else rows) for x in inputs))
        pieces.append(out[:rows] if isinstance(out, torch.Tensor) else tuple(o[:rows] for o in out))
    if isinstance(pieces[0], torch.Tensor):
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return tuple(torch.cat(parts) if len(parts) > 1 else parts[0] for parts in zip(*pieces, strict=True))
