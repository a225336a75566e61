"""Weight-only int8 / int4 linear layers for the text decoder (CPU and CUDA), built tensor by tensor at load.

- ``int8``: symmetric, one scale per output channel; ``torch._weight_int8pack_mm`` (bf16/fp16/fp32 activations).
- ``int4``: asymmetric, one scale and zero per ``group_size`` inputs of each output channel, in the layout of
  ``torch._weight_int4pack_mm_for_cpu``: ``w ~ (q - 8) * scale + zero`` with ``q`` in [0, 15].

On the CPU, bf16 rows go through gemma3n's VNNI row kernels where the CPU has them (:mod:`gemma3n.row_kernels`: up to
31 rows in decoding, and in prefill below ``ROW_KERNEL_PREFILL_ROWS``), otherwise through torch's own CPU kernels for
a few rows; from ``DEQUANTIZE_FROM_ROWS`` rows (prefill) the weight is otherwise dequantized to the activation dtype for
one float matmul, which keeps prefill at the float speed. On CUDA, int4 uses
torch's tensor-core kernel ``torch._weight_int4pack_mm`` (:class:`Int4CudaLinear`, same scales and zeros, bf16
activations), and int8 a float matmul on the converted weight: torch's CUDA ``_weight_int8pack_mm`` is a plain
one-thread-per-output loop, and under ``torch.compile`` the conversion fuses into the matmul's reads.

Why not torchao: torchao's CPU int4 path calls torch's kernel, and its eager int8
weight-only path converts the whole weight to the activation dtype on every call
(benchmarks/results/quant_kernels_cpu2.md).

Quantization reads each weight from the checkpoint's memory map in row chunks (a few MB of float32 at a time) and
then drops the mapped pages of that weight from this process (``madvise(MADV_DONTNEED)``), so the bf16 decoder is
never resident as a whole: peak memory stays near the size of the quantized weights.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .mapped_pages import file_mappings, release_mapped_pages
from .quantized_kernels import int4_product, int8_product, int8_rows_of_tiles, int8_tiles
from .row_kernels import (
    int4_row_kernel_product,
    int8_row_kernel_product,
    int8_tiles_row_kernel_product,
    row_kernel_ready,
    uses_int4_row_kernel,
    uses_int8_row_kernel,
)
from .text_model.linear import SMALL_WEIGHT_ELEMENTS, fused_int8_product, traced_small_product

QUANTIZE_MODES = ("int8", "int4")
DEFAULT_INT4_GROUP_SIZE = 64
INT4_GROUP_SIZES = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel takes
_CHUNK_ELEMENTS = 1 << 18  # float32 values quantized at once (1 MB: the passes over a chunk stay in cache)
_INT4_ROW_MULTIPLE = 64  # int4 rows are padded to whole 64-row blocks of torch's CPU packing
# From this many rows (prefill) a layer dequantizes its weight and runs the float matmul (oneDNN, AMX): the
# weight-only kernels are built for a few rows and were 3-6x slower than bf16 at 128-512 rows on this machine type.
DEQUANTIZE_FROM_ROWS = 32
_DEQUANTIZE_BLOCK_ELEMENTS = 1 << 24  # weights dequantized at once on that path (32 MB in bf16)
# Where the VNNI row kernels are ready (gemma3n.row_kernels), bf16 prefill products keep them below these row counts:
# they beat dequantizing the weight for a float matmul there. benchmarks/quantized_row_products.py, E2B's [8192, 2048]
# and [2048, 8192] on an AMD EPYC, 2 threads, ms per product, kernel against dequantized: int8 at 64 rows 3.7-4.2 /
# 5.0-5.1, at 128 rows 7.8-11.8 / 7.2-8.2; int4 (8-bit x, VPDPBUSD: results/quantized_row_products_int4_vpdpbusd.md)
# at 1024 rows 33.6 / 49.0 and 40.5 / 47.4, at 2048 rows 66.1 / 92.9 and 83.9 / 87.3, at 4096 rows 137 / 188 and
# 232 / 177 (every 4 x rows read the weight block from the cache, and every block reads all of x). int8 in tiles of
# 32 rows (Int8Linear.use_tiles; results/quantized_row_products_int8_tiles.md), tiled kernel against dequantized from
# the tiles: at 192 rows 10.3 / 11.4 and 9.1 / 10.0, at 256 rows 13.5 / 13.7 and 12.1 / 12.1, at 512 rows 25.8 / 21.7.
ROW_KERNEL_PREFILL_ROWS = {"int8": 64, "int8 tiles": 256, "int4": 2048}


def _chunk_rows(cols: int) -> int:
    """Rows per quantization chunk: about ``_CHUNK_ELEMENTS`` values, a multiple of 64 (int4 packs 64-row blocks)."""
    return max(64, _CHUNK_ELEMENTS // max(cols, 1) // 64 * 64)


def _pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """torch's CPU int4 layout for values 0..15 [n, in] uint8 (n a multiple of 64) -> [n, in / 2] uint8, as
    ``torch._convert_weight_to_int4pack_for_cpu`` writes it (checked in the tests), vectorised: in each block of 64
    rows, byte (k, j) holds row j's value at input k (low nibble) and row j + 32's (high nibble)."""
    n, in_f = q.shape
    blocks = q.view(n // 64, 2, 32, in_f)  # [n / 64, half, 32, in]
    return (blocks[:, 0] | (blocks[:, 1] << 4)).transpose(1, 2).reshape(n, in_f // 2)


def _unpack_int4_transposed(
    packed: torch.Tensor, out: torch.Tensor | None = None, nibbles: torch.Tensor | None = None
) -> torch.Tensor:
    """Inverse of :func:`_pack_int4_rows`, transposed: [n, in / 2] uint8 -> values 0..15 [in, n] uint8.

    Transposed is the packing's own order (32 rows' nibbles per input), so both passes copy runs of 32 bytes.
    ``out`` (n * in bytes) and ``nibbles`` (n * in / 2 bytes) are optional buffers to write into."""
    n, half = packed.shape
    blocks = packed.view(n // 64, 2 * half, 32)  # [n / 64, in, 32]: byte (k, j) holds rows j (low) and j + 32 (high)
    q_t = torch.empty(2 * half, n, dtype=torch.uint8, device=packed.device) if out is None else out
    q_t = q_t.view(2 * half, n // 64, 2, 32)  # [in, n / 64, half, 32]
    nibbles = torch.empty_like(blocks) if nibbles is None else nibbles.view_as(blocks)
    q_t[:, :, 0].copy_(torch.bitwise_and(blocks, 15, out=nibbles).transpose(0, 1))
    q_t[:, :, 1].copy_(torch.bitwise_right_shift(blocks, 4, out=nibbles).transpose(0, 1))
    return q_t.view(2 * half, n)


def _unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_int4_rows`: [n, in / 2] uint8 -> values 0..15 [n, in] uint8."""
    return _unpack_int4_transposed(packed).t().contiguous()


_scratch = threading.local()  # per thread: {(dtype, device): float buffer} for prefill dequantization


def _scratch_rows(dtype: torch.dtype, device: torch.device, rows: int, cols: int) -> torch.Tensor:
    """A reusable [rows, cols] float buffer (grown as needed, one per thread, dtype and device).

    Every prefill dequantizes every weight; a fresh tensor per block is a fresh memory mapping on Linux (glibc maps
    blocks over 32 MB, and below that returns freed blocks to the system) whose pages fault in again on every call:
    5-10x the cost of the conversion itself on this machine type (int8 [8192, 2048]: 53 ms fresh, 6 ms reused)."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (dtype, device)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: usable in place inside and outside inference mode
            buffer = buffers[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buffer[: rows * cols].view(rows, cols)


def _dequantized_linear(
    x: torch.Tensor, rows_of_weight: Callable[..., torch.Tensor], out_features: int, in_features: int
) -> torch.Tensor:
    """``x @ W^T`` [.., out] through float matmuls, dequantizing ``W`` a block of output rows at a time (``rows_of_
    weight(dtype, start, stop, out=)``) into one reused buffer, so a big weight (the LM head) is never materialised
    whole in float and no block allocates."""
    block = max(64, _DEQUANTIZE_BLOCK_ELEMENTS // in_features // 64 * 64)
    parts = []
    for start in range(0, out_features, block):
        stop = min(start + block, out_features)
        scratch = _scratch_rows(x.dtype, x.device, -(-(stop - start) // 64) * 64, in_features)
        parts.append(F.linear(x, rows_of_weight(x.dtype, start, stop, out=scratch)))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _int8_rows(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype,
    start: int = 0,
    stop: int | None = None,
    out: torch.Tensor | None = None,
    tiled: bool = False,
) -> torch.Tensor:
    """:meth:`Int8Linear.dequantized` of the weight ``qweight`` [out, in] int8 (``tiled``: in tiles of 32 rows, and
    ``start`` and ``stop`` multiples of 32) with ``scales`` [out]."""
    q, scales = qweight[start:stop], scales[start:stop]  # whole tiles: a tile holds the bytes of its 32 rows
    if out is None or scales.dtype != dtype:
        weight = ((int8_rows_of_tiles(q) if tiled else q).float() * scales.float()[:, None]).to(dtype)
        return weight if out is None else out[: weight.shape[0]].copy_(weight)
    # int8 values are exact in any float dtype, and q * scale rounds once, as the float32 product above does
    if tiled:  # back in rows, in a reused int8 buffer, then converted as rows are
        q = int8_rows_of_tiles(q, out=_scratch_rows(torch.int8, q.device, *q.shape))
    return out[: q.shape[0]].copy_(q).mul_(scales[:, None])


def _int4_rows(
    packed: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group_size: int,
    out_features: int,
    dtype: torch.dtype,
    start: int = 0,
    stop: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:meth:`Int4Linear.dequantized` of the weight in torch's CPU int4 packing (``packed`` [ceil64(out), in / 2],
    ``scales_and_zeros`` [in / group, ceil64(out), 2])."""
    stop = out_features if stop is None else min(stop, out_features)
    end = -(-stop // 64) * 64  # whole packed blocks
    n, in_f = end - start, scales_and_zeros.shape[0] * group_size
    rows = packed[start:end]
    if out is None:  # a one-off call: no work space kept
        out = torch.empty(n, in_f, dtype=dtype, device=rows.device)
        q_t = _unpack_int4_transposed(rows)
    else:  # the prefill path: the uint8 work space is reused too
        scratch = _scratch_rows(torch.uint8, rows.device, 3, n * in_f // 2)
        q_t = _unpack_int4_transposed(rows, out=scratch[1:], nibbles=scratch[0])
    q_t = q_t.sub_(8).view(torch.int8)  # q^T - 8 [in, n] in -8..7 (wrapping in uint8, read back as int8)
    weight_t = out.view(-1)[: n * in_f].view(in_f // group_size, group_size, n)  # [groups, size, rows]
    weight_t.copy_(q_t.view_as(weight_t))  # exact in any float dtype
    scale, zero = (t.contiguous() for t in scales_and_zeros[:, start:end].to(dtype).unbind(-1))  # [groups, rows]
    weight_t.mul_(scale[:, None]).add_(zero[:, None])
    return weight_t.view(in_f, n)[:, : stop - start].T


# Prefill products of quantized weights are custom ops: torch.compile (the compiled prefill, see
# gemma3n.text_model.layers.compiled_blocks) calls them as opaque kernels instead of tracing the block-wise
# dequantization into reused per-thread buffers.
@torch.library.custom_op("gemma3n::int8_prefill_linear", mutates_args=())
def int8_prefill_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, tiled: bool) -> torch.Tensor:
    """``x @ (qweight * scales)^T`` [.., out] (many rows, CPU; ``tiled``: the weight in tiles of 32 rows): through
    the VNNI row kernel below ``ROW_KERNEL_PREFILL_ROWS["int8"]`` (tiled: ``["int8 tiles"]``) bf16 rows where it is
    ready, else :func:`_dequantized_linear`."""
    out_features, in_features = qweight.shape
    rows_2d = x.reshape(-1, in_features)  # [n, in]
    limit = ROW_KERNEL_PREFILL_ROWS["int8 tiles" if tiled else "int8"] - 1
    if uses_int8_row_kernel(rows_2d, qweight, max_rows=limit):
        product = int8_tiles_row_kernel_product if tiled else int8_row_kernel_product
        return product(rows_2d, qweight, scales).view(*x.shape[:-1], out_features)
    rows = functools.partial(_int8_rows, qweight, scales, tiled=tiled)
    return _dequantized_linear(x, rows, out_features, in_features)


@int8_prefill_linear.register_fake
def _(x, qweight, scales, tiled):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("gemma3n::int4_prefill_linear", mutates_args=())
def int4_prefill_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int
) -> torch.Tensor:
    """``x @ W^T`` [.., out] for the int4 weight of :class:`Int4Linear` (many rows, CPU): through the VNNI row kernel
    below ``ROW_KERNEL_PREFILL_ROWS["int4"]`` bf16 rows where it is ready, else :func:`_dequantized_linear`."""
    rows_2d = x.reshape(-1, scales_and_zeros.shape[0] * group_size)  # [n, in]
    limit = ROW_KERNEL_PREFILL_ROWS["int4"] - 1
    if uses_int4_row_kernel(rows_2d, packed, scales_and_zeros, group_size, max_rows=limit):
        out = int4_row_kernel_product(rows_2d, packed, scales_and_zeros, group_size, out_features)
        return out.view(*x.shape[:-1], out_features)
    rows = functools.partial(_int4_rows, packed, scales_and_zeros, group_size, out_features)
    return _dequantized_linear(x, rows, out_features, scales_and_zeros.shape[0] * group_size)


@int4_prefill_linear.register_fake
def _(x, packed, scales_and_zeros, group_size, out_features):
    return x.new_empty(*x.shape[:-1], out_features)


class Int8Linear(nn.Module):
    """``y = x @ (q * scale)^T`` with ``q`` int8 [out, in] and one ``scale`` per output channel [out].

    On a CPU with the VNNI row kernel, large bf16-scaled weights are kept in tiles of 32 output rows
    (:meth:`use_tiles`, done at load by :func:`tile_int8_layers`), which the tiled kernel reads faster; ``qweight``
    keeps its shape, and state dicts hold the rows (:meth:`rows_qweight`) whatever the layout."""

    prefill_is_custom_op = True  # many-row CPU products: int8_prefill_linear (torch.compile does not trace inside)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight)  # [out, in] int8, in rows or (tiled) in tiles of 32 rows
        self.register_buffer("scales", scales)  # [out], the activation dtype
        self.tiled = False
        self._register_state_dict_hook(_int8_rows_in_state_dict)
        self._register_load_state_dict_pre_hook(_int8_tiles_from_state_dict, with_module=True)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype | None = None) -> Int8Linear:
        """Quantize a float weight [out, in] (row chunk by row chunk); scales are kept in ``dtype``."""
        dtype = dtype or weight.dtype
        out_f, in_f = weight.shape
        qweight = torch.empty(out_f, in_f, dtype=torch.int8, device=weight.device)
        scales = torch.empty(out_f, dtype=dtype, device=weight.device)
        step = _chunk_rows(in_f)
        for start in range(0, out_f, step):
            w = weight[start : start + step].to(torch.float32, copy=True)  # [rows, in]
            lo, hi = torch.aminmax(w, dim=1)
            # the rounded scale is the one the kernel uses, so quantize against it: error <= scale / 2 per weight
            scale = (torch.maximum(hi, -lo) / 127).to(dtype)
            inverse = torch.where(scale > 0, 1 / scale.float(), 0.0)
            qweight[start : start + w.shape[0]] = w.mul_(inverse[:, None]).round_().clamp_(-127, 127)
            scales[start : start + w.shape[0]] = scale
        return cls(qweight, scales)

    def dequantized(
        self,
        dtype: torch.dtype = torch.float32,
        start: int = 0,
        stop: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weight the kernel effectively multiplies by, output rows ``start:stop`` [rows, in] (written into the
        first rows of ``out`` when given; tiled: ``start`` and ``stop`` multiples of 32)."""
        return _int8_rows(self.qweight, self.scales, dtype, start, stop, out, tiled=self.tiled)

    def rows_qweight(self) -> torch.Tensor:
        """The int8 weight [out, in] in rows, whatever the layout (a copy when tiled)."""
        return int8_rows_of_tiles(self.qweight) if self.tiled else self.qweight

    def can_tile(self) -> bool:
        """Whether :meth:`use_tiles` would tile this weight: on the CPU, with the row kernel ready, bf16 scales (the
        kernel takes bf16 rows), outputs a multiple of 32, inputs even, and larger than the weights that compiled
        steps fuse (``SMALL_WEIGHT_ELEMENTS``)."""
        q = self.qweight
        return (
            q.device.type == "cpu"
            and self.scales.dtype == torch.bfloat16
            and self.out_features % 32 == 0
            and self.in_features % 2 == 0
            and q.numel() > SMALL_WEIGHT_ELEMENTS
            and row_kernel_ready()
        )

    def use_tiles(self, enable: bool = True) -> bool:
        """Put the weight in tiles of 32 output rows (``enable=False``: back in rows), in place, a few MB at a time;
        only where :meth:`can_tile`. Returns whether it is tiled now. Products give the same outputs either way."""
        if enable == self.tiled or (enable and not self.can_tile()):
            return self.tiled
        convert = int8_tiles if enable else int8_rows_of_tiles
        q = self.qweight.contiguous()
        step = max(32, _CHUNK_ELEMENTS // self.in_features // 32 * 32)  # whole tiles: each keeps its rows' bytes
        for start in range(0, self.out_features, step):
            chunk = q[start : start + step]
            chunk.copy_(convert(chunk))
        self.qweight, self.tiled = q, enable
        return self.tiled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if x.device.type != "cpu":  # int8 values are exact in bf16 / fp16: scale after the matmul, as the kernel does
            return F.linear(x, self.rows_qweight().to(x.dtype)) * scales
        rows = x.reshape(-1, self.in_features)  # [n, in]
        if rows.shape[0] >= DEQUANTIZE_FROM_ROWS:
            return int8_prefill_linear(x, self.qweight, self.scales, self.tiled)
        if self.tiled:
            return int8_product(rows, self.qweight, scales, tiled=True).view(*x.shape[:-1], self.out_features)
        # large weights, and small ones for 2-4 rows, go to the VNNI row kernel where it is ready: inductor's fused
        # multiply-and-sum converts each weight to float32 once per row, and E2B's 120 small int8 products (LAuReL,
        # per-layer gate and projection) took about 8 ms of a compiled batch-4 step that way (AMD EPYC; the step
        # went from 86.3 and 86.8 ms to 79.3 and 77.5 on the kernel), while one row keeps the fused product
        on_kernel = self.qweight.numel() > SMALL_WEIGHT_ELEMENTS or rows.shape[0] > 1
        if traced_small_product(rows.shape[0], self.qweight) and not (
            on_kernel and uses_int8_row_kernel(rows, self.qweight)
        ):
            # a small (or, for one row, fast-fused) weight as a multiply-and-sum (see gemma3n.text_model.linear)
            out = fused_int8_product(rows, self.qweight, scales)
        else:
            out = int8_product(rows, self.qweight, scales)  # [n, out]
        return out.view(*x.shape[:-1], self.out_features)

    def transposed_qweight(self) -> torch.Tensor:
        """A transposed copy of the weight [in, out] int8: input column ``c`` is row ``c`` (for sparse decode,
        :mod:`gemma3n.text_model.sparse_decode`); the scales stay one per output."""
        return self.rows_qweight().t().contiguous()

    def extra_repr(self) -> str:
        tiles = ", in tiles of 32 rows" if self.tiled else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel{tiles}"


def _int8_rows_in_state_dict(module: Int8Linear, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """State dicts hold an :class:`Int8Linear`'s weight in rows, tiled or not."""
    if module.tiled:
        state_dict[prefix + "qweight"] = module.rows_qweight()


def _int8_tiles_from_state_dict(module: Int8Linear, state_dict: dict, prefix: str, *args) -> None:
    """Loading a state dict (weights in rows) into a tiled :class:`Int8Linear` tiles them."""
    q = state_dict.get(prefix + "qweight")
    if module.tiled and q is not None and q.shape == module.qweight.shape:
        state_dict[prefix + "qweight"] = int8_tiles(q)


class Int4Linear(nn.Module):
    """Group-wise int4 weight in torch's CPU packing: two 4-bit values per byte [out, in / 2], plus
    ``scales_and_zeros`` [in / group_size, out, 2] in the activation dtype."""

    prefill_is_custom_op = True  # many-row CPU products: int4_prefill_linear (torch.compile does not trace inside)

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int):
        super().__init__()
        self.out_features = out_features  # packed rows are padded to a multiple of 64 (zero rows)
        self.in_features = scales_and_zeros.shape[0] * group_size
        self.group_size = group_size
        self.register_buffer("packed", packed)  # [ceil64(out), in / 2] uint8
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in / group, ceil64(out), 2]

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, group_size: int = DEFAULT_INT4_GROUP_SIZE, dtype: torch.dtype | None = None
    ) -> Int4Linear:
        """Quantize a float weight [out, in] with min/max per group of ``group_size`` inputs (row chunk by chunk)."""
        dtype = dtype or weight.dtype
        out_f, in_f = weight.shape
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size={group_size}: use one of {INT4_GROUP_SIZES} (torch's CPU int4 kernel)")
        if in_f % group_size:
            raise ValueError(
                f"int4 needs in_features divisible by group_size={group_size}; got a weight of shape "
                f"{tuple(weight.shape)}"
            )
        rows = -(-out_f // _INT4_ROW_MULTIPLE) * _INT4_ROW_MULTIPLE
        groups = in_f // group_size
        packed = torch.empty(rows, in_f // 2, dtype=torch.uint8, device=weight.device)
        scales_and_zeros = torch.empty(groups, rows, 2, dtype=dtype, device=weight.device)
        step = _chunk_rows(in_f)
        for start in range(0, rows, step):
            w = weight[start : start + step].to(torch.float32, copy=True)
            n = min(step, rows - start)
            if w.shape[0] < n:  # the zero rows padding the last chunk to a multiple of 64
                w = torch.cat([w, w.new_zeros(n - w.shape[0], in_f)])
            w = w.view(n, groups, group_size)
            lo, hi = torch.aminmax(w, dim=-1)  # [n, groups]
            # a constant group keeps its value exactly: q = 0 with scale |lo| and zero lo + 8 |lo|
            scale = torch.where(hi > lo, (hi - lo) / 15, lo.abs()).clamp_min(torch.finfo(dtype).tiny).to(dtype)
            zero = (lo + 8 * scale.float()).to(dtype)
            # q = (w - zero) / scale + 8 against the rounded scale and zero the kernel will use: error <= scale / 2
            inverse = 1 / scale.float()
            offset = 8 - zero.float() * inverse
            q = torch.addcmul(offset[..., None], w, inverse[..., None]).round_().clamp_(0, 15).to(torch.uint8)
            packed[start : start + n] = _pack_int4_rows(q.view(n, in_f))
            scales_and_zeros[:, start : start + n] = torch.stack([scale, zero], dim=-1).transpose(0, 1)
        return cls(packed, scales_and_zeros, group_size, out_f)

    def dequantized(
        self,
        dtype: torch.dtype = torch.float32,
        start: int = 0,
        stop: int | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The weight ``(q - 8) * scale + zero``, output rows ``start:stop`` (``start`` a multiple of 64) [rows, in].

        Computed transposed ([in, rows], returned as a [rows, in] view), in the first elements of ``out`` when given
        (room for whole blocks of 64 rows): that is the packing's own order, 32 rows' nibbles per input, and the
        order of the scales [groups, rows], so every pass runs over contiguous memory."""
        weight = (self.packed, self.scales_and_zeros, self.group_size, self.out_features)
        return _int4_rows(*weight, dtype, start, stop, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [n, in]
        if rows.shape[0] >= DEQUANTIZE_FROM_ROWS:
            return int4_prefill_linear(x, self.packed, self.scales_and_zeros, self.group_size, self.out_features)
        out = int4_product(rows, self.packed, self.scales_and_zeros, self.group_size, self.out_features)  # [n, out]
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


def _tinygemm_inner_k_tiles(in_features: int) -> int:
    """The widest k-tiling (8, 4 or 2 tiles of 16 inputs) of torch's CUDA int4 layout that divides ``in_features``."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"int4 on CUDA needs in_features divisible by 32; got {in_features}")


class Int4CudaLinear(nn.Module):
    """:class:`Int4Linear`'s weights in the layout of torch's CUDA int4 kernel ``torch._weight_int4pack_mm``
    (tensor-core tiles, int32 [ceil64(out) / 8, in / (16 * tiles), 32, tiles / 2]); the same ``(q - 8) * scale + zero``
    per group, so both give the same weight. The kernel takes and returns bf16."""

    def __init__(self, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, out_features: int):
        super().__init__()
        self.out_features = out_features
        self.in_features = scales_and_zeros.shape[0] * group_size
        self.group_size = group_size
        self.register_buffer("packed", packed)  # int32, the kernel's tiled layout
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # [in / group, ceil64(out), 2] bf16

    @classmethod
    def from_int4_linear(cls, layer: Int4Linear, device: torch.device | str) -> Int4CudaLinear:
        """Re-pack a CPU-layout :class:`Int4Linear` for the CUDA kernel on ``device`` (bit-identical values)."""
        q = _unpack_int4_rows(layer.packed).to(device)  # [ceil64(out), in] values 0..15
        # the kernel's input: [n, in / 2] uint8, input 2j in the high nibble and 2j + 1 in the low one
        pairs = (q[:, 0::2] << 4) | q[:, 1::2]
        tiles = _tinygemm_inner_k_tiles(layer.in_features)
        packed = torch._convert_weight_to_int4pack(pairs.contiguous(), tiles)
        scales_and_zeros = layer.scales_and_zeros.to(device=device, dtype=torch.bfloat16)
        return cls(packed, scales_and_zeros, layer.group_size, layer.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # [n, in]
        out = torch._weight_int4pack_mm(rows, self.packed, self.group_size, self.scales_and_zeros)  # [n, out64]
        if out.shape[1] != self.out_features:
            out = out[:, : self.out_features]
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        sizes = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{sizes}, int4 group_size={self.group_size} (CUDA)"


def for_device(layer: nn.Module, device: torch.device | str) -> nn.Module:
    """A quantized layer ready for ``device``: CPU layers as they are (int8 is tiled once attached, see
    :func:`tile_int8_layers`); on CUDA, int4 re-packed for the CUDA kernel (bf16 activations only) and int8 moved as
    is."""
    device = torch.device(device)
    if device.type == "cpu":
        return layer
    if device.type != "cuda":
        raise ValueError(f"quantized layers run on the CPU or on CUDA; got device={device}")
    if isinstance(layer, Int4Linear):
        return Int4CudaLinear.from_int4_linear(layer, device)
    return layer.to(device)


def tile_int8_layers(model: nn.Module) -> int:
    """Put every :class:`Int8Linear` of ``model`` that qualifies (:meth:`Int8Linear.can_tile`) in tiles of 32 rows,
    in place; returns how many. The loaders call it once the weights are attached (a state dict holds rows, so
    tiling before would make a rows copy of each weight) and before sparse decode takes its layers back in rows."""
    return sum(module.use_tiles() for module in model.modules() if isinstance(module, Int8Linear))


def quantize_weight(
    weight: torch.Tensor, mode: str, *, dtype: torch.dtype, group_size: int = DEFAULT_INT4_GROUP_SIZE
) -> nn.Module:
    """An :class:`Int8Linear` or :class:`Int4Linear` for a float weight [out, in]."""
    if mode == "int8":
        return Int8Linear.from_weight(weight, dtype)
    if mode == "int4":
        return Int4Linear.from_weight(weight, group_size, dtype)
    raise ValueError(f"unknown quantize={mode!r}; use one of {', '.join(QUANTIZE_MODES)} or None")


def is_quantizable(linear: nn.Linear, mode: str, group_size: int = DEFAULT_INT4_GROUP_SIZE) -> bool:
    """Whether a bias-free linear layer gets quantized: at least 16 inputs and outputs (the AltUp router and
    coefficient layers, a few thousand weights, stay exact), and for int4 inputs divisible by ``group_size``."""
    if linear.bias is not None or linear.in_features < 16 or linear.out_features < 16:
        return False
    if mode == "int4":
        return linear.in_features % group_size == 0
    return True


def quantize_checkpoint(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    mode: str,
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    prefix: str = "language_model.",
    group_size: int | None = None,
    lm_head: bool = True,
) -> dict[str, torch.Tensor]:
    """Quantize the text decoder of a model built on the meta device, straight from the checkpoint's tensors.

    Each eligible ``nn.Linear`` under ``prefix`` is replaced by its quantized module, built from the memory-mapped
    checkpoint weight (whose pages are then released), and the LM head gets its own quantized copy of the tied token
    embedding (``TextModel.lm_head``); the embedding tables themselves stay row gathers from the file. Returns the
    tensors to attach: ``tensors`` without the consumed weights, plus the quantized modules' buffers.
    ``group_size`` (int4) defaults to ``DEFAULT_INT4_GROUP_SIZE``. ``lm_head=False`` (classifier heads) makes no
    quantized copy of the tied table; an untied LM head (a ``Linear`` named ``lm_head``) is quantized like any layer.
    """
    group_size = group_size or DEFAULT_INT4_GROUP_SIZE
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize={mode!r}; use one of {', '.join(QUANTIZE_MODES)} or None")
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"quantize={mode!r} runs on the CPU or on CUDA; got device={device}")
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"quantize={mode!r} needs a float activation dtype, got {dtype}")
    if device.type == "cuda" and mode == "int4" and dtype != torch.bfloat16:
        raise ValueError(f"quantize='int4' on CUDA needs dtype=bfloat16 (torch's CUDA int4 kernel); got {dtype}")
    if device.type == "cpu" and dtype == torch.float32:
        warnings.warn(
            f"quantize={mode!r} with float32 activations: torch's CPU int8 / int4 kernels run about 8x / 27x slower "
            "on float32 than on bfloat16 inputs (slower than the float32 model itself); dtype='bfloat16' is fast",
            stacklevel=3,
        )
    text_model = model.get_submodule(prefix.rstrip("."))
    remaining = dict(tensors)
    jobs = {  # module name in the text model -> source weight [out, in]
        name: remaining.pop(f"{prefix}{name}.weight")
        for name, module in text_model.named_modules()
        if isinstance(module, nn.Linear)
        and is_quantizable(module, mode, group_size)
        and f"{prefix}{name}.weight" in remaining  # else attach_weights reports it missing
    }
    if lm_head and "lm_head" not in jobs and f"{prefix}embed_tokens.weight" in remaining:
        jobs["lm_head"] = remaining[f"{prefix}embed_tokens.weight"]  # the tied table stays for the row gathers
    mappings = file_mappings()

    def run(name: str) -> tuple[str, nn.Module]:
        quantized = quantize_weight(jobs[name], mode, dtype=dtype, group_size=group_size)
        release_mapped_pages(jobs[name], mappings)
        return name, for_device(quantized, device)

    # One tensor per worker thread, each op single-threaded: no OpenMP barriers per small op, which on a busy
    # machine made 2-thread ops 4-9x slower than 1 thread (an 8192x2048 int4 weight: 2.4 s vs 0.30 s).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            done = pool.map(run, sorted(jobs, key=lambda n: -jobs[n].numel()))  # biggest first: balanced workers
            for name, quantized in tqdm(done, total=len(jobs), desc=f"quantizing to {mode}", disable=None):
                if name == "lm_head":
                    text_model.lm_head = quantized
                else:
                    text_model.set_submodule(name, quantized)
                remaining.update({f"{prefix}{name}.{k}": v for k, v in quantized.state_dict().items()})
    finally:
        torch.set_num_threads(threads)
    return remaining
