"""nGPT (model/ngpt.py): the hypersphere invariants, the attention temperature, bounded GEMM operands
(what lets NVFP4 fix amax = 1), causality, training, and a quantized build."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from megatron_lowp.config.schema import ModelConfig
from megatron_lowp.errors import UserError
from megatron_lowp.model import NGPT, build_model, cross_entropy_loss
from megatron_lowp.model.llama import apply_rope
from megatron_lowp.model.ngpt import WEIGHT_NORM_DIMS
from megatron_lowp.precision import GemmSpecs, QuantizedLinear, QuantSpec
from megatron_lowp.precision.quantized import QuantizedRecipe
from megatron_lowp.precision.recipe import PrecisionRecipe

BF16 = PrecisionRecipe("bf16", None)
VOCAB = 97
# The nGPT-NVFP4 paper's forward: activations and weights with the per-tensor amax fixed to 1
# (weights in 16x16 tiles), gradients SR with a dynamic amax; no RHT.
FIXED = (("scale_rounding", "decode"), ("tensor_amax", 1.0), ("tensor_scale", "fixed"))
NV_X = QuantSpec("nvfp4", "nearest", (*FIXED, ("tile", False)))
NV_W = QuantSpec("nvfp4", "nearest", (*FIXED, ("tile", True)))
NV_DY = QuantSpec("nvfp4", "stochastic")
NGPT_FP4 = GemmSpecs(x=NV_X, w=NV_W, dy=NV_DY, w_t=NV_W, dy_t=NV_DY, x_t=NV_X)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tensors here are tiny: intra-op threads only add synchronization (4x slower on a busy 2-core box).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(mlp="swiglu", **kw) -> ModelConfig:
    kw = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "max_seq_len": 32,
          "ffn_hidden_size": 128, "init_std": 0.02, **kw}
    return ModelConfig(arch="ngpt", mlp=mlp, **kw)


def model(mlp="swiglu", recipe=BF16, seed=0, **kw) -> NGPT:
    torch.manual_seed(seed)
    m = build_model(tiny(mlp, **kw), recipe)
    assert isinstance(m, NGPT)
    return m


def batch(seed=1, seq=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, seq), generator=g)


def train(m: NGPT, tokens, steps: int, lr=1e-2) -> list[float]:
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = cross_entropy_loss(m(tokens)[:, :-1], tokens[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step()
        losses.append(loss.item())
    return losses


def linears(m: NGPT) -> dict[str, nn.Module]:
    return {name: mod for name, mod in m.named_modules() if isinstance(mod, (nn.Linear, QuantizedLinear))}


def assert_on_sphere(m: NGPT):
    dims = m.weight_norm_dims()
    per_layer = 5 if m.cfg.mlp == "swiglu" else 4
    assert len(dims) == 2 - m.cfg.tie_embeddings + per_layer * m.cfg.n_layers
    for name, p in m.named_parameters():
        if name in dims:
            norms = p.detach().norm(dim=dims[name])
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_logits_shape_and_finite(mlp):
    m = model(mlp)
    logits = m(batch())
    assert logits.shape == (2, 16, VOCAB) and torch.isfinite(logits).all()
    names = set(linears(m))
    mlp_names = {"gate", "up", "down"} if mlp == "swiglu" else {"up", "down"}
    assert names == {"lm_head"} | {f"layers.{i}.attn.{n}" for i in range(2) for n in ("qkv", "out")} | {
        f"layers.{i}.mlp.{n}" for i in range(2) for n in mlp_names}
    # At init the logits are cosines times s_z = 1, before any training.
    assert logits.abs().max() <= 1 + 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(batch())
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_weights_unit_norm_at_init_and_after_each_step(mlp):
    m = model(mlp)
    assert_on_sphere(m)
    dims = m.weight_norm_dims()
    assert dims["embed.weight"] == 1 and dims["layers.0.attn.out.weight"] == 0 and dims["layers.1.mlp.down.weight"] == 0
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.0)
    tokens = batch()
    cross_entropy_loss(m(tokens)[:, :-1], tokens[:, 1:]).backward()
    opt.step()
    drifted = max((p.detach().norm(dim=dims[n]) - 1).abs().max().item() for n, p in m.named_parameters() if n in dims)
    assert drifted > 1e-3  # the step left the sphere, so the check below can fail
    scalars = {n: p.detach().clone() for n, p in m.named_parameters() if p.ndim == 1}
    assert set(scalars) >= {"sz", "layers.0.attn_alpha", "layers.0.mlp_alpha", "layers.0.attn.sqk", "layers.0.mlp.su"}
    m.after_optimizer_step()
    assert_on_sphere(m)
    for n, p in m.named_parameters():
        if p.ndim == 1:
            assert torch.equal(p, scalars[n]), n  # the scalars are not normalized


def test_tied_embeddings_are_one_row_normalized_weight():
    m = model(tie_embeddings=True)
    assert m.lm_head.weight is m.embed.weight and "lm_head.weight" not in m.weight_norm_dims()
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    assert m.num_params() - m.num_params(exclude_embeddings=True) == VOCAB * 64
    train(m, batch(), 2)
    assert_on_sphere(m)


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_hidden_states_stay_on_the_unit_sphere(mlp):
    m = model(mlp)
    train(m, batch(), 3)  # scalars and weights away from their init
    outs = []
    for layer in m.layers:
        layer.register_forward_pre_hook(lambda mod, args: outs.append(args[0].detach()))
        layer.register_forward_hook(lambda mod, args, out: outs.append(out.detach()))
    m(batch(seed=2))
    assert len(outs) == 2 * m.cfg.n_layers
    for h in outs:
        torch.testing.assert_close(h.norm(dim=-1), torch.ones(2, 16), atol=1e-5, rtol=0)


def record_operands(m: NGPT) -> dict[str, float]:
    amax = {}
    for name, mod in linears(m).items():
        mod.register_forward_pre_hook(lambda mod, args, name=name: amax.__setitem__(name, args[0].abs().max().item()))
    return amax


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_every_gemm_operand_is_bounded_by_one(mlp):
    """The property behind NVFP4 with a fixed tensor amax of 1: no activation or weight entry above 1."""
    m = model(mlp)
    train(m, batch(), 3)
    amax = record_operands(m)
    m(batch(seed=2))
    assert set(amax) == set(linears(m))  # lm_head included: its input is h
    for name, x_max in amax.items():
        assert x_max <= 1 + 1e-6, (name, x_max)
    for name, mod in linears(m).items():
        assert mod.weight.abs().max() <= 1, name


def test_without_fngpt_the_mlp_down_input_is_unbounded():
    m = model("relu2", ngpt_normalize_down_inputs=False)
    amax = record_operands(m)
    m(batch())
    assert amax["layers.0.mlp.down"] > 1  # relu(u)^2 with u ~ N(0, 1): why FNGPT normalizes it
    assert amax["layers.0.attn.qkv"] <= 1 + 1e-6


@pytest.mark.parametrize("perturb_sqk", [False, True])
def test_attention_logits_are_scaled_cosines(perturb_sqk):
    """attn.out's input equals softmax(sqrt(d_head) * sum_i s_i^2 N(q)_i N(k)_i) V, normalized; at
    init s = 1, i.e. sqrt(d_head) * cos(q, k), computed here with F.cosine_similarity."""
    m = model()
    attn = m.layers[0].attn
    if perturb_sqk:
        with torch.no_grad():
            attn.sqk.mul_(torch.rand_like(attn.sqk) + 0.5)
    captured = {}
    m.layers[0].register_forward_pre_hook(lambda mod, args: captured.__setitem__("h", args[0]))
    attn.out.register_forward_pre_hook(lambda mod, args: captured.__setitem__("y", args[0]))
    tokens = batch()
    with torch.no_grad():
        m(tokens)
        h = captured["h"]
        b, t, d_head, heads, kv = 2, 16, 16, 4, 2
        q, k, v = attn.qkv(h).split([heads * d_head, kv * d_head, kv * d_head], dim=-1)
        q = q.view(b, t, heads, d_head).transpose(1, 2)
        k = k.view(b, t, kv, d_head).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        v = v.view(b, t, kv, d_head).transpose(1, 2).repeat_interleave(heads // kv, dim=1)
        cos, sin = m.rope_cos[:t], m.rope_sin[:t]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        s = (attn.sqk / m.cfg.init_std).view(heads, 1, d_head)
        if perturb_sqk:
            qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
            logits = math.sqrt(d_head) * torch.einsum("bhtd,bhsd->bhts", qn * s**2, kn)
        else:
            torch.testing.assert_close(s, torch.ones_like(s), atol=0, rtol=0)
            logits = math.sqrt(d_head) * F.cosine_similarity(q[:, :, :, None], k[:, :, None], dim=-1)
        logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, t, -1)
        y = y / y.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(captured["y"], y, atol=2e-5, rtol=0)


def test_causal():
    m = model()
    tokens = batch()
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    with torch.no_grad():
        a, b = m(tokens), m(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)
    assert (a[:, 10:] - b[:, 10:]).abs().amax(dim=-1).min() > 1e-4


@pytest.mark.parametrize("mlp", ["swiglu", "relu2"])
def test_training_reduces_the_loss(mlp):
    losses = train(model(mlp), batch(), 15)
    assert losses[0] == pytest.approx(math.log(VOCAB), abs=0.2)  # logits in [-1, 1] at init: near uniform
    assert losses[-1] < 0.5 * losses[0], losses


def test_nvfp4_fixed_amax_build_trains():
    recipe = QuantizedRecipe(name="ngpt_nvfp4", autocast_dtype=None, specs=NGPT_FP4, n_layers=2)
    q, ref = model(recipe=recipe), model()
    layers = linears(q)
    assert isinstance(layers["layers.0.mlp.down"], QuantizedLinear) and isinstance(layers["lm_head"], nn.Linear)
    for (name, p), p_ref in zip(q.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, p_ref), name  # same init, so the two runs differ only by quantization
    tokens = batch()
    loss = cross_entropy_loss(q(tokens)[:, :-1], tokens[:, 1:])
    loss_ref = cross_entropy_loss(ref(tokens)[:, :-1], tokens[:, 1:])
    assert loss.item() == pytest.approx(loss_ref.item(), abs=0.02)
    loss.backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    losses = train(q, tokens, 10)
    assert losses[-1] < 0.7 * losses[0], losses
    assert_on_sphere(q)


@pytest.mark.parametrize("activation", ["smooth_swiglu", "smooth_swiglu_channel"])
def test_smooth_swiglu_is_accepted_and_ignored(activation):
    tokens = batch()
    smooth = model(recipe=PrecisionRecipe("bf16", None, mlp_activation=activation))
    assert torch.equal(smooth(tokens), model()(tokens))


def test_invalid_combinations():
    with pytest.raises(UserError, match="model.mlp"):
        build_model(ModelConfig(arch="llama", mlp="relu2", vocab_size=VOCAB), BF16)
    with pytest.raises(UserError, match="smooth_swiglu"):
        build_model(tiny("relu2"), PrecisionRecipe("bf16", None, mlp_activation="smooth_swiglu"))
    with pytest.raises(ValueError, match="mlp_activation"):
        NGPT(tiny(), BF16.make_linear, "geglu")


def test_weight_norm_dims_cover_every_matrix():
    m = model()
    matrices = {n for n, p in m.named_parameters() if p.ndim >= 2}
    assert set(m.weight_norm_dims()) == matrices
    assert set(WEIGHT_NORM_DIMS.values()) == {0, 1}
