"""MatFormer slicing: smaller Gemma 3n models cut out of a larger checkpoint (E4B) without retraining.

Gemma 3n E4B is a Matryoshka transformer: the first ``k`` rows of every feed-forward block's gate and up projections
and the first ``k`` columns of its down projection form a working narrower block, and whole layers can be dropped.
A slice is described by :class:`MatformerSpec` (FFN widths of the kept layers, indices of the skipped ones, in the
original model's numbering) or by the name of a published configuration (:data:`PRESETS`).

What a slice changes, in published tensor names (``{lm}`` = ``model.language_model.``, or ``model.`` for a text-only
checkpoint):
  * ``{lm}layers.{i}.*`` of skipped layers are dropped and the kept ones renumbered ``0..L'-1``;
  * ``{lm}layers.{i}.mlp.gate_proj/up_proj.weight`` [I, H] keep their first ``w`` rows, ``down_proj.weight`` [H, I]
    its first ``w`` columns;
  * the per-layer table ``{lm}embed_tokens_per_layer.weight`` [V, L*P] holds layer ``i`` in columns
    ``[i*P, (i+1)*P)`` and ``{lm}per_layer_model_projection.weight`` [L*P, H] in rows ``[i*P, (i+1)*P)``: both keep
    the blocks of the kept layers; ``per_layer_projection_norm`` [P] is shared by all layers and stays;
  * the config gets the kept layers' ``intermediate_size``, ``layer_types`` and ``activation_sparsity_pattern``, the
    new ``num_hidden_layers``, and ``num_kv_shared_layers`` = the kept layers that were KV-shared.

KV sharing: the last ``num_kv_shared_layers`` layers own no keys/values; each reads the cache of the last non-shared
layer of its attention type. A slice keeps that meaning only if every kept shared layer still finds the same source
layer; :func:`plan_slice` checks that and names the layer when it does not hold.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import Gemma3nConfig, TextConfig

# Sliced widths must be multiples of this: int4 weight-only kernels quantize the down projection's input dimension in
# groups of up to 128, and 128 keeps every SIMD / tensor-core tile of the narrowed matrices whole. The checkpoint's
# own width is always accepted. (All published MatFormer widths are multiples of 2048.)
FFN_WIDTH_MULTIPLE = 128


class MatformerError(ValueError):
    """A slice that cannot be cut from this checkpoint (the message names the layer or setting)."""


@dataclass(frozen=True)
class MatformerSpec:
    """What to keep: ``ffn_dims`` (one width for all kept layers, one per kept layer, or None = unchanged) and
    ``skip_layers`` (indices in the original model)."""

    ffn_dims: int | tuple[int, ...] | None = None
    skip_layers: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: MatformerSpec | Mapping[str, Any] | str) -> MatformerSpec:
        """A spec from a spec, a preset name, or a dict ``{"ffn_dims": ..., "skip_layers": [...]}``."""
        if isinstance(value, MatformerSpec):
            return value
        if isinstance(value, str):
            return get_preset(value).spec
        if not isinstance(value, Mapping):
            raise MatformerError(
                f"matformer must be a preset name or a dict with 'ffn_dims' / 'skip_layers', got {type(value).__name__}"
            )
        unknown = set(value) - {"ffn_dims", "skip_layers"}
        if unknown:
            raise MatformerError(f"matformer: unknown key(s) {sorted(unknown)}; use 'ffn_dims' and 'skip_layers'")
        dims = value.get("ffn_dims")
        if dims is not None and not _is_int(dims):
            if not isinstance(dims, Sequence) or isinstance(dims, str) or not all(_is_int(d) for d in dims):
                raise MatformerError(f"matformer: 'ffn_dims' must be an int or a list of ints, got {dims!r:.80}")
            dims = tuple(int(d) for d in dims)
        skip = value.get("skip_layers") or ()
        if not isinstance(skip, Sequence) or isinstance(skip, str) or not all(_is_int(i) for i in skip):
            raise MatformerError(f"matformer: 'skip_layers' must be a list of layer indices, got {skip!r:.80}")
        return cls(ffn_dims=dims, skip_layers=tuple(int(i) for i in skip))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---- published configurations -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A published slicing of Gemma 3n E4B (35 layers, FFN 16384) with Google's figures for it."""

    name: str
    spec: MatformerSpec
    published_name: str
    published_effective_params_b: float
    published_mmlu_pt: float


_NARROW, _WIDE = 2048 * 4, 2048 * 8


def _mix(num_kept: int, wide: Iterable[int]) -> tuple[int, ...]:
    """Widths of the kept layers: 2048 * 8 at the positions in ``wide``, 2048 * 4 elsewhere."""
    wide = set(wide)
    return tuple(_WIDE if i in wide else _NARROW for i in range(num_kept))


_E2B_SKIP = (20, 21, 22, 23, 24)

# Source of every number below: Google's "gemma3n-slicing-configs" table (Hugging Face dataset
# google/gemma3n-slicing-configs, the Mix-n-Match configurations used by the Gemma 3n MatFormer Lab notebook in
# google-gemini/gemma-cookbook; the same table ships as matformer_configs/gemma3n.csv in EricLBuehler/mistral.rs).
# Columns: name, "# Layers", "# Effective Params (B)", "MMLU PT accuracy", "FFN Hidden Dims" (one per kept layer,
# written 2_048 * 4 or 2_048 * 8), "Layers Skipped". ``_mix`` lists the kept-layer positions at 2_048 * 8.
_PUBLISHED: list[tuple[str, str, tuple[int, ...], tuple[int, ...], float, float]] = [
    # (our name, table name, ffn dims of kept layers, skipped layers, effective params B, MMLU PT %)
    ("E4B", "Main model", _mix(35, range(35)), (), 3.98, 62.3),
    ("E2B", "Config for official E2B Model", _mix(30, ()), _E2B_SKIP, 1.91, 50.9),
    ("E1.96B", "Config for E1.96B (layer-level)", _mix(30, [4]), _E2B_SKIP, 1.96, 53.4),
    ("E2.54B", "Config for E2.54B (layer-level)", _mix(35, [4, *range(20, 25)]), (), 2.54, 55.4),
    ("E2.69B", "Config for E2.69B (layer-level)", _mix(35, [4, 9, 14, *range(19, 25)]), (), 2.69, 57.7),
    ("E2.98B", "Config for E2.98B (layer-level)", _mix(35, [*range(15, 25), *range(30, 35)]), (), 2.98, 59.5),
    ("E3.18B", "Config for E3.18B (layer-level)", _mix(35, [4, *range(9, 25), 29, 34]), (), 3.18, 61.8),
    ("E3.39B", "Config for E3.39B (layer-level)", _mix(35, [4, *range(9, 30), 34]), (), 3.39, 63.0),
    ("E3.59B", "Config for E3.59B (layer-level)", _mix(35, [*range(4, 30), 34]), (), 3.59, 63.4),
    ("E3.79B", "Config for E3.79B (layer-level)", _mix(35, range(4, 35)), (), 3.79, 63.4),
    ("E2.49B-block", "Config for E2.49B (block-level)", _mix(35, range(20, 25)), (), 2.49, 54.5),
    ("E2.73B-block", "Config for E2.73B (block-level)", _mix(35, range(15, 25)), (), 2.73, 57.1),
    ("E2.98B-block", "Config for E2.98B (block-level)", _mix(35, range(10, 25)), (), 2.98, 59.5),
    ("E3.24B-block", "Config for E3.24B (block-level)", _mix(35, range(10, 30)), (), 3.24, 60.7),
    ("E3.49B-block", "Config for E3.49B (block-level)", _mix(35, range(5, 30)), (), 3.49, 61.4),
    # named E3.79B in the table, but its effective-parameter column says 3.74
    ("E3.79B-block", "Config for E3.79B (block-level)", _mix(35, range(5, 35)), (), 3.74, 62.0),
]

PRESETS: dict[str, Preset] = {
    name: Preset(name, MatformerSpec(ffn_dims=dims, skip_layers=skip), table_name, params, mmlu)
    for name, table_name, dims, skip, params, mmlu in _PUBLISHED
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive; also the table's own names, e.g. "Main model")."""
    wanted = name.strip().lower()
    for preset in PRESETS.values():
        if wanted in (preset.name.lower(), preset.published_name.lower()):
            return preset
    raise MatformerError(f"unknown MatFormer preset {name!r}; choose from {', '.join(PRESETS)}")


# ---- planning and validation --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlicePlan:
    """A validated slice of one checkpoint: the kept layers (original indices, in order) and their FFN widths."""

    num_layers: int  # in the original model
    kept: tuple[int, ...]
    widths: tuple[int, ...]
    layer_types: tuple[str, ...]
    activation_sparsity: tuple[float, ...]
    num_kv_shared_layers: int

    @property
    def skips_layers(self) -> bool:
        return len(self.kept) != self.num_layers

    def text_fields(self) -> dict[str, Any]:
        """The text-config values a slice rewrites (JSON-ready)."""
        return {
            "num_hidden_layers": len(self.kept),
            "intermediate_size": list(self.widths),
            "layer_types": list(self.layer_types),
            "activation_sparsity_pattern": list(self.activation_sparsity),
            "num_kv_shared_layers": self.num_kv_shared_layers,
        }


def plan_slice(text: TextConfig, spec: MatformerSpec | Mapping[str, Any] | str) -> SlicePlan:
    """Check ``spec`` against the checkpoint's text config and work out the sliced layer list.

    Raises :class:`MatformerError` naming the offending layer for: a skip index out of range or repeated, a width list
    of the wrong length, a width larger than the checkpoint's or not a multiple of :data:`FFN_WIDTH_MULTIPLE`, and a
    skip that would change which layer a KV-shared layer reads its keys and values from.
    """
    spec = MatformerSpec.parse(spec)
    n = text.num_hidden_layers
    skip = spec.skip_layers
    bad = [i for i in skip if not 0 <= i < n]
    if bad:
        raise MatformerError(f"matformer: skip_layers {bad} out of range: the checkpoint has layers 0..{n - 1}")
    repeated = sorted({i for i in skip if skip.count(i) > 1})
    if repeated:
        raise MatformerError(f"matformer: skip_layers lists layer(s) {repeated} more than once")
    kept = tuple(i for i in range(n) if i not in set(skip))
    if not kept:
        raise MatformerError(f"matformer: skip_layers removes all {n} layers")

    full = [text.intermediate_size[i] for i in kept]
    if spec.ffn_dims is None:
        widths = list(full)
    elif isinstance(spec.ffn_dims, int):
        widths = [spec.ffn_dims] * len(kept)
    else:
        widths = list(spec.ffn_dims)
        if len(widths) != len(kept):
            raise MatformerError(
                f"matformer: ffn_dims lists {len(widths)} widths but {len(kept)} layers are kept "
                f"({n} in the checkpoint, {len(skip)} skipped); give one width per kept layer or a single int"
            )
    for i, width, limit in zip(kept, widths, full, strict=True):
        if width < 1 or width > limit:
            raise MatformerError(f"matformer: layer {i}: FFN width {width} must lie in 1..{limit} (the checkpoint's)")
        if width != limit and width % FFN_WIDTH_MULTIPLE:
            raise MatformerError(
                f"matformer: layer {i}: FFN width {width} is not a multiple of {FFN_WIDTH_MULTIPLE} "
                "(needed by the quantized and vectorised kernels)"
            )

    first_shared = text.first_kv_shared_layer if text.num_kv_shared_layers else n
    _check_kv_sharing(text, kept, first_shared)
    return SlicePlan(
        num_layers=n,
        kept=kept,
        widths=tuple(widths),
        layer_types=tuple(text.layer_types[i] for i in kept),
        activation_sparsity=tuple(float(text.activation_sparsity_pattern[i]) for i in kept),
        num_kv_shared_layers=sum(1 for i in kept if i >= first_shared),
    )


def _check_kv_sharing(text: TextConfig, kept: tuple[int, ...], first_shared: int) -> None:
    """Every kept KV-shared layer must still read the keys/values of the same (kept) source layer."""
    shared = [i for i in kept if i >= first_shared]
    if not shared:
        return
    readers: dict[int, list[int]] = {}
    for i in range(first_shared, text.num_hidden_layers):
        readers.setdefault(text.kv_source_layer(i), []).append(i)
    for i in shared:
        source = text.kv_source_layer(i)
        if source not in kept:
            kept_readers = [r for r in readers[source] if r in kept]
            raise MatformerError(
                f"matformer: layer {source} ({text.layer_types[source]}) cannot be skipped: KV-shared layer(s) "
                f"{kept_readers} read its keys and values; skip those too or keep layer {source}"
            )
    # After renumbering, each shared layer looks for the last non-shared kept layer of its type: it must be the same.
    new_first = sum(1 for i in kept if i < first_shared)
    new_types = [text.layer_types[i] for i in kept]
    for new_idx, i in enumerate(kept):
        if i < first_shared:
            continue
        same_type = [j for j in range(new_first) if new_types[j] == new_types[new_idx]]
        found = kept[same_type[-1]] if same_type else None
        if found != text.kv_source_layer(i):
            raise MatformerError(
                f"matformer: layer {i} ({text.layer_types[i]}) is KV-shared, but after slicing the layer pattern "
                f"would give it the keys and values of layer {found} instead of layer {text.kv_source_layer(i)}"
            )


def sliced_config(config: Gemma3nConfig, plan: SlicePlan) -> Gemma3nConfig:
    """``config`` with the text section rewritten for ``plan`` (towers and other settings unchanged)."""
    return dataclasses.replace(config, text=dataclasses.replace(config.text, **plan.text_fields()))


def slice_config_dict(data: dict[str, Any], plan: SlicePlan) -> dict[str, Any]:
    """A copy of a raw ``config.json`` dict with the text section rewritten for ``plan`` (other keys untouched)."""
    data = dict(data)
    if "text_config" in data:
        data["text_config"] = {**data["text_config"], **plan.text_fields()}
    else:  # text-only layout: the text settings are at the top level
        data.update(plan.text_fields())
    return data


# ---- tensors --------------------------------------------------------------------------------------------------------


def text_prefix(config: Gemma3nConfig) -> str:
    """Where the language model's tensors live in the published names."""
    return "model." if config.text_only_layout else "model.language_model."


class KeptColumns:
    """The per-layer table [V, L*P] reduced to the kept layers' column blocks, read in row ranges on demand.

    Indexing with a row slice gathers those rows (``table[rows]`` -> [n, L'*P]); a checkpoint writer streams the table
    this way instead of holding a second multi-gigabyte copy. :meth:`materialize` gathers all rows at once.
    """

    def __init__(self, table: torch.Tensor, kept: Sequence[int], num_layers: int):
        rows, width = table.shape
        if width % num_layers:
            raise MatformerError(
                f"per-layer table of shape {tuple(table.shape)} does not split into {num_layers} layers"
            )
        self.table = table
        self.block = width // num_layers
        self.num_layers = num_layers
        self.index = torch.tensor(list(kept))
        self.shape = torch.Size([rows, len(kept) * self.block])
        self.dtype = table.dtype

    def __getitem__(self, rows: slice) -> torch.Tensor:
        part = self.table[rows]  # [n, L*P]
        blocks = part.view(part.shape[0], self.num_layers, self.block).index_select(1, self.index)  # [n, L', P]
        return blocks.reshape(part.shape[0], -1)

    def materialize(self) -> torch.Tensor:
        return self[0 : self.shape[0]]


_LAYER = re.compile(r"layers\.(\d+)\.(.*)")


def slice_tensors(
    tensors: Mapping[str, torch.Tensor], plan: SlicePlan, prefix: str, *, lazy_table: bool = False
) -> dict[str, torch.Tensor | KeptColumns]:
    """Published-name tensors of the original checkpoint -> those of the slice (views where a view can express it).

    Only the rows and columns kept are read: FFN gate/up projections are prefix views of the memory map, the down
    projection's kept columns are copied into one contiguous block (the decode kernels want a dense matrix), and the
    per-layer table is gathered (a :class:`KeptColumns` when ``lazy_table``). Towers and names outside the language
    model pass through unchanged.
    """
    new_index = {old: new for new, old in enumerate(plan.kept)}
    width_of = dict(zip(plan.kept, plan.widths, strict=True))
    out: dict[str, torch.Tensor | KeptColumns] = {}
    for name, tensor in tensors.items():
        if not name.startswith(prefix):
            out[name] = tensor
            continue
        local = name[len(prefix) :]
        match = _LAYER.fullmatch(local)
        if match:
            old, rest = int(match.group(1)), match.group(2)
            if old not in new_index:
                continue
            width = width_of[old]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                tensor = tensor[:width]  # [I, H] -> [w, H]
            elif rest == "mlp.down_proj.weight" and tensor.shape[1] != width:
                tensor = tensor[:, :width].contiguous()  # [H, I] -> [H, w]
            out[f"{prefix}layers.{new_index[old]}.{rest}"] = tensor
        elif local == "embed_tokens_per_layer.weight" and plan.skips_layers:
            table = KeptColumns(tensor, plan.kept, plan.num_layers)
            out[name] = table if lazy_table else table.materialize()
        elif local == "per_layer_model_projection.weight" and plan.skips_layers:
            rows = tensor.view(plan.num_layers, -1, tensor.shape[1])  # [L, P, H]
            out[name] = rows.index_select(0, torch.tensor(plan.kept)).reshape(-1, tensor.shape[1])  # [L'*P, H]
        else:
            out[name] = tensor
    return out


def slice_checkpoint(
    config: Gemma3nConfig, tensors: Mapping[str, torch.Tensor], matformer: MatformerSpec | Mapping[str, Any] | str
) -> tuple[Gemma3nConfig, dict[str, torch.Tensor]]:
    """The sliced config and tensors (published names) for ``gemma3n.load(..., matformer=...)``."""
    plan = plan_slice(config.text, matformer)
    return sliced_config(config, plan), slice_tensors(tensors, plan, text_prefix(config))  # type: ignore[return-value]


def effective_parameters(text: TextConfig) -> int:
    """Parameters the decoder multiplies with per token: all of it but the two embedding tables (token embedding,
    per-layer table), which are only looked up (the LM head reuses the token embedding)."""
    from .text_model import TextModel

    with torch.device("meta"):
        model = TextModel(text)
    tables = {"embed_tokens.weight", "embed_tokens_per_layer.weight"}
    return sum(p.numel() for name, p in model.named_parameters() if name not in tables)
