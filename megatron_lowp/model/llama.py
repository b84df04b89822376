"""Llama-style decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP.

- Pre-norm blocks: h = x + attn(norm(x)); out = h + mlp(norm(h)).
- RoPE in the "rotate half" layout (the Hugging Face Llama convention), so weights map 1:1 to HF.
- Attention through `scaled_dot_product_attention` (FlashAttention/efficient kernels where the
  device has them), with `enable_gqa` so K/V heads are shared without copies.
- Generation passes a KV cache (model/kv_cache.py): forward(tokens, cache) feeds only the new tokens,
  at absolute positions cache.offset..; without one the forward is the plain causal one.
- Every linear comes from `make_linear(in, out, name)`, the precision recipe's factory, and the MLP
  gating (SwiGLU or Smooth-SwiGLU) is named by the recipe too: the model never knows which number
  format it runs in.
- The parts between the linears (norms, attention core, MLP gating) go through `recompute`, which
  selective activation checkpointing turns into recomputed regions (model/checkpointing.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lowp.config.schema import ModelConfig
from megatron_lowp.model.checkpointing import recompute
from megatron_lowp.model.kv_cache import KVCache, LayerKV, causal_attention
from megatron_lowp.precision.recipe import LinearFactory


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """Explicit size, or Llama's rule: 2/3 of 4*d_model rounded up to a multiple of `multiple_of`."""
    if cfg.ffn_hidden_size is not None:
        return cfg.ffn_hidden_size
    hidden = int(2 * 4 * cfg.d_model / 3)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in FP32 whatever the autocast dtype: the mean of squares loses bits in BF16.
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).type_as(x)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (max_seq_len, head_dim) for the rotate-half layout."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); rotates pairs (i, i + head_dim/2) by position angles."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).type_as(x)


def rotary_heads(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int, cos: torch.Tensor,
                 sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused qkv projection (batch, seq, (n_heads + 2 n_kv_heads) head_dim) -> q, k, v as
    (batch, heads, seq, head_dim), RoPE applied to q and k."""
    batch, seq, _ = qkv.shape
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q = q.view(batch, seq, n_heads, head_dim).transpose(1, 2)
    k = k.view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)
    v = v.view(batch, seq, n_kv_heads, head_dim).transpose(1, 2)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def rope_window(model: nn.Module, seq: int, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's cos/sin rows for `seq` tokens at absolute positions offset.. (0 without a cache)."""
    start = 0 if cache is None else cache.offset
    if start + seq > model.cfg.max_seq_len:
        raise ValueError(f"sequence of {start + seq} tokens exceeds model.max_seq_len = {model.cfg.max_seq_len}")
    return model.rope_cos[start:start + seq], model.rope_sin[start:start + seq]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, prefix: str):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads or cfg.n_heads
        self.head_dim = cfg.d_model // cfg.n_heads
        qkv_out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv = make_linear(cfg.d_model, qkv_out, f"{prefix}.qkv")
        self.out = make_linear(self.n_heads * self.head_dim, cfg.d_model, f"{prefix}.out")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        return self.out(recompute(self.core, self.qkv(x), cos, sin, cache))

    def core(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        """The attention core between the two linears: RoPE, causal attention, heads merged again."""
        batch, seq, _ = qkv.shape
        q, k, v = rotary_heads(qkv, self.n_heads, self.n_kv_heads, self.head_dim, cos, sin)
        y = causal_attention(q, k, v, cache, enable_gqa=self.n_kv_heads != self.n_heads)
        return y.transpose(1, 2).reshape(batch, seq, -1)


class GatedSiLU(nn.Module):
    """SwiGLU's gating, silu(gate) * up. Returns (h, row_scale, col_scale): the down projection's
    input, a per-token factor to multiply its output by, and a per-channel factor to fold into its
    weight's columns (None: nothing to undo)."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return F.silu(gate) * up, None, None


def _nonzero(s: torch.Tensor) -> torch.Tensor:
    return torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row or channel needs no rescaling


class SmoothGatedSiLU(nn.Module):
    """Smooth-SwiGLU (Fishman et al. 2025): divide the linear branch by a detached scale s so the
    down projection's input h = silu(gate) * (up / s) grows linearly, not quadratically, when the
    gate and linear weights align; undo s after (or inside) the down projection. Exact in real
    arithmetic either way:
    - per token (the reference code): s = max|up| over each token's FFN channels; the output row is
      multiplied back by s, since a row scale commutes with x W^T;
    - per channel (the paper's text): s = max|up| over the tokens, one per FFN channel, folded into
      the down-projection weight's columns (W diag(s)) before that weight is quantized."""

    def __init__(self, granularity: str = "token"):
        super().__init__()
        if granularity not in ("token", "channel"):
            raise ValueError(f"Smooth-SwiGLU granularity {granularity!r}: allowed token, channel")
        self.granularity = granularity
        # Tensor parallelism sets this to a MAX over the ranks holding the other FFN channels, so the
        # per-token max spans the whole FFN width (per channel, every channel's max is local).
        self.max_across_shards = None

    def forward(self, gate: torch.Tensor, up: torch.Tensor):
        a = up.detach().abs()
        if self.granularity == "token":
            s = a.amax(dim=-1, keepdim=True)
            s = _nonzero(s if self.max_across_shards is None else self.max_across_shards(s))
            return F.silu(gate) * (up / s), s, None
        s = _nonzero(a.reshape(-1, a.shape[-1]).amax(dim=0))
        return F.silu(gate) * (up / s), None, s


MLP_ACTIVATIONS = {
    "swiglu": GatedSiLU,
    "smooth_swiglu": SmoothGatedSiLU,
    "smooth_swiglu_channel": lambda: SmoothGatedSiLU("channel"),
}


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, prefix: str, activation: str = "swiglu"):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.gate = make_linear(cfg.d_model, hidden, f"{prefix}.gate")
        self.up = make_linear(cfg.d_model, hidden, f"{prefix}.up")
        self.down = make_linear(hidden, cfg.d_model, f"{prefix}.down")
        self.act = MLP_ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, row_scale, col_scale = recompute(self.act, self.gate(x), self.up(x))
        y = self.down(h) if col_scale is None else self.down(h, col_scale=col_scale)
        return y if row_scale is None else y * row_scale


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, index: int, activation: str = "swiglu"):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg, make_linear, f"layers.{index}.attn")
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, make_linear, f"layers.{index}.mlp", activation)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        h = x + self.attn(recompute(self.attn_norm, x), cos, sin, cache)
        return h + self.mlp(recompute(self.mlp_norm, h))


class Llama(nn.Module):
    # The model contract (docs/models.md): weights are free parameters; nothing to restore after a step.
    constrains_weights = False
    # parallel/tensor_parallel.py can split its blocks
    tensor_parallel = True

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, mlp_activation: str = "swiglu"):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved (from the tokenizer) before building the model")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, make_linear, i, mlp_activation) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = make_linear(cfg.d_model, cfg.vocab_size, "lm_head")
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual-output projections scaled by 1/sqrt(2 n_layers) (GPT-2)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq); with a cache, the tokens follow
        the cache.offset tokens stored in it (see model/kv_cache.py)."""
        cos, sin = rope_window(self, tokens.shape[1], cache)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(tokens.shape[1])
        return self.lm_head(self.norm(x))

    def after_optimizer_step(self) -> None:
        """Called by the training loop after every optimizer step; Llama has nothing to do (nGPT
        renormalizes its weights here)."""

    def residual_stream_parameters(self) -> list[nn.Parameter]:
        """Parameters applied position by position to the residual stream (the norms' gains): under
        sequence parallelism each rank sees only its positions."""
        return [m.weight for block in self.layers for m in (block.attn_norm, block.mlp_norm)] + [self.norm.weight]

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n
