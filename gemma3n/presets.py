"""Published Gemma 3n shapes (config.json of google/gemma-3n-E2B(-it) and -E4B(-it)), for random-weight models,
benchmarks and shape checks. Values only; no weights."""

from __future__ import annotations

import copy
from typing import Any


def _layer_types(n: int) -> list[str]:
    return ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention" for i in range(n)]


def _text(num_layers: int, shared: int, intermediate: int) -> dict[str, Any]:
    return {
        "model_type": "gemma3n_text",
        "vocab_size": 262_400,
        "vocab_size_per_layer_input": 262_144,
        "hidden_size": 2048,
        "hidden_size_per_layer_input": 256,
        "intermediate_size": [intermediate] * num_layers,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 32_768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "sliding_window": 512,
        "layer_types": _layer_types(num_layers),
        "final_logit_softcapping": 30.0,
        "altup_num_inputs": 4,
        "altup_active_idx": 0,
        "altup_coef_clip": 120.0,
        "altup_correct_scale": True,
        "laurel_rank": 64,
        "num_kv_shared_layers": shared,
        "activation_sparsity_pattern": [0.95] * 10 + [0.0] * (num_layers - 10),
        "query_pre_attn_scalar": 256,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


_VISION = {
    "model_type": "gemma3n_vision",
    "architecture": "mobilenetv5_300m_enc",
    "do_pooling": False,
    "hidden_size": 2048,
    "vocab_size": 128,
    "vocab_offset": 262_144,
    "rms_norm_eps": 1e-6,
    "model_args": None,
}

_AUDIO = {
    "model_type": "gemma3n_audio",
    "vocab_size": 128,
    "vocab_offset": 262_272,
    "input_feat_size": 128,
    "hidden_size": 1536,
    "rms_norm_eps": 1e-6,
    "gradient_clipping": 1e10,
    "conf_attention_chunk_size": 12,
    "conf_attention_context_left": 13,
    "conf_attention_context_right": 0,
    "conf_attention_logit_cap": 50.0,
    "conf_num_attention_heads": 8,
    "conf_num_hidden_layers": 12,
    "conf_conv_kernel_size": 5,
    "conf_reduction_factor": 4,
    "conf_residual_weight": 0.5,
    "sscp_conv_channel_size": [128, 32],
    "sscp_conv_group_norm_eps": 1e-3,
    "sscp_conv_kernel_size": [[3, 3], [3, 3]],
    "sscp_conv_stride_size": [[2, 2], [2, 2]],
}


def _full(text: dict[str, Any]) -> dict[str, Any]:
    return {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text,
        "vision_config": copy.deepcopy(_VISION),
        "audio_config": copy.deepcopy(_AUDIO),
        "audio_soft_tokens_per_image": 188,
        "vision_soft_tokens_per_image": 256,
        "boi_token_id": 255_999,
        "eoi_token_id": 262_144,
        "image_token_id": 262_145,
        "boa_token_id": 256_000,
        "eoa_token_id": 262_272,
        "audio_token_id": 262_273,
        "eos_token_id": [1, 106],
        "torch_dtype": "bfloat16",
    }


PRESETS = {
    "e2b": lambda: _full(_text(30, 10, 8192)),
    "e4b": lambda: _full(_text(35, 15, 16_384)),
}


def preset_config_dict(name: str) -> dict[str, Any]:
    """The published config.json contents for ``name`` in {"e2b", "e4b"} (a fresh copy)."""
    try:
        return PRESETS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
