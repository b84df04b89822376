"""nGPT, the normalized Transformer (Loshchilov et al. 2024), as trained in NVFP4 by "Normalized
Architectures are Natively 4-Bit" (2026). Reference: docs/papers.md sections 3.2
(the Megatron implementation of the NVFP4 paper, followed here) and 4 (the original NVIDIA/ngpt).

- Everything lives on the unit hypersphere: embedding rows, weight rows (input-side projections) or
  columns (output-side projections) are unit vectors, renormalized after every optimizer step
  (`after_optimizer_step`), and the hidden state h is a unit vector per token. No norm layers.
- A block does not add its output to h; it moves h towards it on the sphere:
  h <- N(h + alpha * (N(block(h)) - h)), with a learned per-dimension step alpha (the "eigen learning
  rates", init 0.05).
- Normalization removes the scale a network needs, so it comes back as learned per-channel scalars:
  s_qk (attention temperature), s_u/s_v (MLP pre-activations), s_z (logits). alpha, s_qk and s_z
  are stored as `param = base_scale` (= init_std) and used as `param * (init / base_scale)`, so Adam
  moves the effective value 1/base_scale times faster than the raw parameter (docs/papers.md §3.2); s_u,
  s_v are stored as 1 and used times sqrt(d_model).
- Why it is natively 4-bit: every forward GEMM operand has |x| <= 1. Weight rows/columns and h are
  unit vectors, and with `ngpt_normalize_down_inputs` ("FNGPT") so are the inputs of attn.out and
  mlp.down. NVFP4 can then use a fixed per-tensor scale (amax = 1) for activations and weights: no
  amax reduction, and never an overflow.

N(x) = x / (||x||_2 + 1e-6) over the last dim, in FP32. Where the original nGPT (section 4) differs, a
comment says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lowp.config.schema import ModelConfig
from megatron_lowp.model import llama
from megatron_lowp.model.checkpointing import recompute
from megatron_lowp.model.kv_cache import KVCache, LayerKV, causal_attention
from megatron_lowp.model.llama import ffn_hidden_size, rope_tables, rope_window, rotary_heads
from megatron_lowp.precision.recipe import LinearFactory

EPS = 1e-6  # Megatron's justnorm; the original nGPT divides by ||x|| with no eps

# Weights kept on the sphere, by parameter-name suffix, and the dim their norm runs over. Layout is
# [out, in]: dim 1 makes rows unit vectors (projections reading the hidden state), dim 0 columns
# (projections writing into it). The embedding and lm_head are [vocab, d_model]: rows.
WEIGHT_NORM_DIMS = {
    "embed.weight": 1,
    "lm_head.weight": 1,
    "attn.qkv.weight": 1,
    "mlp.gate.weight": 1,
    "mlp.up.weight": 1,
    "attn.out.weight": 0,
    "mlp.down.weight": 0,
}

# The recipe's MLP gating names (model/llama.py MLP_ACTIVATIONS). Smooth-SwiGLU only exists to bound
# the down projection's input; nGPT ignores it. Per token it would be a no-op anyway (the MLP output,
# and with FNGPT the down input, is normalized per token, which cancels a per-token scale exactly);
# per channel it would not commute with FNGPT's per-token N(.), and FNGPT bounds that input already.
ACTIVATIONS = ("swiglu", "smooth_swiglu", "smooth_swiglu_channel")


# A sum over the tensor-parallel ranks that hold the other channels of a tensor (with its gradient).
SumAcrossShards = Callable[[torch.Tensor], torch.Tensor]


def justnorm(x: torch.Tensor, sum_across_shards: SumAcrossShards | None = None) -> torch.Tensor:
    """N(x): x / (||x||_2 + EPS) along the last dim, computed in FP32, returned in x's dtype. When x is
    this rank's slice of the channels (tensor parallelism), `sum_across_shards` adds the sums of squares
    of all slices, so the norm is the full width's."""
    x32 = x.float()
    if sum_across_shards is None:
        norm = x32.norm(dim=-1, keepdim=True)
    else:
        norm = sum_across_shards(x32.square().sum(dim=-1, keepdim=True)).sqrt()
    return (x32 / (norm + EPS)).type_as(x)


def _whole(p: torch.Tensor) -> torch.Tensor:
    return p


def scalar(dim: int, value: float) -> nn.Parameter:
    """A learned per-channel vector. 1-D, so the optimizer's `ndim >= 2` rule gives it no weight decay."""
    return nn.Parameter(torch.full((dim,), value))


class Attention(llama.Attention):
    """Llama's projections and heads; normalized q/k with the learned s_qk, and no RMSNorm around it."""

    # 1-D parameters with one entry per query channel (head x head_dim): tensor parallelism shards them with the heads
    channel_params = ("sqk",)

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, prefix: str):
        super().__init__(cfg, make_linear, prefix)
        self.base_scale = cfg.init_std
        self.normalize_out_input = cfg.ngpt_normalize_down_inputs
        # s_qk per (query head, head dim), flattened; effective value sqk / base_scale, init 1.
        self.sqk = scalar(self.n_heads * self.head_dim, cfg.init_std)
        # Tensor parallelism (parallel/tensor_parallel.py) shards sqk with the heads and sets these:
        # this rank's slice of a channel-sharded parameter, and the sum over the other heads' ranks
        # that FNGPT's N(y) needs (y holds this rank's heads only).
        self.local_shard: Callable[[torch.Tensor], torch.Tensor] = _whole
        self.sum_across_shards: SumAcrossShards | None = None

    def core(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        """Between the two linears (Llama's forward calls it): RoPE, normalized q/k, attention, FNGPT's N(y)."""
        batch, seq, _ = qkv.shape
        q, k, v = rotary_heads(qkv, self.n_heads, self.n_kv_heads, self.head_dim, cos, sin)
        # logits = sqrt(d_head) * sum_i s_i^2 N(q)_i N(k)_i: cosine similarity times sqrt(d_head) at
        # init (s = 1). The original nGPT multiplies both N(q) and N(k) by s; Megatron folds s^2 into
        # q only, which is the same function and also works when a key head serves several query
        # heads (GQA).
        s2 = (self.local_shard(self.sqk).float() / self.base_scale).pow(2).view(1, self.n_heads, 1, self.head_dim)
        q = (justnorm(q).float() * s2).type_as(v)
        k = justnorm(k).type_as(v)  # a cache stores the normalized keys
        y = causal_attention(q, k, v, cache, scale=math.sqrt(self.head_dim), enable_gqa=self.n_kv_heads != self.n_heads)
        y = y.transpose(1, 2).reshape(batch, seq, -1)
        if self.normalize_out_input:  # FNGPT: unit-norm input of attn.out (not in the original nGPT)
            y = justnorm(y, self.sum_across_shards)
        return y


class MLP(nn.Module):
    """swiglu: silu(v) * u with u = up(h) * s_u, v = gate(h) * s_v (SiLU on the gate, as in our Llama
    and the original nGPT's second half). relu2 (the NVFP4 paper's runs): relu(u)^2, no gate.
    s_u, s_v are stored as 1 and used times sqrt(d_model), which brings u, v = cos(w, h) * sqrt(d) to
    unit scale at init, so SiLU works in its nonlinear range (both halves scaled, as in both codes;
    the nGPT paper writes the sqrt(d) on v only)."""

    # 1-D parameters with one entry per FFN channel: tensor parallelism shards them with gate/up's rows
    channel_params = ("su", "sv")

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, prefix: str):
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.gated = cfg.mlp == "swiglu"
        self.sqrt_d = math.sqrt(cfg.d_model)
        self.normalize_down_input = cfg.ngpt_normalize_down_inputs
        if self.gated:
            self.gate = make_linear(cfg.d_model, hidden, f"{prefix}.gate")
            self.sv = scalar(hidden, 1.0)
        self.up = make_linear(cfg.d_model, hidden, f"{prefix}.up")
        self.su = scalar(hidden, 1.0)
        self.down = make_linear(hidden, cfg.d_model, f"{prefix}.down")
        # Set by tensor parallelism, as in Attention: s_u/s_v are sharded with the FFN channels.
        self.local_shard: Callable[[torch.Tensor], torch.Tensor] = _whole
        self.sum_across_shards: SumAcrossShards | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(recompute(self.activation, self.up(h), self.gate(h) if self.gated else None))

    def activation(self, u: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
        """Between the linears: the scaled (gated) activation, and FNGPT's N(.) of the down input."""
        u = u * (self.local_shard(self.su).to(u.dtype) * self.sqrt_d)  # in the GEMM's output dtype, as Megatron
        if self.gated:
            a = F.silu(v * (self.local_shard(self.sv).to(v.dtype) * self.sqrt_d)) * u
        else:
            a = F.relu(u).square()
        if self.normalize_down_input:  # FNGPT: unit-norm input of mlp.down (not in the original nGPT)
            a = justnorm(a, self.sum_across_shards)
        return a


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, index: int):
        super().__init__()
        self.base_scale = cfg.init_std
        self.alpha_init = cfg.ngpt_alpha_init
        self.attn = Attention(cfg, make_linear, f"layers.{index}.attn")
        self.mlp = MLP(cfg, make_linear, f"layers.{index}.mlp")
        self.attn_alpha = scalar(cfg.d_model, cfg.init_std)
        self.mlp_alpha = scalar(cfg.d_model, cfg.init_std)

    def step(self, h: torch.Tensor, y: torch.Tensor, alpha_param: torch.Tensor) -> torch.Tensor:
        """Move h (unit norm) towards N(y) by alpha per dimension, back onto the sphere. Megatron and
        the original nGPT write N(h) for h inside; h arrives unit-norm here (NGPT.forward normalizes
        the embedding, every block returns N(.)), so plain h is the same up to rounding."""
        alpha = (alpha_param * (self.alpha_init / self.base_scale)).abs()
        return justnorm(h + alpha * (justnorm(y) - h))

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        h = recompute(self.step, h, self.attn(h, cos, sin, cache), self.attn_alpha)
        return recompute(self.step, h, self.mlp(h), self.mlp_alpha)


class NGPT(nn.Module):
    # The model contract (docs/models.md): after_optimizer_step puts every weight matrix back on the
    # unit sphere, so an engine must give it whole, full-precision weights to renormalize.
    constrains_weights = True
    # parallel/tensor_parallel.py can split its blocks (Llama's layout, plus channel_params and the
    # sum_across_shards of FNGPT's norms)
    tensor_parallel = True

    def __init__(self, cfg: ModelConfig, make_linear: LinearFactory, mlp_activation: str = "swiglu"):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("ModelConfig.vocab_size must be resolved (from the tokenizer) before building the model")
        if mlp_activation not in ACTIVATIONS:
            raise ValueError(f"mlp_activation {mlp_activation!r}: nGPT allows {', '.join(ACTIVATIONS)}")
        if mlp_activation != "swiglu" and cfg.mlp != "swiglu":
            raise ValueError(f"mlp_activation {mlp_activation!r} needs a gated MLP (model.mlp: swiglu), not {cfg.mlp}")
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"d_model {cfg.d_model} is not a multiple of n_heads {cfg.n_heads}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, make_linear, i) for i in range(cfg.n_layers))
        self.lm_head = make_linear(cfg.d_model, cfg.vocab_size, "lm_head")
        self.sz = scalar(cfg.vocab_size, cfg.init_std)  # logit scale per vocab entry, effective init 1
        if cfg.tie_embeddings:  # the original nGPT unties; both are row-normalized, so tying is consistent
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weights N(0, init_std^2), then normalized, so the first step already sees unit-norm weights
        (as the original nGPT; Megatron normalizes only after the first step). The GPT-2 1/sqrt(2L)
        factor on output projections is moot: normalization removes any common factor. Scalars take
        their stored init values: alpha, sqk, sz = init_std (effective 0.05, 1, 1), su, sv = 1."""
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                nn.init.normal_(p, 0.0, self.cfg.init_std)
            else:
                nn.init.constant_(p, 1.0 if name.endswith(("mlp.su", "mlp.sv")) else self.cfg.init_std)
        self.normalize_weights()

    def weight_norm_dims(self) -> dict[str, int]:
        """{parameter name: dim its norm runs over} for every weight kept on the sphere (tied weights once)."""
        dims = {}
        for name, _ in self.named_parameters():
            for suffix, dim in WEIGHT_NORM_DIMS.items():
                if name == suffix or name.endswith("." + suffix):
                    dims[name] = dim
        return dims

    @torch.no_grad()
    def normalize_weights(self) -> None:
        """Project the weights back onto the sphere, in place. Plain tensor ops on the parameter, so it
        also works on sharded (DTensor) parameters, where the norm becomes a collective."""
        params = dict(self.named_parameters())
        for name, dim in self.weight_norm_dims().items():
            w = params[name]
            w32 = w.float()
            w.copy_(w32 / w32.norm(dim=dim, keepdim=True).clamp_min(EPS))

    def after_optimizer_step(self) -> None:
        """The training loop calls this after every optimizer.step(): nGPT's weights live on the sphere."""
        self.normalize_weights()

    def residual_stream_parameters(self) -> list[nn.Parameter]:
        """Parameters applied position by position to the hidden state between attention and MLP
        (the steps alpha): under sequence parallelism each rank sees only its positions."""
        return [p for block in self.layers for p in (block.attn_alpha, block.mlp_alpha)]

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq); with a cache, the tokens follow
        the cache.offset tokens stored in it (see model/kv_cache.py)."""
        cos, sin = rope_window(self, tokens.shape[1], cache)
        # Embedding rows are unit vectors already; N makes h exactly the unit vector the blocks and
        # the operand bound assume, even if a weight was loaded or changed without normalization.
        h = justnorm(self.embed(tokens))
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.advance(tokens.shape[1])
        logits = self.lm_head(h)  # cosine similarities: no final norm, h is unit-norm already
        return (logits.float() * (self.sz / self.cfg.init_std)).type_as(logits)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if exclude_embeddings:
            n -= self.embed.weight.numel()
        return n
