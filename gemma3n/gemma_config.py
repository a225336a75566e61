"""The config of Gemma (1) and Gemma 2 text models, read from ``config.json`` in either spelling.

* Published files: ``rope_theta``, ``torch_dtype``, ``hidden_act`` (Gemma: ``"gelu"``, meaning the tanh
  approximation), Gemma 2 without ``layer_types`` (alternating sliding / full, sliding first) and with
  ``cache_implementation: "hybrid"``.
* What current transformers writes: ``rope_parameters``, ``dtype``, ``layer_types``.

Nothing is tied to a size: every shape comes from the file. Unknown keys land in ``extra``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .config import LAYER_TYPES, ConfigError, _build

FAMILIES = ("gemma", "gemma2")
# architectures entry -> the head on top of the decoder
HEADS = {
    "ForCausalLM": "causal-lm",
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "Model": "causal-lm",  # a bare decoder checkpoint: the tied embedding serves as LM head
}
# activation names -> whether GELU uses the tanh approximation
_TANH_GELU = {"gelu_pytorch_tanh": True, "gelu_tanh": True, "gelu": False}


@dataclass
class GemmaConfig:
    """Hyper-parameters of a Gemma or Gemma 2 decoder and its head (``model_type`` "gemma" or "gemma2")."""

    model_type: str = "gemma"
    vocab_size: int = 256_000
    hidden_size: int = 2048
    intermediate_size: int = 16_384
    num_hidden_layers: int = 18
    num_attention_heads: int = 8
    num_key_value_heads: int = 1
    head_dim: int | None = 256
    hidden_act: str | None = None
    hidden_activation: str | None = None
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    bos_token_id: int | None = 2
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    rope_theta: float | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None
    # Gemma 2
    query_pre_attn_scalar: float | None = None
    sliding_window: int | None = None
    sliding_window_size: int | None = None  # an older spelling of sliding_window
    layer_types: list[str] | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    use_bidirectional_attention: bool | None = None
    # heads
    architectures: list[str] | None = None
    id2label: dict | None = None
    label2id: dict | None = None
    num_labels: int | None = None
    problem_type: str | None = None
    token_classification_bias: bool = True
    given_keys: frozenset = field(default=frozenset(), repr=False)  # the keys the file sets (absent != null)
    extra: dict[str, Any] = field(default_factory=dict)

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    def __post_init__(self) -> None:
        if self.model_type not in FAMILIES:
            raise ConfigError(f"config.json: model_type {self.model_type!r} is not a Gemma or Gemma 2 model")
        n = self.num_hidden_layers
        if n < 1 or self.hidden_size < 1 or self.num_attention_heads < 1:
            raise ConfigError("config.json: num_hidden_layers, hidden_size and num_attention_heads must be >= 1")
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if "num_key_value_heads" not in self.given_keys:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"config.json: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.use_bidirectional_attention:
            raise ConfigError("config.json: use_bidirectional_attention (an encoder variant) is not supported")
        self.gelu_tanh = self._activation()
        self.rope_base = self._rope_base()
        if self.is_gemma2:
            self._gemma2_defaults()
        else:  # Gemma: every layer attends globally
            self.layer_types = ["full_attention"] * n
            self.sliding_window = self.max_position_embeddings
            self.query_pre_attn_scalar = self.query_pre_attn_scalar or self.head_dim
        if len(self.layer_types) != n or any(t not in LAYER_TYPES for t in self.layer_types):
            raise ConfigError(f"config.json: 'layer_types' must list {n} entries from {LAYER_TYPES}")
        if self.sliding_window is None or self.sliding_window < 1:
            raise ConfigError(f"config.json: 'sliding_window' must be >= 1, got {self.sliding_window!r}")
        self.head = self._head()
        self._labels()

    def _activation(self) -> bool:
        """True for tanh-approximate GELU. ``hidden_activation`` wins; the published Gemma files say
        ``hidden_act: "gelu"`` (with ``hidden_activation`` null) for the tanh approximation the model was trained
        with, so that spelling reads as tanh."""
        name = self.hidden_activation
        if name is None:
            name = self.hidden_act or "gelu_pytorch_tanh"
            if name == "gelu":
                return True
        if name not in _TANH_GELU:
            raise ConfigError(f"config.json: unsupported activation {name!r}; Gemma uses gelu_pytorch_tanh")
        return _TANH_GELU[name]

    def _rope_base(self) -> float:
        params = self.rope_parameters or {}
        if params and all(t in LAYER_TYPES for t in params):  # per-layer-type spelling: one base for all here
            params = next(iter(params.values())) or {}
        for source in (params, self.rope_scaling or {}):
            rope_type = source.get("rope_type", source.get("type", "default"))
            if rope_type != "default":
                raise ConfigError(f"config.json: RoPE type {rope_type!r} is not supported (Gemma uses 'default')")
        base = params.get("rope_theta", self.rope_theta)
        return float(base) if base is not None else 10_000.0

    def _gemma2_defaults(self) -> None:
        n = self.num_hidden_layers
        if self.sliding_window is None:
            self.sliding_window = self.sliding_window_size or 4096
        if self.layer_types is None:  # the published pattern: sliding first, then alternating
            self.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        if self.query_pre_attn_scalar is None:
            self.query_pre_attn_scalar = 256
        if "attn_logit_softcapping" not in self.given_keys:
            self.attn_logit_softcapping = 50.0
        if "final_logit_softcapping" not in self.given_keys:
            self.final_logit_softcapping = 30.0

    def _head(self) -> str:
        archs = self.architectures or []
        if not archs:
            return "causal-lm"
        arch = archs[0]
        prefix = "Gemma2" if self.is_gemma2 else "Gemma"
        head = HEADS.get(arch.removeprefix(prefix)) if arch.startswith(prefix) else None
        if head is None or (not self.is_gemma2 and arch.startswith("Gemma2")):
            known = ", ".join(prefix + suffix for suffix in HEADS)
            raise ConfigError(f"config.json: architecture {arch!r} is not one this package loads; known: {known}")
        return head

    def _labels(self) -> None:
        if self.id2label is not None:
            try:
                self.id2label = {int(k): str(v) for k, v in self.id2label.items()}
            except (TypeError, ValueError):
                raise ConfigError("config.json: 'id2label' keys must be integers") from None
        count = self.num_labels or (len(self.id2label) if self.id2label else 2)
        if self.id2label is None or len(self.id2label) != count:
            self.id2label = {i: f"LABEL_{i}" for i in range(count)}
        self.num_labels = count
        self.label2id = {label: i for i, label in self.id2label.items()}
        allowed = (None, "regression", "single_label_classification", "multi_label_classification")
        if self.problem_type not in allowed:
            raise ConfigError(f"config.json: unknown problem_type {self.problem_type!r}")

    # ---- facts the shared decoder code reads (same names as Gemma 3n's TextConfig) -----------------------------
    @property
    def is_gemma2(self) -> bool:
        return self.model_type == "gemma2"

    @property
    def text(self) -> GemmaConfig:
        """The decoder's settings: the whole config (Gemma and Gemma 2 are text-only models)."""
        return self

    @property
    def first_kv_shared_layer(self) -> int:
        return self.num_hidden_layers  # no KV sharing: every layer keeps its own cache

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def attention_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GemmaConfig:
        """Parse a Gemma / Gemma 2 ``config.json``; a wrong type or missing key is a :class:`ConfigError`."""
        if isinstance(data, dict):
            data = {**data, "given_keys": frozenset(data)}
        return _build(cls, data, "config", cls.REQUIRED)
