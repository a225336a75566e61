"""The Gemma 3n vision tower: a timm MobileNet v5 encoder turned into a sequence of soft tokens.

The network itself is timm's (``mobilenetv5_300m_enc`` in the published checkpoints), built from the
config's ``architecture`` / ``model_args`` without downloading anything. Its parameters live under
``timm_model.`` so the state dict lines up with the checkpoint's ``model.vision_tower.`` prefix.

What this module adds on top of timm:
  * the feature map [N, C, h, w] is read as h*w tokens of width C (row-major over h, w);
  * the tokens are multiplied by sqrt(C), the scale the multimodal embedder expects.

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
from torch import nn

from gemma3n.config import ConfigError, VisionConfig


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
        self.hidden_size = config.hidden_size
        self.soft_tokens = soft_tokens
        self.scale = config.hidden_size**0.5  # a Python float: nothing to materialise after a meta build
        self.channels_last = False
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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must have shape [N, 3, H, W], got {tuple(pixel_values.shape)}")
        weight = next(self.timm_model.parameters())
        x = pixel_values.to(device=weight.device, dtype=weight.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.timm_model.forward_features(x)  # [N, C, h, w]
        n, c, h, w = features.shape
        if c != self.hidden_size or h * w != self.soft_tokens:
            raise ValueError(
                f"vision tower: input of size {tuple(pixel_values.shape[-2:])} gave a {h}x{w} feature map of "
                f"width {c} ({h * w} tokens), expected {self.soft_tokens} tokens of width {self.hidden_size}"
            )
        # [N, C, h, w] -> [N, h*w, C]; with channels_last features this is a pure view.
        tokens = features.flatten(2).transpose(1, 2)
        return tokens * self.scale
