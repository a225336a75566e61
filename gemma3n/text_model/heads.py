"""What turns a decoder's final hidden states into outputs, for every model of the family: the (tied) LM head with
its logit soft-cap, and the pooling of the sequence-classification head."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..row_kernels import row_kernel_product, uses_row_kernel
from .linear import (
    fused_small_product,
    packed_product,
    traced_small_product,
    use_weight_major,
    weight_major_columns,
)


@dataclass
class ModelOutput:
    """Forward result: ``logits`` [B, T, vocab] (language models), [B, labels] or [B, T, labels] (classifiers)."""

    logits: torch.Tensor


def lm_head_logits(
    hidden: torch.Tensor,
    table: torch.Tensor,
    lm_head: nn.Module | None,
    softcap: float | None,
    packed_blocks: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """Logits [B, T, vocab] from hidden [B, T, H] through ``lm_head`` or, when None, the tied table [vocab, H]
    (``packed_blocks``: the table's consecutive row blocks, each with a oneDNN-packed copy, see
    :mod:`gemma3n.text_model.packed_weights`); then ``softcap * tanh(logits / softcap)`` when a final soft-cap is
    set."""
    rows = hidden.numel() // hidden.shape[-1]
    if lm_head is not None:  # a separate head (untied, or the quantized copy from gemma3n.quantize)
        logits = lm_head(hidden)
    elif packed_blocks and hidden.device.type == "cpu":
        logits = torch.cat([packed_product(hidden, block) for block in packed_blocks], dim=-1)  # [B, T, vocab]
    elif uses_row_kernel(hidden, table):
        logits = row_kernel_product(hidden, table)  # few rows: the table streamed at read bandwidth
    elif hidden.device.type == "cpu" and traced_small_product(rows, table):
        logits = fused_small_product(hidden, table)  # a compiled one-row step, where that streams the table fastest
    elif use_weight_major(hidden, table):
        # Where oneDNN runs F.linear's bf16 shape (few rows against the 262k-row table) as a slow matrix-vector
        # product (Xeons with AMX), table @ rows^T streams the table at memory bandwidth: 1.6x (1 row) to 4x (4 rows)
        # faster there. The soft-cap runs on that contiguous [vocab, m] product, where it vectorises (on the
        # transposed view it ran element by element: 8 ms of a compiled E2B decode step), and the [n, vocab] result
        # stays a view (no copy of the biggest buffer). fp32 BLAS has a fast matrix-vector kernel, which the padded
        # product would be slower than (about 2x for one row).
        columns = weight_major_columns(hidden, table)  # [vocab, m]
        if softcap is not None:
            columns = soft_cap_(columns, softcap)
        return columns[:, :rows].T.reshape(*hidden.shape[:-1], table.shape[0])
    else:
        logits = F.linear(hidden, table.to(hidden.device))
    if softcap is not None:
        logits = soft_cap_(logits, softcap)
    return logits


def soft_cap_(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """``softcap * tanh(logits / softcap)``, in place: the [B, T, vocab] buffer is the big one."""
    return logits.div_(softcap).tanh_().mul_(softcap)


def last_token_index(input_ids: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """Per row, the index of the last token that is not ``pad_token_id`` [B] (left or right padding alike).

    Without a pad id every row is taken at its last position (then only batch 1 is unambiguous).
    """
    B, T = input_ids.shape
    if pad_token_id is None:
        if B != 1:
            raise ValueError("the model has no pad_token_id, so a batch of several rows cannot be pooled; pass one")
        return torch.full((B,), T - 1, dtype=torch.long, device=input_ids.device)
    positions = torch.arange(T, device=input_ids.device)
    return (positions * (input_ids != pad_token_id)).argmax(-1)
