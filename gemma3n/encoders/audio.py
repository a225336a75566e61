"""The USM-style conformer audio encoder of Gemma 3n.

log-mel features [B, T, F] (+ valid-frame mask [B, T]); shapes below for the published strides and reduction
  -> sub-sample convolution projection: conv2d blocks (published: two, stride 2 in time and frequency), each followed
     by a cumulative (causal in time) group norm and ReLU, then a linear map of (freq x channels) -> hidden [B, T/4, D]
  -> conformer blocks: half-step feed-forward, chunked local self-attention with relative positions,
     light depthwise-convolution module, half-step feed-forward, RMS norm                               [B, T/4, D]
  -> keep every ``conf_reduction_factor``-th step, zero the padded ones                                 [B, T/16, D]

Everything that looks into the past or the future is bounded: the attention sees ``conf_attention_context_left - 1``
steps back and ``conf_attention_context_right`` ahead, the depthwise convolution is causal, and the sub-sampling
convolutions reach ``kernel - 1`` frames ahead. So a clip in a padded batch gives the same encodings as that clip
alone, except for the last few steps whose convolution window runs past the clip's end: there the batched run sees
the padding frames (and the first block's output on them) while the lone run sees zeros. The reference implementation
behaves the same way, and we match it rather than mask the convolution inputs.

``forward`` validates its inputs (one host synchronisation, for the empty-clip check) and then calls ``encode``,
which has no host synchronisation and no data-dependent shapes, so it can be compiled or captured in a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemma3n.config import AudioConfig, ConfigError
from gemma3n.encoders.fixed_batch import run_in_fixed_batches
from gemma3n.encoders.frozen_compile import compile_frozen
from gemma3n.modules import RMSNorm

# Frequency padding of every sub-sampling convolution: one bin on each side, whatever the kernel (as the reference).
_FREQ_PAD = 1


class _FusedRMSNorm(RMSNorm):
    """``RMSNorm`` in three passes over the activation: one float32-accumulating ``vector_norm`` reduction, then the
    scale and the weight applied in float32 with a single rounding back to the input dtype, as the reference's
    float32 norm rounds. (``F.rms_norm`` is a composite of about eight passes on CPU, with a float32 copy of its input
    in bf16.) Differs from the reference only in summation order: ~1e-7 relative in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)  # [..., 1]
        inv_rms = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(self.eps))
        out = x * inv_rms  # float32 (type promotion): no rounding yet
        if self.weight is not None:
            out.mul_(self.weight.float() if self.weight.dtype != torch.float32 else self.weight)
        return out.to(x.dtype)


def _check_config(config: AudioConfig) -> None:
    """Reject audio configs the encoder cannot be built from, naming the key."""
    n_blocks = len(config.sscp_conv_channel_size)
    if n_blocks == 0:
        raise ConfigError("config.json: 'audio_config.sscp_conv_channel_size' must list at least one block")
    for key in ("sscp_conv_kernel_size", "sscp_conv_stride_size"):
        pairs = getattr(config, key)
        if len(pairs) != n_blocks or any(len(p) != 2 or min(p) < 1 for p in pairs):
            raise ConfigError(
                f"config.json: 'audio_config.{key}' must list {n_blocks} positive (time, freq) pairs, got {pairs}"
            )
    if config.hidden_size % 2:
        raise ConfigError("config.json: 'audio_config.hidden_size' must be even (sin/cos position features)")
    positive = ("conf_attention_chunk_size", "conf_conv_kernel_size", "conf_reduction_factor", "input_feat_size")
    for key in positive:
        if getattr(config, key) < 1:
            raise ConfigError(f"config.json: 'audio_config.{key}' must be >= 1, got {getattr(config, key)}")
    if config.conf_attention_context_left < 0 or config.conf_attention_context_right < 0:
        raise ConfigError("config.json: 'audio_config.conf_attention_context_left/right' must be >= 0")


# ---- sub-sample convolution projection ------------------------------------------------------------------------------


class CumulativeGroupNorm(nn.Module):
    """Group norm with a single group whose statistics accumulate over time (causal), in float32.

    At step t the mean and variance are taken over all channels and frequency bins of steps 0..t; the variance sums
    each step's squared deviation from *its own* running mean (not from the final mean), as the reference does.
    """

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C, T, F] (conv layout; the statistics ignore the axis order)
        _, channels, steps, freq = x.shape
        x32 = x.float()
        count = torch.arange(1, steps + 1, device=x.device, dtype=torch.float32) * (channels * freq)  # [T]
        mean = (x32.sum(dim=(1, 3)).cumsum(dim=1) / count)[:, None, :, None]  # [B, 1, T, 1]
        centered = x32 - mean
        var = (centered.square().sum(dim=(1, 3)).cumsum(dim=1) / count)[:, None, :, None]
        scale = torch.rsqrt(var + self.eps) * self.weight.float()[None, :, None, None]  # [B, C, T, 1]
        return (centered * scale).to(x.dtype)


class SubSampleConvBlock(nn.Module):
    """Pad (time: ``kernel - 1`` frames after the end; frequency: one bin each side) -> conv2d -> cumulative group
    norm -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: list[int], stride: list[int], eps: float):
        super().__init__()
        self.time_pad = kernel[0] - 1
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=tuple(kernel), stride=tuple(stride), bias=False)
        self.norm = CumulativeGroupNorm(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [B, C_in, T, F] -> [B, C_out, ceil(T / stride_t), F']
        x = F.pad(x, (_FREQ_PAD, _FREQ_PAD, 0, self.time_pad))
        return torch.relu(self.norm(self.conv(x)))


class SubSampleConvProjection(nn.Module):
    """log-mel [B, T, F] -> [B, T', hidden] with T' = T / prod(time strides) (rounded up)."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        in_channels, freq = 1, config.input_feat_size
        for i, out_channels in enumerate(config.sscp_conv_channel_size):
            kernel, stride = config.sscp_conv_kernel_size[i], config.sscp_conv_stride_size[i]
            block = SubSampleConvBlock(in_channels, out_channels, kernel, stride, config.sscp_conv_group_norm_eps)
            self.add_module(f"conv_{i}", block)  # checkpoint names: conv_0, conv_1, ...
            freq = (freq + 2 * _FREQ_PAD - kernel[1]) // stride[1] + 1
            if freq < 1:
                raise ConfigError(
                    f"config.json: audio sub-sampling block {i} leaves no frequency bins "
                    f"(input_feat_size={config.input_feat_size}, kernels {config.sscp_conv_kernel_size})"
                )
            in_channels = out_channels
        self.num_blocks = len(config.sscp_conv_channel_size)
        self.input_proj_linear = nn.Linear(in_channels * freq, config.hidden_size, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.unsqueeze(1).to(self.input_proj_linear.weight.dtype)  # [B, 1, T, F]
        for i in range(self.num_blocks):
            x = getattr(self, f"conv_{i}")(x)  # [B, C, T_i, F_i]
        x = x.permute(0, 2, 3, 1).flatten(2)  # [B, T', F' * C]  (frequency-major, channel-minor)
        return self.input_proj_linear(x)  # [B, T', D]


# ---- conformer ------------------------------------------------------------------------------------------------------


class ConformerFeedForward(nn.Module):
    """x + residual_weight * norm(W2 silu(W1 norm(x))), clamped to +-gradient_clipping before and after."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip = float(config.gradient_clipping)
        self.residual_weight = float(config.conf_residual_weight)
        self.pre_layer_norm = _FusedRMSNorm(config.hidden_size)
        self.ffw_layer_1 = nn.Linear(config.hidden_size, 4 * config.hidden_size, bias=False)
        self.ffw_layer_2 = nn.Linear(4 * config.hidden_size, config.hidden_size, bias=False)
        self.post_layer_norm = _FusedRMSNorm(config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre_layer_norm(x.clamp(-self.clip, self.clip))
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(h)))
        h = self.post_layer_norm(h.clamp(-self.clip, self.clip))
        return x + h * self.residual_weight


class RelativePositionEmbedding(nn.Module):
    """Projects the sinusoidal features of the relative distances into per-head key offsets."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.pos_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, timing_signal: torch.Tensor, num_heads: int, dtype: torch.dtype) -> torch.Tensor:
        # timing_signal: [S, D] float32 for distances (max_past, ..., -max_future) -> [N, H, S]
        span = timing_signal.shape[0]
        return self.pos_proj(timing_signal.to(dtype)).view(span, num_heads, -1).permute(1, 2, 0)


def relative_timing_signal(config: AudioConfig, device: torch.device) -> torch.Tensor:
    """Sinusoids [S, D] (float32) of the query-minus-key distances max_past, max_past - 1, ..., -max_future.

    Timescales run geometrically from 1 to 1e4 over D/2 channels; sines first, then cosines.
    """
    max_past = max(0, config.conf_attention_context_left - 1)
    max_future = config.conf_attention_context_right
    half = config.hidden_size // 2
    step = math.log(1.0e4) / max(half - 1, 1)
    inv_timescales = torch.exp(torch.arange(half, device=device, dtype=torch.float32) * -step)  # [D/2]
    distance = torch.arange(max_past, -max_future - 1, -1, device=device, dtype=torch.float32)  # [S]
    angles = distance[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # [S, D]


def chunk_attention_mask(valid: torch.Tensor, config: AudioConfig) -> torch.Tensor:
    """Which keys each query may see, in the blocked layout: [B, 1, U, W, C] bool.

    Queries are cut into U chunks of W steps; chunk u sees the key context of C = W + max_past + max_future steps
    starting at u * W - max_past. Query w of a chunk may see context slot c iff w <= c <= w + max_past + max_future
    (i.e. the key lies at most max_past steps before and max_future steps after it) and that key is a valid step.
    """
    chunk = config.conf_attention_chunk_size
    max_past = max(0, config.conf_attention_context_left - 1)
    max_future = config.conf_attention_context_right
    context = chunk + max_past + max_future
    steps = valid.shape[1]
    num_chunks = -(-steps // chunk)
    padded = F.pad(valid, (max_past, num_chunks * chunk - steps + max_future), value=False)
    key_valid = padded.unfold(1, context, chunk)  # [B, U, C]
    w = torch.arange(chunk, device=valid.device)[:, None]
    c = torch.arange(context, device=valid.device)[None, :]
    local = (c >= w) & (c <= w + max_past + max_future)  # [W, C]
    return key_valid[:, None, :, None, :] & local  # [B, 1, U, W, C]


class ChunkedLocalAttention(nn.Module):
    """Multi-head self-attention restricted to a local window, computed chunk by chunk (all chunks at once).

    logits = q.k + q.p(distance), soft-capped with cap * tanh(logits / cap); queries carry a learned per-dimension
    scale softplus(per_dim_scale) / softplus(0) / sqrt(head_dim).
    """

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.num_heads = config.conf_num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.chunk = config.conf_attention_chunk_size
        self.max_past = max(0, config.conf_attention_context_left - 1)
        self.max_future = config.conf_attention_context_right
        self.context = self.chunk + self.max_past + self.max_future
        self.logit_cap = float(config.conf_attention_logit_cap)
        self.q_scale = self.head_dim**-0.5 / math.log(2.0)  # 1 / (sqrt(H) * softplus(0))

        self.relative_position_embedding = RelativePositionEmbedding(config)
        self.per_dim_scale = nn.Parameter(torch.zeros(self.head_dim))
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def _key_context(self, x: torch.Tensor, num_chunks: int) -> torch.Tensor:
        # x: [B, N, T, H] -> overlapping windows [B, N, U, H, C] (a strided view of the padded copy)
        steps = x.shape[2]
        x = F.pad(x, (0, 0, self.max_past, num_chunks * self.chunk - steps + self.max_future))
        return x.unfold(2, self.context, self.chunk)

    def _shift_relative(self, pos_logits: torch.Tensor) -> torch.Tensor:
        # [..., W, S] indexed by distance slot s -> [..., W, C] indexed by context slot c, with c = w + s.
        # Pad each row to C + 1 and re-read the flat buffer with row length C: row w then starts w slots later,
        # which moves entry s to column w + s. Columns outside w <= c < w + S get junk that the mask removes.
        *lead, width, span = pos_logits.shape
        padded = F.pad(pos_logits, (0, self.context + 1 - span))  # [..., W, C + 1]
        flat = padded.flatten(-2)[..., : width * self.context]
        return flat.reshape(*lead, width, self.context)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, timing_signal: torch.Tensor) -> torch.Tensor:
        # x: [B, T, D]; mask: [B, 1, U, W, C] from chunk_attention_mask; timing_signal: [S, D] float32
        batch, steps, _ = x.shape
        heads, head_dim, chunk = self.num_heads, self.head_dim, self.chunk
        num_chunks = -(-steps // chunk)

        scale = (F.softplus(self.per_dim_scale.float()) * self.q_scale).to(x.dtype)  # [H]
        q = (self.q_proj(x).view(batch, steps, heads, head_dim) * scale).transpose(1, 2)  # [B, N, T, H]
        k = self.k_proj(x).view(batch, steps, heads, head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, steps, heads, head_dim).transpose(1, 2)

        q = F.pad(q, (0, 0, 0, num_chunks * chunk - steps)).view(batch, heads, num_chunks, chunk, head_dim)
        k = self._key_context(k, num_chunks)  # [B, N, U, H, C]
        v = self._key_context(v, num_chunks).transpose(-1, -2)  # [B, N, U, C, H]

        content = q @ k  # [B, N, U, W, C]
        pos = self.relative_position_embedding(timing_signal, heads, x.dtype)  # [N, H, S]
        pos_logits = (q.flatten(2, 3) @ pos).view(batch, heads, num_chunks, chunk, -1)  # [B, N, U, W, S]
        logits = (content + self._shift_relative(pos_logits)).float()

        logits = torch.tanh(logits / self.logit_cap) * self.logit_cap
        logits = torch.where(mask, logits, torch.finfo(torch.float32).min)
        probs = torch.softmax(logits, dim=-1).to(v.dtype)

        out = (probs @ v).flatten(2, 3)[:, :, :steps]  # [B, N, T, H]
        return out.transpose(1, 2).reshape(batch, steps, heads * head_dim)  # [B, T, D]


class ConformerAttention(nn.Module):
    """x + norm(clamp(W_o attention(norm(clamp(x)))))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip = float(config.gradient_clipping)
        self.pre_attn_norm = _FusedRMSNorm(config.hidden_size)
        self.attn = ChunkedLocalAttention(config)
        self.post = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.post_norm = _FusedRMSNorm(config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, timing_signal: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.pre_attn_norm(x.clamp(-self.clip, self.clip)), mask, timing_signal)
        return x + self.post_norm(self.post(h).clamp(-self.clip, self.clip))


class ConformerLightConv1d(nn.Module):
    """x + W_end silu(norm(clamp(causal_depthwise_conv(glu(W_start norm(x))))))."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        dim, kernel = config.hidden_size, config.conf_conv_kernel_size
        self.clip = float(config.gradient_clipping)
        self.pre_layer_norm = _FusedRMSNorm(dim, eps=config.rms_norm_eps)
        self.linear_start = nn.Linear(dim, 2 * dim, bias=False)
        self.depthwise_conv1d = nn.Conv1d(dim, dim, kernel_size=kernel, groups=dim, bias=False)
        self.conv_norm = _FusedRMSNorm(dim, eps=config.rms_norm_eps)
        self.linear_end = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1)  # [B, T, D]
        kernel = self.depthwise_conv1d.kernel_size[0]
        h = F.pad(h.transpose(1, 2), (kernel - 1, 0))  # [B, D, T + K - 1]: causal, past-only window
        h = self.depthwise_conv1d(h).transpose(1, 2)  # [B, T, D]
        h = self.conv_norm(h.clamp(-self.clip, self.clip))
        return x + self.linear_end(F.silu(h))


class ConformerBlock(nn.Module):
    """Half-step FFW -> local attention -> light conv (padded steps zeroed first) -> half-step FFW -> norm."""

    def __init__(self, config: AudioConfig):
        super().__init__()
        self.clip = float(config.gradient_clipping)
        self.ffw_layer_start = ConformerFeedForward(config)
        self.attention = ConformerAttention(config)
        self.lconv1d = ConformerLightConv1d(config)
        self.ffw_layer_end = ConformerFeedForward(config)
        self.norm = _FusedRMSNorm(config.hidden_size)

    def forward(
        self, x: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor, timing_signal: torch.Tensor
    ) -> torch.Tensor:
        # x: [B, T, D]; keep: [B, T, 1] in x.dtype, 1 on valid steps
        x = self.attention(self.ffw_layer_start(x), mask, timing_signal)
        x = self.lconv1d(x * keep)
        x = self.ffw_layer_end(x)
        return self.norm(x.clamp(-self.clip, self.clip))


# ---- the encoder ----------------------------------------------------------------------------------------------------


class AudioEncoder(nn.Module):
    """log-mel features -> audio encodings, as the ``model.audio_tower`` of a Gemma 3n checkpoint.

    ``forward(input_features [B, T, F] float, input_features_mask [B, T] bool, True = valid frame)`` returns
    ``(encodings [B, T_out, hidden], valid [B, T_out] bool)``; padded positions of ``encodings`` are zero.
    T_out = ceil(T_sub / conf_reduction_factor) with T_sub = T / prod(time strides) rounded up per block.
    There is no maximum length: chunked attention handles any T (the processor caps clips at 30 s = 3000 frames).
    """

    def __init__(self, config: AudioConfig):
        super().__init__()
        _check_config(config)
        self.config = config
        self.time_stride = math.prod(stride_t for stride_t, _ in config.sscp_conv_stride_size)  # frames per step
        self.subsample_conv_projection = SubSampleConvProjection(config)
        self.conformer = nn.ModuleList(ConformerBlock(config) for _ in range(config.conf_num_hidden_layers))
        self._compiled_encode = None  # set by enable_compile()
        self.compiled_batch_size: int | None = None  # compiled calls encode this many clips at a time (None: any)

    # ---- shapes and masks (no host synchronisation) ----

    def subsampled_length(self, num_frames: int) -> int:
        """Steps after the sub-sampling convolutions (each keeps ceil(T / stride_t) steps)."""
        for stride_t, _ in self.config.sscp_conv_stride_size:
            num_frames = (num_frames - 1) // stride_t + 1
        return num_frames

    def subsampled_mask(self, frame_valid: torch.Tensor) -> torch.Tensor:
        """[B, T] frame mask -> [B, T_sub] step mask: step t takes the mask of frame t * prod(time strides)."""
        num_frames = frame_valid.shape[1]
        index = torch.arange(self.subsampled_length(num_frames), device=frame_valid.device) * self.time_stride
        return frame_valid[:, index.clamp(max=num_frames - 1)]

    def output_mask(self, frame_valid: torch.Tensor) -> torch.Tensor:
        """[B, T] frame mask -> [B, T_out] output mask (True = valid)."""
        return self.subsampled_mask(frame_valid)[:, :: self.config.conf_reduction_factor]

    # ---- forward ----

    def check_inputs(self, input_features: torch.Tensor, input_features_mask: torch.Tensor) -> None:
        """Raise a clear error for inputs the encoder cannot encode. Synchronises with the device once."""
        if not isinstance(input_features, torch.Tensor) or not isinstance(input_features_mask, torch.Tensor):
            raise TypeError("input_features and input_features_mask must be torch.Tensors")
        shape = tuple(input_features.shape)
        feat = self.config.input_feat_size
        if input_features.dim() != 3:
            raise ValueError(f"input_features must be [batch, frames, {feat}], got shape {shape}")
        if not input_features.is_floating_point():
            raise TypeError(f"input_features must be floating point, got {input_features.dtype} of shape {shape}")
        batch, frames, bins = shape
        if bins != feat:
            raise ValueError(f"input_features has {bins} mel bins per frame (shape {shape}); this encoder needs {feat}")
        if batch == 0 or frames == 0:
            raise ValueError(f"input_features is empty (shape {shape}): nothing to encode")
        if tuple(input_features_mask.shape) != (batch, frames):
            raise ValueError(
                f"input_features_mask must have shape {(batch, frames)} to match input_features {shape}, "
                f"got {tuple(input_features_mask.shape)}"
            )
        if input_features_mask.dtype != torch.bool:
            raise TypeError(
                f"input_features_mask must be bool (True = valid frame), got {input_features_mask.dtype} "
                f"of shape {tuple(input_features_mask.shape)}"
            )
        has_frames = input_features_mask.any(dim=1)
        has_output = self.output_mask(input_features_mask).any(dim=1)
        flags = torch.stack([has_frames, has_output]).cpu()  # the one host sync
        if not bool(flags.all()):
            no_frames = [i for i in range(batch) if not flags[0, i]]
            if no_frames:
                raise ValueError(
                    f"input_features_mask (shape {(batch, frames)}) marks no valid frame for clip(s) {no_frames}: "
                    "nothing to encode (True = valid frame)"
                )
            no_output = [i for i in range(batch) if not flags[1, i]]
            raise ValueError(
                f"input_features_mask (shape {(batch, frames)}): the valid frames of clip(s) {no_output} fall on no "
                "encoder output step (the mask should mark a prefix of valid frames)"
            )

    def forward(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch of log-mel clips; see the class docstring for shapes and conventions."""
        self.check_inputs(input_features, input_features_mask)
        if self._compiled_encode is None or torch.is_grad_enabled():
            return self.encode(input_features, input_features_mask)
        if self.compiled_batch_size is None:
            return self._compiled_encode(input_features, input_features_mask)
        encoded = run_in_fixed_batches(
            self._compiled_encode, self.compiled_batch_size, input_features, input_features_mask
        )
        return encoded[0], encoded[1]

    def enable_compile(self, freezing: bool = True, batch_size: int | None = None) -> AudioEncoder:
        """Run ``encode`` through ``torch.compile`` (inductor) from the next gradient-free ``forward`` on.

        With ``freezing`` (the default) the weights become constants: inductor packs the linear and convolution
        weights for oneDNN and fuses the norms, clamps, activations and the attention's soft-cap / mask / softmax
        into a few kernels. Each new input shape compiles once. ``batch_size`` fixes the compiled batch (chunks of
        that many clips; a smaller batch is filled up with copies of its last clip, whose outputs are dropped), so
        only the number of frames can bring a new shape. Frozen weights are a snapshot: load or change weights
        before the first compiled call. Calls with gradients enabled stay eager.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._compiled_encode = compile_frozen(self.encode, freezing)
        self.compiled_batch_size = batch_size
        return self

    @property
    def compile_enabled(self) -> bool:
        """Whether :meth:`enable_compile` was called."""
        return self._compiled_encode is not None

    def encode(
        self, input_features: torch.Tensor, input_features_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward`` without input checks: no host synchronisation, shapes depend only on input shapes."""
        x = self.subsample_conv_projection(input_features)  # [B, T_sub, D]
        valid = self.subsampled_mask(input_features_mask)  # [B, T_sub]
        keep = valid.unsqueeze(-1).to(x.dtype)  # [B, T_sub, 1]
        mask = chunk_attention_mask(valid, self.config)  # [B, 1, U, W, C], shared by all blocks
        timing_signal = relative_timing_signal(self.config, x.device)  # [S, D]
        for block in self.conformer:
            x = block(x, keep, mask, timing_signal)

        step = self.config.conf_reduction_factor
        x, valid = x[:, ::step], valid[:, ::step]  # [B, T_out, D], [B, T_out]
        return x.masked_fill(~valid.unsqueeze(-1), 0.0), valid
