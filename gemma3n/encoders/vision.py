"""The Gemma 3n vision tower: a timm MobileNet v5 encoder turned into a sequence of soft tokens.

The network itself is timm's (``mobilenetv5_300m_enc`` in the published checkpoints), built from the
config's ``architecture`` / ``model_args`` without downloading anything. Its parameters live under
``timm_model.`` so the state dict lines up with the checkpoint's ``model.vision_tower.`` prefix.

What this module adds on top of timm:
  * the feature map [N, C, h, w] is read as h*w tokens of width C (row-major over h, w);
  * the tokens are multiplied by sqrt(C), the scale the multimodal embedder expects.

CPU speed (bit-for-bit the same weights and state-dict names; outputs within float rounding of timm's):
  * every RMS norm of the network (timm's ``RmsNorm2d`` / ``RmsNormAct2d``: five passes over the activation in
    eager mode) runs in three, reducing over the contiguous channel axis when the activation is channels-last;
  * on CPU every convolution runs through oneDNN with its weight reordered once into oneDNN's blocked layout
    (``torch.ops.mkldnn``, the kernels torch.compile's CPU backend uses) instead of once per call;
  * CPU inputs are fed channels-last, so the activations stay NHWC through the network;
  * the multi-query attention blocks run all query heads as one attention over NHWC views
    (``gemma3n/encoders/vision_attention.py``).

MobileNet v5 ends in a multi-scale fusion adapter that resamples its output to a fixed
``msfa_output_resolution`` grid (16x16 = 256 tokens for the published models), so the token count does
not depend on the input size; 768x768 is simply the size the processor produces.

Meta-device construction: timm's MobileNet v5 (timm 1.0.x) registers no buffers at all, so after
``load_state_dict(..., assign=True)`` nothing is left on the meta device and no post-load fix-up is
needed. The constructor refuses architectures that do register non-persistent buffers.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.layers import RmsNorm2d, RmsNormAct2d
from timm.layers.conv2d_same import Conv2dSame
from timm.layers.fast_norm import rms_norm2d
from timm.layers.padding import pad_same
from torch import nn

from gemma3n.config import ConfigError, VisionConfig
from gemma3n.encoders.fixed_batch import run_in_fixed_batches
from gemma3n.encoders.frozen_compile import compile_frozen
from gemma3n.encoders.vision_attention import fold_multi_query_attention
from gemma3n.modules import gelu


class ChannelsLastRmsNorm2d(nn.Module):
    """timm's ``RmsNorm2d`` / ``RmsNormAct2d`` (same ``weight``, eps and activation) in three passes on NHWC tensors.

    A channels-last [N, C, H, W] tensor is a contiguous [N, H, W, C] one, so the norm over C is a reduction over the
    last axis: one ``vector_norm`` pass (float32 accumulation, no float32 copy of the activation), then the scale and
    the weight, and a GELU activation in place on that fresh output. timm's eager formula takes five passes plus, in
    bf16, float32 round trips (and ``F.rms_norm`` is no fused kernel on CPU). Other layouts take timm's own formula.
    """

    def __init__(self, norm: RmsNorm2d):
        super().__init__()
        self.weight = norm.weight  # the same Parameter (or None): state-dict names do not change
        self.eps = norm.eps
        self.drop = getattr(norm, "drop", nn.Identity())
        self.act = getattr(norm, "act", nn.Identity())
        self.gelu_approximation = _gelu_approximation(self.act)  # "tanh" / "none" for a GELU, else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = x.shape[1]
        if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            nhwc = x.permute(0, 2, 3, 1)  # [N, H, W, C], contiguous
            # the norm in the activation dtype: the reduction still accumulates in float32, and asking for a
            # float32 result instead makes torch convert the whole activation first (2x the time in bf16)
            norm = torch.linalg.vector_norm(nhwc, dim=-1, keepdim=True).float()  # [N, H, W, 1]
            inv_rms = torch.rsqrt(norm.square_().div_(channels).add_(self.eps)).to(x.dtype)
            out = nhwc * inv_rms
            if self.weight is not None:
                out.mul_(self.weight)
            out = self.drop(out.permute(0, 3, 1, 2))  # [N, C, H, W], channels-last
        else:
            out = self.drop(rms_norm2d(x, [channels], self.weight, self.eps))
        return self._activate(out)

    def _activate(self, out: torch.Tensor) -> torch.Tensor:
        """The activation on the norm's own (fresh) output."""
        if self.gelu_approximation is None or (torch.is_grad_enabled() and out.requires_grad):
            return self.act(out)
        if torch.compiler.is_compiling():
            return gelu(out, self.gelu_approximation)  # the compiled tower's faster tanh-GELU formula
        # the GELU in place: no second activation-sized buffer to allocate
        return torch.ops.aten.gelu_(out, approximate=self.gelu_approximation)


def _gelu_approximation(act: nn.Module) -> str | None:
    """The ``approximate`` argument of ``F.gelu`` that ``act`` applies (torch's or timm's GELU modules), else None."""
    if type(act) is nn.GELU:
        return act.approximate
    if type(act) is timm.layers.activations.GELU:
        return "none"
    if type(act) is timm.layers.activations.GELUTanh:
        return "tanh"
    return None


def _has_onednn_conv() -> bool:
    """Whether this torch build has oneDNN and the packed-weight convolution ops (private ops of torch's CPU compiler
    backend, present since torch 2.0; checked so that a build without them falls back to ``F.conv2d``)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_convolution_weight", "_convolution_pointwise"))
    except (AttributeError, RuntimeError):
        return False


_HAS_ONEDNN_CONV = _has_onednn_conv()


class PrepackedConv2d(nn.Module):
    """An ``nn.Conv2d`` (or timm's dynamic-"same"-padding ``Conv2dSame``) whose CPU weight is reordered for oneDNN once.

    Plain ``F.conv2d`` on CPU reorders the weight into oneDNN's blocked layout on every call (for MobileNet v5 in bf16
    that reorder is a large part of the tower's time). Here the reordered copy is made on the first CPU call and kept
    until the weight changes; the result is the same oneDNN convolution. Off CPU, or without oneDNN, it is
    ``F.conv2d``. ``weight`` / ``bias`` stay the original Parameters, so state-dict names do not change; the packed
    copy costs as much memory again as the convolution weights (E2B vision tower: ~0.6 GB in bf16); with
    ``keep_packed = False`` (:meth:`VisionTower.keep_packed_weights`) every call packs the weight afresh and frees the
    copy after the convolution: the same kernel and result, no persistent copy.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride = list(conv.stride)
        self.dilation = list(conv.dilation)
        self.groups = conv.groups
        self.same_padding = isinstance(conv, Conv2dSame)  # padding computed from the input size, as timm does
        self.padding = [0, 0] if self.same_padding else list(conv.padding)
        self.kernel_size = list(conv.kernel_size)
        self.keep_packed = True
        self._packed: torch.Tensor | None = None
        self._packed_from: tuple | None = None

    def _reorder(self, x: torch.Tensor) -> torch.Tensor:
        """The weight in oneDNN's blocked layout for inputs shaped like ``x`` (a new tensor)."""
        with torch.no_grad():
            return torch.ops.mkldnn._reorder_convolution_weight(
                self.weight.detach(), self.padding, self.stride, self.dilation, self.groups, list(x.shape)
            )

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        if not self.keep_packed:
            return self._reorder(x)
        key = (self.weight.data_ptr(), self.weight.dtype, self.weight._version)
        if self._packed is None or self._packed_from != key:
            self._packed = self._reorder(x)
            self._packed_from = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_padding:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        usable = (
            not torch.compiler.is_compiling()  # compiled: inductor packs (and fuses) the convolutions itself
            and x.device.type == "cpu"
            and x.dtype == self.weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16)
            and _HAS_ONEDNN_CONV
            and not (torch.is_grad_enabled() and self.weight.requires_grad)
        )
        if not usable:
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_weight(x), self.bias, self.padding, self.stride, self.dilation, self.groups, "none", [], ""
        )


def _speed_up_modules(model: nn.Module) -> None:
    """Swap timm's RMS norms and convolutions for the faster equivalents above and fold its multi-query attention
    (same parameters and state-dict names)."""
    fold_multi_query_attention(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (RmsNorm2d, RmsNormAct2d):
                setattr(parent, name, ChannelsLastRmsNorm2d(child))
            elif type(child) in (nn.Conv2d, Conv2dSame) and child.padding_mode == "zeros":
                if isinstance(child.padding, str):  # "same" / "valid" strings: leave to F.conv2d
                    continue
                setattr(parent, name, PrepackedConv2d(child))


# E2B shape, bf16, 2 cores, 768x768 images, eager, one process, the two modes alternating: a batch of 4 run image by
# image took 5-10% less time than one call (benchmarks/vision_images_per_call.py: medians 2183 vs 2424 ms per image,
# and 3252 vs 3450 in an earlier run). At batch 4 the first stages' activations ([4, 512, 192, 192], 151 MB in bf16)
# outgrow the caches between the convolutions. So on CPU a batch is run image by image.
CPU_IMAGES_PER_CALL = 1


class VisionTower(nn.Module):
    """Image pixels [N, 3, H, W] -> scaled soft tokens [N, soft_tokens, hidden_size]."""

    def __init__(self, config: VisionConfig, soft_tokens: int):
        super().__init__()
        model_args = dict(config.model_args or {})
        if model_args.get("features_only"):
            raise ConfigError("config.json: 'vision_config.model_args.features_only' is not supported")
        if soft_tokens < 1:
            raise ConfigError(f"vision soft token count must be >= 1, got {soft_tokens}")
        model_args.pop("num_classes", None)  # the tower never has a classifier head
        try:
            self.timm_model = timm.create_model(config.architecture, pretrained=False, num_classes=0, **model_args)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ConfigError(
                    f"config.json: 'vision_config.architecture' = {config.architecture!r} is not known to "
                    f"timm {timm.__version__}"
                ) from None
            raise
        _speed_up_modules(self.timm_model)
        self.hidden_size = config.hidden_size
        self.soft_tokens = soft_tokens
        self.scale = config.hidden_size**0.5  # a Python float: nothing to materialise after a meta build
        self.channels_last = False
        # On CPU, a batch goes through the network this many images at a time (None: all at once).
        self.cpu_images_per_call: int | None = CPU_IMAGES_PER_CALL
        self._compiled_features = None  # set by enable_compile()
        self.compiled_batch_size: int | None = None  # compiled calls run this many images at a time (None: any)
        self._check_built_model(config)

    def _check_built_model(self, config: VisionConfig) -> None:
        """Fail at construction for configs that could only fail (or go wrong) later."""
        persistent = set(self.timm_model.state_dict().keys())
        transient = [name for name, _ in self.timm_model.named_buffers() if name not in persistent]
        if transient:
            raise NotImplementedError(
                f"timm architecture {config.architecture!r} registers non-persistent buffers {transient[:4]}, "
                "which a meta-device build cannot restore"
            )
        width = getattr(self.timm_model, "num_features", None)
        if width is not None and width != config.hidden_size:
            raise ConfigError(
                f"config.json: 'vision_config.hidden_size' = {config.hidden_size} but {config.architecture!r} "
                f"outputs {width} channels"
            )
        # MobileNet v5: the fusion adapter fixes the output grid, so the token count is known now.
        grid = getattr(getattr(self.timm_model, "msfa", None), "output_resolution", None)
        if grid is not None and grid[0] * grid[1] != self.soft_tokens:
            raise ConfigError(
                f"config.json: 'vision_soft_tokens_per_image' = {self.soft_tokens} but {config.architecture!r} "
                f"outputs a {grid[0]}x{grid[1]} grid ({grid[0] * grid[1]} tokens)"
            )

    def to_channels_last(self) -> VisionTower:
        """Store conv weights (and feed inputs) as NHWC: faster convolutions on GPU.

        Call it after the weights are attached: ``load_state_dict(assign=True)`` replaces the parameters
        with the checkpoint's (contiguous NCHW) tensors.
        """
        self.timm_model.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def keep_packed_weights(self, keep: bool = True) -> VisionTower:
        """Whether the CPU convolutions keep their oneDNN-packed weights between calls (the default). ``keep=False``
        packs them on every call and frees them after it: same outputs, no persistent copy (~0.6 GB for E2B in
        bf16), at the cost of the packing on every call."""
        for module in self.modules():
            if isinstance(module, PrepackedConv2d):
                module.keep_packed = keep
                if not keep:
                    module._packed = module._packed_from = None
        return self

    def enable_compile(self, freezing: bool = True, batch_size: int | None = None) -> VisionTower:
        """Run the network through ``torch.compile`` (inductor) from the next gradient-free call on.

        With ``freezing`` (the default) inductor treats the weights as constants: it packs every convolution weight
        for oneDNN and folds the norms and activations around the convolutions into fused kernels. The first call for
        each input shape compiles (see ``benchmarks/results/encoders_cpu.md`` for the cost); later calls reuse it.
        ``batch_size`` fixes the compiled batch: larger batches run in chunks of that many images and a smaller one
        (e.g. the last of a job) is filled up with copies of its last image whose outputs are dropped, so one
        compilation serves every batch. Frozen weights are a snapshot: load or change weights before the first
        compiled call. Calls with gradients enabled stay eager.
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._compiled_features = compile_frozen(self.timm_model.forward_features, freezing)
        self.compiled_batch_size = batch_size
        return self

    @property
    def compile_enabled(self) -> bool:
        """Whether :meth:`enable_compile` was called."""
        return self._compiled_features is not None

    def images_per_call(self, batch_size: int) -> int:
        """How many of a ``batch_size`` batch's images one network call takes on this tower's device: the batch size
        to compile for (see ``cpu_images_per_call``)."""
        per_call = self.cpu_images_per_call if next(self.timm_model.parameters()).device.type == "cpu" else None
        return batch_size if per_call is None else min(batch_size, per_call)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape [N, 3, H, W], got {tuple(pixel_values.shape)}")
        weight = next(self.timm_model.parameters())
        x = pixel_values.to(device=weight.device, dtype=weight.dtype)
        nhwc = self.channels_last or x.device.type == "cpu"  # NHWC activations: fused norms, oneDNN's native layout
        if nhwc:
            x = x.contiguous(memory_format=torch.channels_last)
        network, size, fill = self.timm_model.forward_features, self.images_per_call(x.shape[0]), False
        if self._compiled_features is not None and not torch.is_grad_enabled():
            compiled = network = self._compiled_features
            if self.compiled_batch_size is not None:
                # filled-up chunks are concatenated copies: lay them out as the compiled graph expects
                layout = torch.channels_last if nhwc else torch.contiguous_format
                network = lambda chunk: compiled(chunk.contiguous(memory_format=layout))  # noqa: E731
                size, fill = self.compiled_batch_size, True
        features = run_in_fixed_batches(network, size, x, fill=fill)  # [N, C, h, w]
        n, c, h, w = features.shape
        if c != self.hidden_size or h * w != self.soft_tokens:
            raise ValueError(
                f"vision tower: input of size {tuple(pixel_values.shape[-2:])} gave a {h}x{w} feature map of "
                f"width {c} ({h * w} tokens), expected {self.soft_tokens} tokens of width {self.hidden_size}"
            )
        # [N, C, h, w] -> [N, h*w, C]; with channels_last features this is a pure view.
        tokens = features.flatten(2).transpose(1, 2)
        return tokens * self.scale
