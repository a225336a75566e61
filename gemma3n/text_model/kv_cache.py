"""Preallocated key/value cache and the per-step attention context.

Layout (gpt-fast style, allocated once):
  * full-attention layers keep ``[B, kv_heads, max_len, head_dim]``;
  * sliding layers keep a ring of ``[B, kv_heads, W, head_dim]`` with ``W = min(sliding_window, max_len)``:
    absolute position ``p`` lives in slot ``p % W``;
  * KV-shared layers keep nothing: they read the cache of their source layer after it was updated.
``key_valid[B, max_len]`` marks real (non-padding) tokens per absolute position (left padding).

A step processes the ``T`` tokens at absolute positions ``[start, start + T)``. Three shapes of step:
  * ``prefill`` (cache empty, start == 0): attend over the fresh keys; the cache is written as a side effect;
  * ``decode`` (T == 1): write first, then attend under a mask over the ring and over ``cache.visible`` full-attention
    positions: a bucket (power of two, at least 256) covering the written prefix, set by ``prepare_decode``. Shapes
    are static per bucket (graph friendly, one compile per bucket), and the work follows the filled prefix, not the
    allocated length;
  * ``extend`` (T > 1 on a non-empty cache): attend over cached + fresh keys.
"""

from __future__ import annotations

import torch

from ..config import TextConfig

DECODE_BUCKET = 256  # smallest number of full-attention key positions a decode step attends over


def decode_bucket(filled: int, max_len: int) -> int:
    """Key positions to attend over when ``filled`` are written: the next power of two >= 256, at most ``max_len``.

    Attends over at most twice the filled prefix, with few distinct lengths (log2 of the context): few recompiles.
    """
    length = DECODE_BUCKET
    while length < filled:
        length *= 2
    return min(length, max_len)


class KVCache:
    """Keys/values for the layers that own a cache, plus the padding mask over absolute positions."""

    def __init__(
        self,
        config: TextConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        self.config = config
        self.batch_size = batch_size
        self.max_len = max_len
        self.window = min(config.sliding_window, max_len)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        for layer in range(config.first_kv_shared_layer):
            length = self.window if config.layer_types[layer] == "sliding_attention" else max_len
            shape = (batch_size, config.num_key_value_heads, length, config.head_dim)
            self.keys[layer] = torch.zeros(shape, dtype=dtype, device=device)
            self.values[layer] = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0  # tokens written so far (host-side bookkeeping for eager steps)
        self.visible = max_len  # full-attention positions decode steps attend over; see prepare_decode

    def prepare_decode(self, position: int) -> None:
        """Size the next decode steps' attention for writing absolute ``position`` (a host int; no device sync).

        Later decode steps attend over :func:`decode_bucket` positions, which hold every position up to ``position``;
        call again before a step whose position lies beyond. Without a call steps attend over the whole buffer.
        """
        if not 0 <= position < self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; decode step writes position {position}")
        self.visible = decode_bucket(position + 1, self.max_len)

    @property
    def device(self) -> torch.device:
        return self.key_valid.device

    def ring_positions(self, last: torch.Tensor | int) -> torch.Tensor:
        """Absolute position held by each ring slot once position ``last`` is written; -1 for empty slots. [W]"""
        slots = torch.arange(self.window, device=self.device)
        last = torch.as_tensor(last, device=self.device)
        # slot s holds the largest p <= last with p % W == s
        held = slots + self.window * torch.div(last - slots, self.window, rounding_mode="floor")
        return torch.where(held >= 0, held, torch.full_like(held, -1))


def build_mask(
    query_pos: torch.Tensor,
    key_pos: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Boolean attention mask ``[B, 1, T, Lk]`` (True = attend).

    query_pos [T] and key_pos [Lk] are absolute positions (key_pos -1 = empty slot);
    key_valid [B, Lk] marks real tokens.
    A query always sees its own key, so padded queries never produce NaN (their outputs are ignored anyway).
    """
    q = query_pos[:, None]
    k = key_pos[None, :]
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= k > q - window
    mask = allowed[None] & key_valid[:, None, :]
    mask |= (k == q)[None]
    return mask[:, None]


class AttentionContext:
    """What every attention layer of one forward step needs: masks per layer type and how to use the cache."""

    def __init__(
        self,
        config: TextConfig,
        num_tokens: int,
        *,
        cache: KVCache | None = None,
        start: int | torch.Tensor = 0,
        attention_mask: torch.Tensor | None = None,
        batch_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        self.config = config
        self.cache = cache
        self.num_tokens = num_tokens
        window = config.sliding_window
        if cache is None:
            self.mode = "nocache"
            pos = torch.arange(num_tokens, device=device)
            valid = (
                attention_mask.bool()
                if attention_mask is not None
                else torch.ones(batch_size, num_tokens, dtype=torch.bool, device=device)
            )
            self.masks = {
                "full_attention": build_mask(pos, pos, valid, None),
                "sliding_attention": build_mask(pos, pos, valid, window),
            }
            return

        device = cache.device
        if num_tokens == 1 and not (isinstance(start, int) and start == 0):
            self.mode = "decode"
            if isinstance(start, int):
                cache.prepare_decode(start)
            # start may be a 0-d device tensor (graph capture): no host sync below; prepare_decode sized the step.
            self.position = torch.as_tensor(start, device=device).reshape(1)
            cache.key_valid.index_fill_(1, self.position, True)
            self.visible = cache.visible
            full_pos = torch.arange(self.visible, device=device)
            ring_pos = cache.ring_positions(self.position[0])
            ring_valid = cache.key_valid[:, ring_pos.clamp(min=0)]
            self.ring_slot = torch.remainder(self.position, cache.window)
            self.masks = {
                "full_attention": build_mask(self.position, full_pos, cache.key_valid[:, : self.visible], None),
                "sliding_attention": build_mask(self.position, ring_pos, ring_valid, window),
            }
            if isinstance(start, int):
                cache.length = start + 1
            return

        start = int(start)
        end = start + num_tokens
        if end > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} positions; step needs {end}")
        valid = (
            attention_mask.bool()
            if attention_mask is not None
            else torch.ones(cache.batch_size, num_tokens, dtype=torch.bool, device=device)
        )
        cache.key_valid[:, start:end] = valid[:, -num_tokens:]
        self.start, self.end = start, end
        new_pos = torch.arange(start, end, device=device)
        self.new_pos = new_pos
        full_pos = torch.arange(end, device=device)
        if start == 0:
            self.mode = "prefill"
            sliding_keys = new_pos
            sliding_valid = cache.key_valid[:, :end]
        else:
            self.mode = "extend"
            self.old_ring_pos = cache.ring_positions(start - 1)
            sliding_keys = torch.cat([self.old_ring_pos, new_pos])
            sliding_valid = cache.key_valid[:, sliding_keys.clamp(min=0)]
        self.masks = {
            "full_attention": build_mask(new_pos, full_pos, cache.key_valid[:, :end], None),
            "sliding_attention": build_mask(new_pos, sliding_keys, sliding_valid, window),
        }
        cache.length = end

    def keys_values(
        self, layer: int, sliding: bool, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's fresh ``k, v`` [B, kvh, T, hd] and return what its queries attend over."""
        cache = self.cache
        if cache is None:
            return k, v
        ck, cv = cache.keys[layer], cache.values[layer]
        if self.mode == "decode":
            index = self.ring_slot if sliding else self.position
            ck.index_copy_(2, index, k)
            cv.index_copy_(2, index, v)
            if sliding:
                return ck, cv
            return ck[:, :, : self.visible], cv[:, :, : self.visible]
        if not sliding:
            ck[:, :, self.start : self.end] = k
            cv[:, :, self.start : self.end] = v
            return (k, v) if self.mode == "prefill" else (ck[:, :, : self.end], cv[:, :, : self.end])
        if self.mode == "extend":
            attend_k, attend_v = torch.cat([ck, k], dim=2), torch.cat([cv, v], dim=2)
        else:
            attend_k, attend_v = k, v
        keep = min(self.num_tokens, cache.window)  # only the last W fresh tokens survive in the ring
        slots = torch.remainder(self.new_pos[-keep:], cache.window)
        ck.index_copy_(2, slots, k[:, :, -keep:])
        cv.index_copy_(2, slots, v[:, :, -keep:])
        return attend_k, attend_v

    def keep_last(self, n: int) -> AttentionContext:
        """A view of this context whose queries are only the last ``n`` tokens (KV-shared fast prefill)."""
        view = object.__new__(AttentionContext)
        view.__dict__.update(self.__dict__)
        view.masks = {t: m[:, :, -n:] for t, m in self.masks.items()}
        return view
