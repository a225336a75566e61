"""Gemma3n: the whole model (text decoder + optional vision and audio towers) and checkpoint loading."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoint import attach_weights, checkpoint_dtype, read_checkpoint_tensors
from .config import Gemma3nConfig, read_config_json
from .devices import resolve_device, resolve_dtype
from .gemma_config import FAMILIES, GemmaConfig
from .loaded_model import LoadedModel
from .matformer import MatformerSpec, slice_checkpoint
from .model_names import resolve_model_name
from .text_model import KVCache, TextModel
from .text_model.heads import ModelOutput

if TYPE_CHECKING:
    from .heads import FamilyModel


class Gemma3n(LoadedModel):
    """Gemma 3n: text decoder plus, when configured, the vision and audio towers and their embedders."""

    supports_cuda_graphs = True  # its decode step never syncs with the host (tests/test_cuda.py checks the tokens)

    def __init__(self, config: Gemma3nConfig, *, text_only: bool = False):
        super().__init__()
        self.config = config
        self.language_model = TextModel(config.text)
        self.has_vision = config.vision is not None and not text_only
        self.has_audio = config.audio is not None and not text_only
        self._tower_weight_hooks: list = []  # set by stream_tower_weights()
        if self.has_vision:
            from .encoders.embedder import MultimodalEmbedder
            from .encoders.vision import VisionTower

            self.vision_tower = VisionTower(config.vision, config.vision_soft_tokens_per_image)
            self.embed_vision = MultimodalEmbedder.from_config(config.vision, config.text)
        if self.has_audio:
            from .encoders.audio import AudioEncoder
            from .encoders.embedder import MultimodalEmbedder

            self.audio_tower = AudioEncoder(config.audio)
            self.embed_audio = MultimodalEmbedder.from_config(config.audio, config.text)

    # ---- loading --------------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | str | None = None,
        text_only: bool = False,
        ple_device: torch.device | str | None = None,
        quantize: str | None = None,
        matformer: MatformerSpec | dict[str, Any] | str | None = None,
        low_memory: bool | None = None,
    ) -> Gemma3n:
        """Load a checkpoint in the published Hugging Face layout: a directory, "tiny-random" or a hub id.

        The model is built on the meta device and the memory-mapped tensors are attached directly (cast to ``dtype``,
        default: the checkpoint's own dtype), so weights are never held twice. ``text_only`` skips the towers.
        ``ple_device="cpu"`` keeps the per-layer embedding table (2B parameters for E2B) in host memory (pinned when
        the model is on CUDA); each step gathers only the rows of its tokens and copies them to the model's device.
        ``quantize="int8" | "int4"`` (CPU or CUDA) makes the text decoder's linear layers and the LM head weight-only
        int8 / int4, quantized tensor by tensor from the memory-mapped checkpoint; see :mod:`gemma3n.quantize`.
        ``matformer`` (a preset name or ``{"ffn_dims": ..., "skip_layers": [...]}``) loads a MatFormer slice of the
        checkpoint, reading only the kept rows and columns; see :mod:`gemma3n.matformer`.
        ``low_memory`` (CPU; default: on with ``quantize``, off otherwise) keeps the vision and audio towers' weights
        on disk: each tower block's memory-mapped pages are dropped after the block has run, and the vision
        convolutions keep no packed weight copy; outputs are unchanged; see :mod:`gemma3n.low_memory`.

        On the CPU, decode steps read only the active channels of the sparse MLP layers (E2B: about 5% of the up and
        down weights of the first 10 layers; unquantized or int8 weights), at the cost of a transposed copy of those
        layers' ``down_proj`` weights (E2B: 320 MB in bf16, 160 MB in int8);
        ``model.language_model.enable_sparse_decode(False)`` drops it.
        """
        path = resolve_model_name(path)  # a directory, "tiny-random" or a hub id
        device = resolve_device(device)
        if ple_device is not None:
            ple_device = resolve_device(ple_device, "ple_device")
        config = Gemma3nConfig.from_pretrained(path)
        tensors = read_checkpoint_tensors(path)
        if matformer is not None:
            config, tensors = slice_checkpoint(config, tensors, matformer)
        dtype = resolve_dtype(dtype) or checkpoint_dtype(tensors.values())
        with torch.device("meta"):
            model = cls(config, text_only=text_only)
        renamed, ignore = _published_to_module_names(tensors, model, text_only_layout=config.text_only_layout)
        if quantize is not None:
            from .quantize import quantize_checkpoint

            renamed = quantize_checkpoint(model, renamed, quantize, dtype=dtype, device=device)
        overrides = {}
        if ple_device is not None:
            overrides["language_model.embed_tokens_per_layer.weight"] = ple_device
        attach_weights(
            model, renamed, dtype=dtype, device=device, ignore=ignore, source=str(path), device_overrides=overrides
        )
        table = model.language_model.embed_tokens_per_layer.weight
        if ple_device is not None and torch.device(ple_device).type == "cpu" and torch.device(device).type == "cuda":
            model.language_model.embed_tokens_per_layer.weight = nn.Parameter(table.pin_memory(), requires_grad=False)
        model.path = path
        if quantize is not None and device.type == "cpu":
            from .quantize import tile_int8_layers

            tile_int8_layers(model)  # before sparse decode, which keeps its layers in rows
        model.language_model.advise_row_reads()  # uncached rows read from disk row by row, not by read-ahead windows
        if device.type == "cpu":
            model.language_model.enable_sparse_decode()  # row-gatherable copies of each sparse layer's weights
        if low_memory is None:
            low_memory = quantize is not None
        if low_memory and torch.device(device).type == "cpu":
            model.stream_tower_weights()
        return model.eval().requires_grad_(False)

    def stream_tower_weights(self, enable: bool = True) -> Gemma3n:
        """Keep the towers' memory-mapped weights on disk between blocks, and no packed vision weights between calls
        (``enable=False``: back to resident weights); see :mod:`gemma3n.low_memory`."""
        from .low_memory import stream_tower_weights

        if bool(self._tower_weight_hooks) == enable:
            return self
        for handle in self._tower_weight_hooks:
            handle.remove()
        self._tower_weight_hooks = []
        if self.has_vision:
            self.vision_tower.keep_packed_weights(not enable)
            if enable:
                self._tower_weight_hooks += stream_tower_weights(self.vision_tower, self.vision_tower.timm_model)
        if self.has_audio and enable:
            self._tower_weight_hooks += stream_tower_weights(self.audio_tower)
        return self

    @property
    def token_embedding(self) -> torch.Tensor:
        return self.language_model.embed_tokens.weight

    # ---- inputs ---------------------------------------------------------------------------------------------------
    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Embeddings [B, T, H] for a prompt: text tokens, modality hard tokens, and soft tokens at placeholders."""
        cfg = self.config
        lm = self.language_model
        embeds = lm.embed(input_ids)
        if self.has_vision:
            embeds = self._embed_hard(
                embeds,
                input_ids,
                self.embed_vision,
                cfg.vision.vocab_offset,
                cfg.audio.vocab_offset if cfg.audio else None,
            )
        if self.has_audio:
            embeds = self._embed_hard(embeds, input_ids, self.embed_audio, cfg.audio.vocab_offset, None)
        if pixel_values is not None:
            if not self.has_vision:
                raise ValueError("pixel_values given, but this model has no vision tower")
            soft = self.embed_vision.embed_soft(self.vision_tower(pixel_values.to(self.device, self.dtype)))
            embeds = _scatter_soft_tokens(embeds, input_ids, cfg.image_token_id, soft, "image")
        if input_features is not None:
            if not self.has_audio:
                raise ValueError("input_features given, but this model has no audio tower")
            soft = self.audio_soft_tokens(input_features, input_features_mask)
            embeds = _scatter_soft_tokens(embeds, input_ids, cfg.audio_token_id, soft, "audio")
        return embeds

    def _embed_hard(self, embeds, input_ids, embedder, lo: int, hi: int | None) -> torch.Tensor:
        # computed for every position (no host sync): a plain where keeps the step graph-friendly
        inside = input_ids >= lo if hi is None else (input_ids >= lo) & (input_ids < hi)
        ids = torch.where(inside, input_ids, torch.full_like(input_ids, lo))
        hard = embedder.embed_hard(ids, check=False).to(embeds.dtype)
        return torch.where(inside[..., None], hard, embeds)

    def audio_soft_tokens(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None) -> torch.Tensor:
        """Audio soft tokens [n_clips, audio_soft_tokens_per_image, H], padded as the reference pads them."""
        cfg = self.config
        features = input_features.to(self.device, self.dtype)
        if input_features_mask is None:
            input_features_mask = torch.ones(features.shape[:2], dtype=torch.bool, device=self.device)
        encodings, valid = self.audio_tower(features, input_features_mask.to(self.device).bool())
        soft = self.embed_audio.embed_soft(encodings)  # [n, T', H]
        # Padding positions (and the tail up to the fixed count) take the embedding of the last text-vocab id
        # through the audio embedder's hard path, as the reference does.
        pad_id = torch.tensor([[cfg.text.vocab_size - 1]], device=self.device)
        pad = self.embed_audio.embed_hard(pad_id, check=False).to(soft.dtype)  # [1, 1, H]
        soft = torch.where(valid[..., None], soft, pad)
        n, length, hidden = soft.shape
        if length > cfg.audio_soft_tokens_per_image:
            raise ValueError(
                f"audio encoder produced {length} soft tokens per clip, more than the "
                f"{cfg.audio_soft_tokens_per_image} placeholders per clip "
                f"(input_features of {features.shape[1]} frames)"
            )
        tail = pad.expand(n, cfg.audio_soft_tokens_per_image - length, hidden)
        return torch.cat([soft, tail], dim=1)

    # ---- forward --------------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        input_features_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        logits_to_keep: int | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Logits for a batch of prompts (images / audio written at their placeholder tokens).

        ``token_type_ids`` (what the processor returns) are accepted so ``model(**inputs)`` works, and unused, as in
        the reference: the placeholder tokens already say where images and audio go.
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if position_ids is not None:
            position_ids = position_ids.to(self.device)
        embeds = self.embed_inputs(input_ids, pixel_values, input_features, input_features_mask)
        logits = self.language_model(
            inputs_embeds=embeds,
            ple_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            start=start,
            logits_to_keep=logits_to_keep,
        )
        return ModelOutput(logits=logits)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Generate continuations; see :func:`gemma3n.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, **kwargs)


def _scatter_soft_tokens(
    embeds: torch.Tensor, input_ids: torch.Tensor, token_id: int, soft: torch.Tensor, kind: str
) -> torch.Tensor:
    """Write ``soft`` [n_items, tokens_per_item, H] at the ``token_id`` positions of ``input_ids`` (row-major)."""
    placeholder = input_ids == token_id
    n_slots = int(placeholder.sum())
    n_soft = soft.shape[0] * soft.shape[1]
    if n_slots != n_soft:
        per_item = soft.shape[1]
        raise ValueError(
            f"{kind} placeholders and {kind} inputs do not match: the prompt holds {n_slots} <{kind}_soft_token> "
            f"tokens but {soft.shape[0]} {kind} input(s) give {n_soft} soft tokens ({per_item} each)"
        )
    return embeds.masked_scatter(placeholder[..., None], soft.to(embeds.dtype))


def _published_to_module_names(
    tensors: dict[str, torch.Tensor], model: Gemma3n, *, text_only_layout: bool
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Map published tensor names to this module's names; also return the names to skip knowingly."""
    renamed: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if name == "lm_head.weight":
            continue  # tied to the token embedding
        if text_only_layout:
            key = "language_model." + name.removeprefix("model.") if name.startswith("model.") else name
        else:
            key = name.removeprefix("model.")
        renamed[key] = tensor
    ignore = set()
    cfg = model.config.text
    for i in range(cfg.first_kv_shared_layer, cfg.num_hidden_layers):
        for part in ("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias", "k_norm.weight", "v_norm.weight"):
            ignore.add(f"language_model.layers.{i}.self_attn.{part}")
    prefixes = []
    if not model.has_vision:
        prefixes += ["vision_tower.", "embed_vision."]
    if not model.has_audio:
        prefixes += ["audio_tower.", "embed_audio."]
    ignore.update(k for k in renamed if k.startswith(tuple(prefixes)))
    return renamed, ignore


def load(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str | None = None,
    text_only: bool = False,
    ple_device: torch.device | str | None = None,
    quantize: str | None = None,
    matformer: MatformerSpec | dict[str, Any] | str | None = None,
    low_memory: bool | None = None,
) -> Gemma3n | FamilyModel:
    """Load a checkpoint (a directory in the published Hugging Face layout, "tiny-random" or a hub id) onto
    ``device`` in ``dtype`` (default: the checkpoint's own), as the model its ``config.json`` describes.

    Gemma 3n gives a :class:`Gemma3n`; Gemma and Gemma 2 give a :class:`gemma3n.heads.CausalLM`,
    ``SequenceClassifier`` or ``TokenClassifier`` after the config's ``architectures``. ``quantize`` ("int8",
    "int4", None) applies to all of them. See :meth:`Gemma3n.from_pretrained` for ``text_only``, ``ple_device``,
    ``matformer`` and ``low_memory``, which are Gemma 3n's (``text_only`` changes nothing for the text-only families).
    """
    path = resolve_model_name(path)
    data = read_config_json(path)
    if data.get("model_type") in FAMILIES:
        from .heads import load_family_model

        config = GemmaConfig.from_dict(data)
        for name, value in (("ple_device", ple_device), ("matformer", matformer), ("low_memory", low_memory)):
            if value is not None:
                raise ValueError(f"{name}= applies to Gemma 3n checkpoints; {path} holds a {config.model_type} model")
        return load_family_model(path, config, device=device, dtype=dtype, quantize=quantize)
    return Gemma3n.from_pretrained(
        path,
        device=device,
        dtype=dtype,
        text_only=text_only,
        ple_device=ple_device,
        quantize=quantize,
        matformer=matformer,
        low_memory=low_memory,
    )
