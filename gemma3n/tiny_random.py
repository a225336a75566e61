"""A tiny random-weight Gemma 3n checkpoint, so the whole path (processor, towers, decoder, pipelines, CLI) can be
tried without downloading weights. Its outputs are meaningless by construction.

The files follow the published layout of google/gemma-3n-E2B-it: a multimodal ``config.json`` (same vocabulary of
262400 ids, same special-token ids), ``model.safetensors`` with the published tensor names (``model.`` + our module
names), ``generation_config.json`` and the processor files. Only the sizes shrink: a 4-layer 64-wide decoder, the real
MobileNet v5 vision architecture at 1/16 of its channels on 128x128 images (16 soft tokens per image), and a
one-block 32-wide audio conformer that keeps the published strides (188 soft tokens per 30 s clip).

Decoding is greedy (``do_sample: false``) so runs are reproducible, and limited to 16 new tokens by default.

    python -m gemma3n.tiny_random /tmp/tiny-gemma3n
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported where weights are built, so finding the cached checkpoint needs no torch
    import torch

IMAGE_SIZE = 128  # pixels; the vision tower maps 128x128 -> 8x8 -> a 4x4 grid of soft tokens
VISION_SOFT_TOKENS = 16
AUDIO_SOFT_TOKENS = 188  # 30 s -> 3000 frames -> two stride-2 convs -> 750 -> reduction 4 -> 188
MAX_NEW_TOKENS = 16
SEED = 1234
CACHE_ENV = "GEMMA3N_CACHE"
WARNING = "tiny-random: a random-weight model for trying the tools; its outputs are meaningless"


def tiny_config_dict() -> dict[str, Any]:
    """The config.json contents: the published E2B layout with tiny sizes."""
    from .presets import preset_config_dict

    config = preset_config_dict("e2b")
    layers = 4
    config["text_config"].update(
        hidden_size=64,
        hidden_size_per_layer_input=8,
        intermediate_size=[128] * layers,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        num_kv_shared_layers=2,
        laurel_rank=8,
        sliding_window=128,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        activation_sparsity_pattern=[0.95] + [0.0] * (layers - 1),
        torch_dtype="float32",
    )
    config["vision_config"]["model_args"] = {"channel_multiplier": 0.0625, "msfa_output_resolution": 4}
    config["audio_config"].update(
        hidden_size=32,
        conf_num_attention_heads=2,
        conf_num_hidden_layers=1,
        sscp_conv_channel_size=[8, 4],
    )
    config["vision_soft_tokens_per_image"] = VISION_SOFT_TOKENS
    config["audio_soft_tokens_per_image"] = AUDIO_SOFT_TOKENS
    config["torch_dtype"] = "float32"
    return config


def generation_config_dict() -> dict[str, Any]:
    """Greedy decoding (reproducible), the published end ids (<eos>, <end_of_turn>), 16 new tokens by default."""
    return {
        "bos_token_id": 2,
        "eos_token_id": [1, 106],
        "pad_token_id": 0,
        "do_sample": False,
        "max_new_tokens": MAX_NEW_TOKENS,
    }


def random_tensors(
    config_dict: dict[str, Any], seed: int = SEED, silent_ids: list[int] | None = None
) -> dict[str, torch.Tensor]:
    """Deterministic random weights under their published names (``model.`` + module name).

    ``silent_ids``: token ids whose embedding rows are zeroed. Their logits are then 0 (the embedding is tied to the
    output layer) while real tokens get random signs, so greedy decoding prints words rather than filler, byte or
    marker tokens.
    """
    import torch  # no autograd here: state_dict() gives detached tensors and the rest are fresh ones

    from .config import Gemma3nConfig
    from .model import Gemma3n

    config = Gemma3nConfig.from_dict(config_dict)
    with torch.device("meta"):  # only the names, shapes and dtypes are read: no memory, no random init to pay for
        model = Gemma3n(config)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        tensors["model." + name] = _random_like(name, value, generator)
    # The published files also hold key/value projections for the KV-shared layers (the reference builds them even
    # though those layers read another layer's cache); write them so the file set is complete.
    text = config.text
    kv_width = text.num_key_value_heads * text.head_dim
    for i in range(text.first_kv_shared_layer, text.num_hidden_layers):
        prefix = f"model.language_model.layers.{i}.self_attn."
        shapes = {
            "k_proj.weight": (kv_width, text.hidden_size),
            "v_proj.weight": (kv_width, text.hidden_size),
            "k_norm.weight": (text.head_dim,),
        }
        for part, shape in shapes.items():
            tensors[prefix + part] = _random_like(part, torch.empty(shape), generator)
    if silent_ids:
        tensors["model.language_model.embed_tokens.weight"][torch.tensor(silent_ids)] = 0.0
    return tensors


def non_word_token_ids(tokenizer_file: Path, keep: list[int]) -> list[int]:
    """Ids of the ``<...>`` entries of a tokenizer.json (filler ``<unusedN>``, byte pieces, markers) except ``keep``."""
    import tokenizers

    vocab = tokenizers.Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    return sorted(i for token, i in vocab.items() if token.startswith("<") and token.endswith(">") and i not in keep)


def _random_like(name: str, value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Norm scales near 1, matrices scaled by 1/sqrt(fan_in) (activations stay O(1) through deep stacks)."""
    import torch

    if not value.is_floating_point():
        raise ValueError(f"tiny-random: no rule for the non-floating tensor {name!r}")
    noise = torch.randn(value.shape, generator=generator, dtype=torch.float32)
    if value.dim() <= 1:
        leaf = name.rsplit(".", 2)[-2] if name.count(".") else name
        if "norm" in leaf or "bn" in leaf or name.endswith(("gamma", "scale")):
            return 1.0 + 0.1 * noise
        return 0.02 * noise
    if "embed" in name:
        # Small token embeddings: with the output layer tied to them, large ones make every token predict itself.
        return 0.05 * noise
    fan_in = value[0].numel()
    return noise / math.sqrt(fan_in)


def build_tiny_random(directory: str | Path, *, seed: int = SEED) -> Path:
    """Write a complete tiny random checkpoint into ``directory`` (created; existing files replaced); return it.

    Works without transformers. The files are written to a temporary folder first and moved into place, so an
    interrupted build never leaves a half-written checkpoint behind.
    """
    from safetensors.torch import save_file

    from .processors.tiny_files import write_tiny_processor_files

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-random-", dir=directory.parent))
    try:
        config = tiny_config_dict()
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staging / "generation_config.json").write_text(
            json.dumps(generation_config_dict(), indent=2) + "\n", encoding="utf-8"
        )
        write_tiny_processor_files(
            staging,
            image_size=(IMAGE_SIZE, IMAGE_SIZE),
            image_seq_length=VISION_SOFT_TOKENS,
            audio_seq_length=AUDIO_SOFT_TOKENS,
        )
        tensors = random_tensors(config, seed, silent_ids=non_word_token_ids(staging / "tokenizer.json", keep=[1, 106]))
        save_file(
            {k: v.contiguous() for k, v in tensors.items()},
            str(staging / "model.safetensors"),
            metadata={"format": "pt"},
        )
        (staging / "README.md").write_text(
            "# tiny-random Gemma 3n\n\nRandom weights in the published Gemma 3n file layout, written by "
            "`gemma3n.tiny_random`. For trying and testing the tools only: every output is meaningless.\n",
            encoding="utf-8",
        )
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def default_cache_dir() -> Path:
    """``$GEMMA3N_CACHE/tiny-random``, else ``~/.cache/gemma3n/tiny-random``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gemma3n"
    return base / "tiny-random"


def ensure_tiny_random(directory: str | Path | None = None) -> Path:
    """The cached tiny-random checkpoint, built on first use."""
    directory = Path(directory) if directory is not None else default_cache_dir()
    if not (directory / "model.safetensors").is_file() or not (directory / "tokenizer.json").is_file():
        build_tiny_random(directory)
    return directory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a tiny random-weight Gemma 3n checkpoint (meaningless outputs)."
    )
    parser.add_argument("directory", nargs="?", help=f"where to write it (default: {default_cache_dir()})")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    path = build_tiny_random(args.directory or default_cache_dir(), seed=args.seed)
    print(f"wrote a tiny random Gemma 3n checkpoint to {path}")


if __name__ == "__main__":
    main()
