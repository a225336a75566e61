"""One Gemma 3n decoder layer: AltUp around attention + LAuReL + sparse gated MLP + per-layer-embedding gate."""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextConfig
from ..modules import RMSNorm, gelu, in_dtype
from .gemma3n_attention import Gemma3nAttention
from .kv_cache import AttentionContext
from .linear import FEW_ROWS, Linear
from .mlp import MLP
from .sparse_decode import SparseDecodeProduct, sparse_decode_product


class SparseMLP(MLP):
    """Gemma 3n's MLP: with ``sparsity`` > 0 the gate keeps only values above a Gaussian quantile (top-k proxy)."""

    def __init__(self, hidden: int, intermediate: int, sparsity: float):
        super().__init__(hidden, intermediate)
        self.sparsity = sparsity
        # z-score of the target quantile: a gate value must exceed mean + z * std to survive
        self.z = 0.0
        if sparsity > 0:  # standard-normal quantile, computed on the CPU even while building on the meta device
            p = torch.tensor(sparsity, dtype=torch.float32, device="cpu")
            self.z = (torch.erfinv(2 * p - 1) * math.sqrt(2)).item()

        # the decode product over active channels only, with its weight copies (see enable_sparse_decode)
        self.sparse_decode: SparseDecodeProduct | None = None

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        if self.sparsity > 0:
            z = in_dtype(self.z, gate.dtype)
            cutoff = gate.mean(-1, keepdim=True) + gate.std(-1, keepdim=True, unbiased=False) * z
            gate = F.relu(gate - cutoff)
        return gate

    def enable_sparse_decode(self, enable: bool = True) -> bool:
        """Decode steps on a CPU (up to ``FEW_ROWS`` rows) read only the active channels' up and down weights
        (:mod:`gemma3n.text_model.sparse_decode`); costs a transposed copy of ``down_proj``'s weight. Returns whether
        it is on: only for a sparse layer on the CPU with float or int8 weights (int4 keeps its dense kernel)."""
        self.sparse_decode = None  # drop the old copies before building new ones
        if enable and self.sparsity > 0:
            self.sparse_decode = sparse_decode_product(self.up_proj, self.down_proj)
        return self.sparse_decode is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sparse_decode is None or x.device.type != "cpu" or x.numel() > FEW_ROWS * x.shape[-1]:
            return super().forward(x)
        rows = x.reshape(-1, x.shape[-1])  # [N, H]
        activation = F.gelu(self.gate(rows), approximate=self.approximate)  # [N, I], exact zeros where off
        return self.sparse_decode(activation, rows).view(x.shape)


class Laurel(nn.Module):
    """Learned augmented residual: x + norm(right(left(x))) through a rank-``r`` bottleneck."""

    def __init__(self, hidden: int, rank: int, eps: float):
        super().__init__()
        self.linear_left = Linear(hidden, rank, bias=False)
        self.linear_right = Linear(rank, hidden, bias=False)
        self.post_laurel_norm = RMSNorm(hidden, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.post_laurel_norm(self.linear_right(self.linear_left(x)))


class AltUp(nn.Module):
    """Alternating updates over ``n`` residual streams; only the active stream goes through the layer.

    Streams are stacked as ``[n, B, T, H]``. ``predict`` mixes the streams with input-dependent coefficients before the
    layer; ``correct`` spreads the layer's innovation on the active stream back to all streams.
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        n, hidden = config.altup_num_inputs, config.hidden_size
        self.n = n
        self.active = config.altup_active_idx
        self.router_scale = 1.0 / hidden
        self.correct_output_scale = nn.Parameter(torch.zeros(hidden))
        self.correction_coefs = Linear(n, n, bias=False)
        self.prediction_coefs = Linear(n, n * n, bias=False)
        self.modality_router = Linear(hidden, n, bias=False)
        self.router_norm = RMSNorm(hidden, eps=config.rms_norm_eps)

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token mixing weights in (-1, 1): [B, T, n]."""
        routed = self.modality_router(self.router_norm(x) * in_dtype(self.router_scale, x.dtype))
        return torch.tanh(routed.float()).type_as(x)

    def predict(self, streams: torch.Tensor) -> torch.Tensor:
        B, T = streams.shape[1:3]
        coefs = self.prediction_coefs(self.route(streams[self.active])).view(B, T, self.n, self.n)
        # prediction_j = stream_j + sum_k coefs[j, k] * stream_k; the product comes out [B, T, H, n]: back to
        # contiguous [n, B, T, H] before the add, or the sum (and every later op on the streams) walks stride n
        few_rows = streams.device.type == "cpu" and streams[0].numel() <= FEW_ROWS * streams.shape[-1]
        if few_rows and torch.compiler.is_compiling():
            # traced CPU decode step: the n x n mix as a float32 multiply-and-sum, which inductor fuses (a bmm call
            # costs about 70 us per layer for [B, T, H, n] @ [B, T, n, n] with a few tokens)
            weights = coefs.float().permute(2, 3, 0, 1)[..., None]  # [n(j), n(k), B, T, 1]
            mixed = (weights * streams.float()[None]).sum(1).to(streams.dtype)  # [n, B, T, H]
        else:
            mixed = torch.matmul(streams.permute(1, 2, 3, 0), coefs.transpose(-1, -2)).permute(3, 0, 1, 2).contiguous()
        return (mixed + streams).type_as(streams)

    def correct(self, predictions: torch.Tensor, activated: torch.Tensor) -> torch.Tensor:
        coefs = self.correction_coefs(self.route(activated)) + 1.0  # [B, T, n]
        innovation = activated - predictions[self.active]  # [B, T, H]
        corrected = innovation[None] * coefs.permute(2, 0, 1)[..., None] + predictions
        return corrected.type_as(activated)

    def scale_output(self, x: torch.Tensor) -> torch.Tensor:
        return (x.type_as(self.correct_output_scale) * self.correct_output_scale).type_as(x)


class DecoderLayer(nn.Module):
    def __init__(self, config: TextConfig, layer_idx: int):
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.active = config.altup_active_idx
        self.correct_scale = config.altup_correct_scale
        self.self_attn = Gemma3nAttention(config, layer_idx)
        self.mlp = SparseMLP(hidden, config.intermediate_size[layer_idx], config.activation_sparsity_pattern[layer_idx])
        self.input_layernorm = RMSNorm(hidden, eps=eps)
        self.post_attention_layernorm = RMSNorm(hidden, eps=eps)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps=eps)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps=eps)
        self.altup = AltUp(config)
        self.laurel = Laurel(hidden, config.laurel_rank, eps)
        self.per_layer_input_gate = Linear(hidden, config.hidden_size_per_layer_input, bias=False)
        self.per_layer_projection = Linear(config.hidden_size_per_layer_input, hidden, bias=False)
        self.post_per_layer_input_norm = RMSNorm(hidden, eps=eps)
        self.compiled_prefill = False  # see enable_compiled_prefill

    def forward(
        self,
        streams: torch.Tensor,
        per_layer_input: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        ctx: AttentionContext,
        shared_kv: dict[int, tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """streams [n, B, T, H], per_layer_input [B, T, P] -> streams [n, B, T, H]."""
        before, after = DecoderLayer.before_attention, DecoderLayer.after_attention
        prefill_sized = streams[0].numel() > FEW_ROWS * streams.shape[-1]  # more than FEW_ROWS tokens
        if self.compiled_prefill and prefill_sized and not torch.compiler.is_compiling():
            before, after = compiled_blocks()
            per_layer_input = per_layer_input.contiguous()  # a slice at offset layer * P: one build for all layers
        predictions, active, normed, laurel = before(self, streams)
        attn = self.self_attn(normed, rope, ctx, shared_kv)
        return after(self, predictions, active, laurel, attn, per_layer_input)

    def before_attention(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """AltUp prediction, the normed active stream (attention's input) and LAuReL's branch, each [B, T, H]
        (predictions [n, B, T, H])."""
        predictions = self.altup.predict(streams)
        active = predictions[self.active]
        normed = self.input_layernorm(active)
        return predictions, active, normed, self.laurel(normed)

    def after_attention(
        self,
        predictions: torch.Tensor,
        active: torch.Tensor,
        laurel: torch.Tensor,
        attn: torch.Tensor,
        per_layer_input: torch.Tensor,
    ) -> torch.Tensor:
        """Residuals, MLP, AltUp correction and the per-layer-embedding update -> streams [n, B, T, H]."""
        h = (active + self.post_attention_layernorm(attn) + laurel) / math.sqrt(2)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        corrected = self.altup.correct(predictions, h)

        # gate the per-layer embedding with the corrected active stream, add it to the other streams
        first = corrected[self.active].clone()  # a copy: the streams are updated in place below
        if self.correct_scale:
            first = self.altup.scale_output(first)
        gated = gelu(self.per_layer_input_gate(first)) * per_layer_input
        update = self.post_per_layer_input_norm(self.per_layer_projection(gated))
        corrected[1:] += update  # in place (corrected is this layer's own tensor): no copy of all n streams
        return corrected.contiguous()  # eager: already; compiled: inductor may pick [B, T, n, H] order otherwise

    def enable_compiled_prefill(self, enable: bool = True) -> bool:
        """Run the work around attention through :func:`compiled_blocks` for prefill-sized inputs (more than
        ``FEW_ROWS`` tokens); returns whether it is on: only on the CPU (the GPU path is not measured yet), for float
        weights or quantized linear layers whose prefill product is a custom op (torch.compile calls it as is)."""
        self.compiled_prefill = enable and all(_compile_friendly(m) for m in self.modules())
        return self.compiled_prefill


def _compile_friendly(module: nn.Module) -> bool:
    """Whether the compiled prefill can trace ``module``'s own computation (see enable_compiled_prefill)."""
    own = list(itertools.chain(module.parameters(recurse=False), module.buffers(recurse=False)))
    on_cpu = all(t.device.type == "cpu" for t in own)
    return on_cpu and (getattr(module, "prefill_is_custom_op", False) or all(t.is_floating_point() for t in own))


@functools.cache
def compiled_blocks() -> tuple[Callable[..., tuple[torch.Tensor, ...]], Callable[..., torch.Tensor]]:
    """:meth:`DecoderLayer.before_attention` and :meth:`DecoderLayer.after_attention` through ``torch.compile``.

    Prefill spends more time in the element-wise work of a layer (the norms in float32, AltUp's stream mixing, the
    sparse gate's statistics, GELU) than in its matrix products; inductor fuses it into a few passes over memory.
    Dynamic shapes: one build serves every batch size and length, and every layer (their weights are inputs), with a
    second variant for the dense MLP layers. The first call builds (about 40 s at E2B on 2 cores; inductor keeps the
    result on disk for later processes). Intermediates stay in float32 where eager rounds each op to bf16, so
    bf16 results differ from eager in the last bits, no further from a float32 computation than eager is.
    """
    return tuple(
        _static_floats(torch.compile(f, dynamic=True))
        for f in (DecoderLayer.before_attention, DecoderLayer.after_attention)
    )


def _static_floats(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """Calls ``compiled`` with float attributes (norm eps, the sparsity quantile) traced as constants (with dynamic
    shapes torch.compile would make them symbolic, and constants rounded to the weight dtype need their value) and
    weight shapes traced as symbols (layers of different MLP widths share a build). Each dtype, and each sparsity of
    the MLP (E2B: 0.95 or none), is a build of its own; the recompile limit leaves room for a few of them."""
    import torch._dynamo  # loaded by torch.compile already; imported here, not at startup

    @functools.wraps(compiled)
    def call(*args: Any) -> Any:
        settings = dict(specialize_float=True, force_parameter_static_shapes=False, recompile_limit=32)
        with torch._dynamo.config.patch(**settings):
            return compiled(*args)

    return call
