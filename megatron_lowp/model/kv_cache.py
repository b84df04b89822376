"""The KV cache for generation: each layer's keys and values of the tokens seen so far, and the
absolute position of the next token (RoPE rotates by absolute positions).

`model(tokens, cache=KVCache(cfg.n_layers, cfg.max_seq_len))` runs a prefill over the prompt; then
each call with the same cache feeds the new tokens only, appends their K/V and advances `offset`.
Without a cache (training, scoring) attention is the plain causal call, unchanged. Buffers hold up
to `capacity` positions (the model's max_seq_len) and are allocated on first use, in the dtype and
on the device the keys arrive in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    def __init__(self, n_layers: int, capacity: int):
        self.capacity = capacity
        self.offset = 0  # absolute position of the next token = tokens cached so far
        self.layers = [LayerKV(self) for _ in range(n_layers)]

    def advance(self, new: int) -> None:
        """Called by the model once every layer has stored the `new` tokens."""
        self.offset += new


class LayerKV:
    """One layer's keys and values, (batch, kv_heads, capacity, head_dim)."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v of the new tokens at positions offset..; return the keys and values of every
        position up to the last new one."""
        start, capacity = self.cache.offset, self.cache.capacity
        end = start + k.shape[2]
        if end > capacity:
            raise ValueError(f"KV cache: {end} positions exceed its capacity of {capacity} (model.max_seq_len)")
        if self.k is None:
            self.k = k.new_empty((*k.shape[:2], capacity, k.shape[3]))
            self.v = v.new_empty((*v.shape[:2], capacity, v.shape[3]))
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV | None = None,
                     scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """Causal scaled_dot_product_attention of q, k, v (batch, heads, new, head_dim). With a cache, k
    and v are stored first and the queries at positions offset.. attend to every position up to
    their own. A prefill (offset 0) makes the very call the uncached forward makes."""
    if cache is None or cache.cache.offset == 0:
        if cache is not None:
            cache.extend(k, v)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    start, new = cache.cache.offset, q.shape[2]
    k, v = cache.extend(k, v)
    # is_causal aligns the mask's top-left corner; queries after a cached prefix need it shifted by
    # `start`. A single query sees every key, so it needs no mask at all.
    mask = None if new == 1 else torch.ones(new, start + new, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
