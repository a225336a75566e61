"""The Gemma 3n decoder: embeddings, PLE, AltUp, LAuReL, attention with KV sharing, and its KV cache."""

from .kv_cache import AttentionContext, KVCache
from .model import TextModel

__all__ = ["AttentionContext", "KVCache", "TextModel"]
