"""Typed configs parsed from a checkpoint's ``config.json``.

Two layouts are understood:
  * the published multimodal one (``Gemma3nForConditionalGeneration``): a top level with
    ``text_config``, ``vision_config`` and ``audio_config`` sections;
  * a bare text-only one (``Gemma3nForCausalLM`` / ``model_type: gemma3n_text``).

Unknown keys are kept in ``extra`` (never fatal); a missing required key or a value of the
wrong type raises :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYER_TYPES = ("sliding_attention", "full_attention")
# config.json "model_type" values this package loads: the multimodal layout and the bare text-only one.
SUPPORTED_MODEL_TYPES = ("gemma3n", "gemma3n_text")


class ConfigError(ValueError):
    """A config.json that cannot describe a Gemma 3n model."""


def _type_ok(value: Any, annotation: Any) -> bool:
    """Loose runtime check of a JSON value against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is Any:
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        return not args or all(_type_ok(v, args[0]) for v in value)
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _build(cls: type, data: dict[str, Any], section: str, required: tuple[str, ...] = ()) -> Any:
    """Fill dataclass ``cls`` from ``data``: check types, keep unknown keys in ``extra``."""
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{section}' must be a JSON object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    for key in required:
        if key not in data:
            raise ConfigError(f"config.json: required key '{section}.{key}' is missing")
    kwargs: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            extra[key] = value
            continue
        if value is None and key in required:
            raise ConfigError(f"config.json: key '{section}.{key}' must not be null")
        if not _type_ok(value, hints[key]):
            raise ConfigError(
                f"config.json: key '{section}.{key}' has the wrong type: expected {hints[key]}, "
                f"got {type(value).__name__} ({value!r:.80})"
            )
        kwargs[key] = value
    return cls(**kwargs, extra=extra)


@dataclass
class TextConfig:
    """The language model (decoder) hyper-parameters."""

    vocab_size: int = 262_400
    hidden_size: int = 2048
    intermediate_size: int | list[int] = 16_384
    num_hidden_layers: int = 35
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 32_768
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    attention_bias: bool = False
    sliding_window: int = 512
    layer_types: list[str] | None = None
    final_logit_softcapping: float | None = 30.0
    rope_parameters: dict | None = None
    rope_theta: float | None = None  # older key: base of the full-attention layers
    rope_local_base_freq: float | None = None  # older key: base of the sliding layers
    vocab_size_per_layer_input: int = 262_144
    hidden_size_per_layer_input: int = 256
    altup_active_idx: int = 0
    altup_coef_clip: float | None = 120.0
    altup_correct_scale: bool = True
    altup_num_inputs: int = 4
    num_kv_shared_layers: int = 15
    laurel_rank: int = 64
    activation_sparsity_pattern: float | list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")

    def __post_init__(self) -> None:
        n = self.num_hidden_layers
        if n < 1:
            raise ConfigError("config.json: 'text_config.num_hidden_layers' must be >= 1")
        if isinstance(self.intermediate_size, int):
            self.intermediate_size = [self.intermediate_size] * n
        if len(self.intermediate_size) != n:
            raise ConfigError(
                f"config.json: 'text_config.intermediate_size' lists {len(self.intermediate_size)} widths "
                f"for {n} layers"
            )
        if self.layer_types is None:
            self.layer_types = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]
        if len(self.layer_types) != n or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ConfigError(
                f"config.json: 'text_config.layer_types' must list {n} entries from {LAYER_TYPES}, "
                f"got {self.layer_types}"
            )
        if self.activation_sparsity_pattern is None:
            sparse = 10 if n > 10 else 0
            self.activation_sparsity_pattern = [0.95] * sparse + [0.0] * (n - sparse)
        elif isinstance(self.activation_sparsity_pattern, (int, float)):
            self.activation_sparsity_pattern = [float(self.activation_sparsity_pattern)] * n
        if len(self.activation_sparsity_pattern) != n:
            raise ConfigError(
                f"config.json: 'text_config.activation_sparsity_pattern' has "
                f"{len(self.activation_sparsity_pattern)} entries for {n} layers"
            )
        if any(not 0.0 <= s < 1.0 for s in self.activation_sparsity_pattern):
            raise ConfigError("config.json: 'text_config.activation_sparsity_pattern' values must lie in [0, 1)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("config.json: 'num_attention_heads' must be a multiple of 'num_key_value_heads'")
        if self.num_kv_shared_layers < 0:
            raise ConfigError("config.json: 'text_config.num_kv_shared_layers' must be >= 0")
        if self.num_kv_shared_layers >= n:
            # As in the reference: sharing only applies when some earlier layer is left to share from.
            self.num_kv_shared_layers = 0
        if self.num_kv_shared_layers:
            unshared = self.layer_types[: n - self.num_kv_shared_layers]
            for t in set(self.layer_types[n - self.num_kv_shared_layers :]):
                if t not in unshared:
                    raise ConfigError(f"config.json: KV-shared layers of type '{t}' have no earlier layer to share")
        if not 0 <= self.altup_active_idx < self.altup_num_inputs:
            raise ConfigError("config.json: 'text_config.altup_active_idx' must lie in [0, altup_num_inputs)")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise ConfigError(f"config.json: unsupported 'text_config.hidden_activation' {self.hidden_activation!r}")
        self.rope_bases = self._rope_bases()

    def _rope_bases(self) -> dict[str, float]:
        bases = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
        if self.rope_theta is not None:
            bases["full_attention"] = float(self.rope_theta)
        if self.rope_local_base_freq is not None:
            bases["sliding_attention"] = float(self.rope_local_base_freq)
        for layer_type, params in (self.rope_parameters or {}).items():
            if layer_type not in LAYER_TYPES or params is None:
                continue
            rope_type = params.get("rope_type", "default")
            if rope_type != "default":
                raise ConfigError(
                    f"config.json: 'rope_parameters.{layer_type}.rope_type' = {rope_type!r} is not supported "
                    "(only 'default' RoPE is used by Gemma 3n)"
                )
            if "rope_theta" in params:
                bases[layer_type] = float(params["rope_theta"])
        return bases

    # ---- derived facts used by the decoder -------------------------------------------------
    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source_layer(self, layer_idx: int) -> int:
        """The layer whose keys/values ``layer_idx`` attends to (itself unless KV-shared)."""
        first = self.first_kv_shared_layer
        if layer_idx < first or self.num_kv_shared_layers == 0:
            return layer_idx
        wanted = self.layer_types[layer_idx]
        return max(i for i in range(first) if self.layer_types[i] == wanted)

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)


@dataclass
class VisionConfig:
    """The MobileNet v5 tower (built through timm) and its embedder."""

    architecture: str = "mobilenetv5_300m_enc"
    hidden_size: int = 2048
    vocab_size: int = 128
    vocab_offset: int = 262_144
    rms_norm_eps: float = 1e-6
    model_args: dict | None = None
    do_pooling: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ()


@dataclass
class AudioConfig:
    """The USM-style conformer audio encoder and its embedder."""

    vocab_size: int = 128
    vocab_offset: int = 262_272
    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 1e10
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: list[int] = field(default_factory=lambda: [128, 32])
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: list[list[int]] = field(default_factory=lambda: [[3, 3], [3, 3]])
    sscp_conv_stride_size: list[list[int]] = field(default_factory=lambda: [[2, 2], [2, 2]])
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ()

    def __post_init__(self) -> None:
        if self.hidden_size % self.conf_num_attention_heads:
            raise ConfigError("config.json: 'audio_config.hidden_size' must be a multiple of the head count")
        self.sscp_conv_channel_size = [int(c) for c in self.sscp_conv_channel_size]
        self.sscp_conv_kernel_size = [[int(k) for k in pair] for pair in self.sscp_conv_kernel_size]
        self.sscp_conv_stride_size = [[int(s) for s in pair] for pair in self.sscp_conv_stride_size]


@dataclass
class Gemma3nConfig:
    """The whole model: text decoder plus optional vision and audio towers."""

    text: TextConfig
    vision: VisionConfig | None = None
    audio: AudioConfig | None = None
    audio_soft_tokens_per_image: int = 188
    vision_soft_tokens_per_image: int = 256
    boi_token_id: int = 255_999
    eoi_token_id: int = 262_144
    image_token_id: int = 262_145
    boa_token_id: int = 256_000
    eoa_token_id: int = 262_272
    audio_token_id: int = 262_273
    text_only_layout: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None or self.audio is not None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Gemma3nConfig:
        if not isinstance(data, dict):
            raise ConfigError("config.json must hold a JSON object")
        model_type = data.get("model_type")
        if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type is {model_type!r}, which this package cannot load; "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}, gemma, gemma2"
            )
        architectures = data.get("architectures") or []
        text_only = "text_config" not in data and (
            model_type == "gemma3n_text" or "Gemma3nForCausalLM" in architectures or "hidden_size" in data
        )
        if text_only:
            return cls(text=_build(TextConfig, data, "text_config", TextConfig.REQUIRED), text_only_layout=True)
        if "text_config" not in data:
            raise ConfigError("config.json: required key 'text_config' is missing")
        top = {k: v for k, v in data.items() if k not in ("text_config", "vision_config", "audio_config")}
        hints = typing.get_type_hints(cls)
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in top.items():
            if key in hints and key not in ("text", "vision", "audio", "extra", "text_only_layout"):
                if not _type_ok(value, hints[key]):
                    raise ConfigError(f"config.json: key '{key}' has the wrong type: expected {hints[key]}")
                kwargs[key] = value
            else:
                extra[key] = value
        text = _build(TextConfig, data["text_config"], "text_config", TextConfig.REQUIRED)
        vision = _build(VisionConfig, data["vision_config"], "vision_config") if data.get("vision_config") else None
        audio = _build(AudioConfig, data["audio_config"], "audio_config") if data.get("audio_config") else None
        return cls(text=text, vision=vision, audio=audio, extra=extra, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Gemma3nConfig:
        return cls.from_dict(read_config_json(path))


def read_config_json(path: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a checkpoint directory (or the file itself)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {path}")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{config_file} must hold a JSON object")
    return data
