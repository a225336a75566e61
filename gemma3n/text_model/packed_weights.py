"""bf16 decoder weights packed once for oneDNN, for batched and eager decoding on the CPU.

``F.linear`` hands oneDNN each bf16 weight in its plain [out, in] layout, and oneDNN re-blocks it on every call. A
copy packed once in oneDNN's own layout (:func:`gemma3n.text_model.linear.pack_weight`) skips that work: on an AMD
EPYC (Zen 4, 2 cores) E2B's matrices streamed at 25-31 GB/s from 1 to 4 rows against 18-21 for ``F.linear``
(``benchmarks/packed_products.py``), with the same bits, and prefill products ran 3-8% faster. Only the compiled
one-row step reads the dense weights faster (inductor's fused reductions, 29-33 GB/s), so it keeps them. Where the
CPU has AVX512-BF16, the row kernel (:mod:`gemma3n.row_kernels`) reads the dense weights of 1-4 row
products at the memory's read bandwidth; the probe (:func:`packing_speedup`) then times packing against it, and on the
AMD EPYC packing no longer pays for one-row steps (and at best breaks even for four).

The copy replaces the dense weight in resident memory: the dense weight's memory-mapped pages are dropped after
packing and only the file keeps them. The exceptions are the up projections of the sparse MLP layers, whose rows
single-row sparse steps gather (:mod:`gemma3n.text_model.sparse_decode`).

Packing reads and writes every weight once (about 7 s for E2B on 2 cores), so generation packs only when the job
decodes enough steps on this path for that to pay (:func:`pack_if_pays`), and only where this CPU's packed product
is measured faster (:func:`packing_speedup`). Once packed, a model stays packed; :func:`pack_decoder` with
``enable=False`` drops the copies.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..mapped_pages import file_mappings
from ..row_kernels import row_kernel_product, uses_row_kernel
from .linear import (
    FEW_ROWS,
    SMALL_WEIGHT_ELEMENTS,
    Linear,
    _best_seconds,
    _probe_operands,
    pack_weight,
    packed_copy,
    packed_product,
    unpack_weight,
)

PACKED_WEIGHTS_ENV = "GEMMA3N_PACKED_WEIGHTS"  # "1": pack whenever possible, "0": never; unset: pack when it pays
# Decode steps after which packing pays, for steps of one row and of several. Packing E2B took about 7.4 s on 2 cores
# of the AMD EPYC (every weight read and written once); one-row eager steps then took 283 ms instead of 313, and 4-row
# steps 192 instead of 385 (eager) and 195 instead of 310 (compiled): break-even after about 245 and 40-65 steps.
# Both the cost and the saving scale with the weight bytes, so these hold for other model sizes too.
PACK_PAYS_AFTER_STEPS = {1: 256, 2: 64}  # rows per step (1, or 2 and more) -> planned steps
# Weights this small stay plain: a product's call costs more than its bytes. Weights up to SMALL_WEIGHT_ELEMENTS (E2B's
# per-layer gate and projection, LAuReL) are packed for steps of several rows, where inductor's fused 4-row
# reductions read them at 5-11 GB/s (0.5-0.7 ms of each layer of a 4-row E2B step), but compiled one-row steps keep
# their fused multiply-and-sum over the dense weight, whose pages therefore stay resident (75 MB for E2B).
MIN_PACKED_ELEMENTS = 1 << 16
HEAD_BLOCK_ROWS = 32768  # rows of the tied LM head table per packed block (128 MB of E2B's bf16 table)
MIN_SPEEDUP = 1.1  # the packed product must be this much faster than F.linear on this CPU (probe) to pack
_speedups: dict[int, float] = {}  # rows -> F.linear time / packed time on the probe weight, measured once


def decoder_of(model: Any) -> nn.Module | None:
    """The text decoder of a Gemma 3n model (``language_model``) or of a Gemma / Gemma 2 head (``model``)."""
    for name in ("language_model", "model"):
        decoder = getattr(model, name, None)
        if decoder is not None and hasattr(decoder, "packed_head"):
            return decoder
    return None


def _sparse_up_weights(decoder: nn.Module) -> set[int]:
    """ids of the up-projection weights whose rows sparse decode steps gather (they stay resident)."""
    return {
        id(module.up_proj.weight)
        for module in decoder.modules()
        if getattr(module, "sparse_decode", None) is not None and hasattr(module, "up_proj")
    }


def packable_linears(decoder: nn.Module) -> list[Linear]:
    """The decoder's ``Linear`` layers whose products a packed copy speeds up: bf16 CPU weights, bias-free, of more
    than ``MIN_PACKED_ELEMENTS`` elements."""
    return [
        module
        for module in decoder.modules()
        if isinstance(module, Linear)
        and module.bias is None
        and module.weight.device.type == "cpu"
        and module.weight.dtype == torch.bfloat16
        and module.weight.numel() > MIN_PACKED_ELEMENTS
    ]


def pack_decoder(decoder: nn.Module, enable: bool = True) -> int:
    """Give every packable ``Linear`` of ``decoder`` (and its tied LM head table, in blocks of ``HEAD_BLOCK_ROWS``
    rows) a oneDNN-packed copy, or drop the copies (``enable=False``); returns how many weights and head blocks have
    one afterwards."""
    table = decoder.embed_tokens.weight
    tied = decoder.lm_head is None and table.device.type == "cpu" and table.dtype == torch.bfloat16
    keep_resident = _sparse_up_weights(decoder)
    mappings = file_mappings()  # read once: /proc/self/maps is long
    count = 0
    for module in packable_linears(decoder):
        if enable:
            small = module.weight.numel() <= SMALL_WEIGHT_ELEMENTS  # read dense by compiled one-row steps
            release = id(module.weight) not in keep_resident and not small
            module.packed = pack_weight(module.weight, release=release, mappings=mappings)
        else:
            unpack_weight(module.weight)
            module.packed = False
        count += module.packed
    current = decoder.packed_head
    if enable and tied and current and current[0].data_ptr() == table.data_ptr():
        if all(packed_copy(block) is not None for block in current):
            return count + len(current)  # the head is packed already
    for block in current:
        unpack_weight(block)
    decoder.packed_head = ()
    if tied and enable:
        # in row blocks: each block's dense pages are dropped as soon as its copy exists, so packing the 1.07 GB E2B
        # head holds one block twice, not the whole table
        blocks = table.detach().split(HEAD_BLOCK_ROWS)  # views, kept alive by the decoder (the copies' keys)
        if all(pack_weight(block, mappings=mappings) for block in blocks):
            decoder.packed_head = blocks
        count += len(decoder.packed_head)
    return count


def is_packed(model: Any) -> bool:
    """Whether the model's decoder has its packed copies (:func:`pack_decoder`)."""
    decoder = decoder_of(model)
    return decoder is not None and (bool(decoder.packed_head) or any(m.packed for m in packable_linears(decoder)))


@torch.compiler.disable
def packing_speedup(rows: int) -> float:
    """The dense weight's product time over the packed product's for ``rows`` rows of a 64 MB bf16 weight on this
    CPU (measured once per process and row count: best of three, after one untimed call). The dense product is the
    one unpacked decode steps use: the row kernel where it is ready (:mod:`gemma3n.row_kernels`; on the AMD
    EPYC it read one row's weight faster than the packed product, so one-row jobs no longer pack), else ``F.linear``."""
    rows = min(max(rows, 1), FEW_ROWS)
    if rows not in _speedups:
        row, weight = _probe_operands()
        x = row.expand(rows, -1).contiguous()
        dense = row_kernel_product if uses_row_kernel(x, weight) else F.linear
        pack_weight(weight)
        best = _best_seconds({"linear": lambda: dense(x, weight), "packed": lambda: packed_product(x, weight)})
        unpack_weight(weight)
        _speedups[rows] = best["linear"] / best["packed"]
    return _speedups[rows]


def pack_pays(model: Any, rows: int, steps: int, compiled: bool) -> bool:
    """Whether a job decoding ``rows`` rows per step for ``steps`` planned steps should pack ``model``'s weights: a
    bf16 decoder on the CPU, steps other than the compiled one-row step (which reads the dense weights faster), at
    least ``PACK_PAYS_AFTER_STEPS[1 or 2 rows]`` of them, and the packed product measured faster here
    (``MIN_SPEEDUP``).
    ``GEMMA3N_PACKED_WEIGHTS=1`` / ``0`` overrides the job and speed conditions."""
    setting = os.environ.get(PACKED_WEIGHTS_ENV)
    if setting not in (None, "", "0", "1"):
        raise ValueError(f"{PACKED_WEIGHTS_ENV}={setting!r}: use 1 (pack) or 0 (never)")
    if setting == "0" or (not setting and ((compiled and rows == 1) or steps < PACK_PAYS_AFTER_STEPS[min(rows, 2)])):
        return False  # decided without walking the model: what most generate calls hit
    decoder = decoder_of(model)
    if decoder is None or not packable_linears(decoder):
        return False
    return setting == "1" or packing_speedup(rows) >= MIN_SPEEDUP


def pack_if_pays(model: Any, rows: int, steps: int, compiled: bool) -> bool:
    """Pack ``model``'s decoder weights when :func:`pack_pays` says so (once: a packed model stays packed); returns
    whether the model is packed now."""
    if is_packed(model):
        return True
    if not pack_pays(model, rows, steps, compiled):
        return False
    return pack_decoder(decoder_of(model)) > 0
