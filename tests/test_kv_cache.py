"""The KV cache (model/kv_cache.py) against the uncached forward it replaces in generation, for both
architectures, in FP32 and under BF16 autocast.

Measured on these models (d_model 64, 2 layers, GQA 4/2 heads, window 32, init_std 0.1, |logits| up
to 6): a prefill is bit-identical to the full forward; token by token the logits differ by at most
2.4e-6 in FP32 (summation order of one-row GEMMs and attention) and 0.031 under BF16 autocast (one
BF16 rounding step at |logit| 4..8); greedy tokens are identical, and so are sampled ones in FP32.
The tolerances leave a few times that margin: a RoPE offset left out moves the logits by 0.25..2.4,
a causal mask not shifted past the cached prefix by 0.29..3.5 (measured, both caught).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_lowp.config import load_config
from megatron_lowp.data import Tokenizer
from megatron_lowp.device import get_device
from megatron_lowp.eval.evaluate import Loaded, continue_tokens
from megatron_lowp.model import build_model
from megatron_lowp.model.kv_cache import KVCache
from megatron_lowp.precision import available_recipes, build_recipe

WINDOW = 32
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_size=128",
         f"model.max_seq_len={WINDOW}", f"train.seq_len={WINDOW}", "model.init_std=0.1"]
TOLERANCE = {"fp32": 2e-5, "bf16": 0.1}  # max |cached - uncached| logit; measured 2.4e-6 and 0.031


def make_loaded(repo, arch: str, dtype: str, recipe: str = "bf16") -> Loaded:
    """A freshly initialized model (seed 0) as `load_model` would return it; dtype fp32 runs the BF16
    recipe's plain linears without autocast."""
    vocab = Tokenizer.load("embedded").vocab_size
    cfg = load_config(repo / "recipes/quickstart.yaml", [*SMALL, f"model.arch={arch}", f"precision.recipe={recipe}",
                                                          f"model.vocab_size={vocab}"],
                      extra_choices={"precision.recipe": available_recipes()})
    device = get_device("cpu")
    rec = build_recipe(cfg, device)
    if dtype == "fp32":
        rec = dataclasses.replace(rec, autocast_dtype=None)
    torch.manual_seed(0)
    model = build_model(cfg.model, rec).eval()
    if arch == "ngpt":  # trained nGPTs learn large logit scales; at init (1) every logit is a cosine
        with torch.no_grad():
            model.sz.mul_(10)
    return Loaded(None, cfg, model, rec, device, 0)


def cached_logits(loaded: Loaded, tokens: torch.Tensor, splits: list[int]) -> torch.Tensor:
    """Logits of `tokens` fed through one cache in pieces of the given lengths."""
    cache = KVCache(loaded.cfg.model.n_layers, loaded.cfg.model.max_seq_len)
    pieces, start = [], 0
    with torch.no_grad(), loaded.device.autocast(loaded.recipe.autocast_dtype):
        for n in splits:
            pieces.append(loaded.model(tokens[:, start:start + n], cache).float())
            start += n
    assert cache.offset == start == tokens.shape[1]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "ngpt"])
def test_cached_forward_equals_the_full_forward(repo, arch, dtype):
    loaded = make_loaded(repo, arch, dtype)
    tokens = torch.randint(0, loaded.cfg.model.vocab_size, (2, WINDOW), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), loaded.device.autocast(loaded.recipe.autocast_dtype):
        full = loaded.model(tokens).float()
    assert full.abs().max() > 1  # logits that tell tokens apart, so a wrong cache shows
    # a prefill is the very forward the uncached model runs: bit-identical
    assert torch.equal(cached_logits(loaded, tokens, [WINDOW]), full)
    one_by_one = cached_logits(loaded, tokens, [8] + [1] * (WINDOW - 8))
    chunks = cached_logits(loaded, tokens, [8, 5, 1, WINDOW - 14])  # several new tokens: the shifted causal mask
    for logits in (one_by_one, chunks):
        assert (logits - full).abs().max().item() < TOLERANCE[dtype]
        assert torch.equal(logits.argmax(-1), full.argmax(-1))
    with pytest.raises(ValueError, match="exceeds model.max_seq_len"):
        cache = KVCache(loaded.cfg.model.n_layers, WINDOW)
        loaded.model(tokens[:, :20], cache)
        loaded.model(tokens[:, :13], cache)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["llama", "ngpt"])
@pytest.mark.parametrize("prompt_len", [5, pytest.param(40, marks=pytest.mark.slow)])  # 5 + 40 new tokens crosses the window; 40 starts past it
def test_cached_generation_gives_the_uncached_tokens(repo, arch, dtype, prompt_len):
    loaded = make_loaded(repo, arch, dtype)
    prompt = torch.randint(0, loaded.cfg.model.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(2))
    ids = prompt.tolist()
    greedy = continue_tokens(loaded, ids, 40, use_cache=True)
    assert greedy == continue_tokens(loaded, ids, 40, use_cache=False)
    assert len(greedy) == 40 or greedy[-1] == Tokenizer.load("embedded").eos_id
    assert len(set(greedy)) > 3  # not one token repeated: the context matters
    if dtype == "fp32":  # in BF16 a logit one rounding step off can move a sampled draw to the next token
        sampled = [continue_tokens(loaded, ids, 20, temperature=1.0, top_k=50, use_cache=cached,
                                   generator=torch.Generator().manual_seed(3)) for cached in (True, False)]
        assert sampled[0] == sampled[1]


@pytest.mark.parametrize("arch, recipe", [("llama", "fp8"), ("llama", "fp4"), ("ngpt", "ngpt_fp4")])
def test_quantized_linears_decode_with_the_cache(repo, arch, recipe):
    """Per-call quantization works unchanged. A per-tensor scale of a 1-token forward is taken over
    that token alone, so FP8/NVFP4 logits move, by less than the recipe itself moves them from BF16
    (measured: FP8 0.23 vs 0.48, NVFP4 1.46 vs 1.65 on this Llama, whose random weights are hard on
    4 bits). nGPT-FP4's fixed amax = 1 scales do not depend on the tokens: exact (measured 0)."""
    loaded = make_loaded(repo, arch, "bf16", recipe)
    reference = make_loaded(repo, arch, "bf16")  # the same weights in plain BF16 linears
    tokens = torch.randint(0, loaded.cfg.model.vocab_size, (2, WINDOW), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), loaded.device.autocast(torch.bfloat16):
        full, bf16 = loaded.model(tokens).float(), reference.model(tokens).float()
    diff = (cached_logits(loaded, tokens, [8] + [1] * (WINDOW - 8)) - full).abs().max().item()
    if recipe == "ngpt_fp4":
        assert diff == 0
    else:
        assert 0 < diff < (full - bf16).abs().max().item()
