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
    """nGPT builds no Smooth-SwiGLU (the same parameters and function), and it needs none: FNGPT's
    per-token N(.) of the down input cancels any positive per-token scale, the per-token
    Smooth-SwiGLU exactly."""
    tokens = batch()
    smooth, plain = model(recipe=PrecisionRecipe("bf16", None, mlp_activation=activation)), model()
    assert [n for n, _ in smooth.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert torch.equal(smooth(tokens), plain(tokens))
    mlp = plain.layers[0].mlp
    captured = []
    mlp.down.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    h = F.normalize(torch.randn(2, 16, 64), dim=-1)
    mlp(h)
    token_scale = torch.rand(2, 16, 1) * 10 + 0.1
    a = captured[0]  # N(silu(v) * u): unit norm per token
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2, 16), atol=1e-5, rtol=0)
    from megatron_lowp.model.ngpt import justnorm
    torch.testing.assert_close(justnorm(a * token_scale), a, atol=1e-5, rtol=0)


# --- against an independent reference of the papers' formulas ------------------------------------------
# The checks above compare the model with itself; these compute nGPT's update, its initial step size
# and its weight axes from the formulas, at the paper's parametrization (init_std = 1/sqrt(d_model))
# and at 0.02. Each catches a wrong model that once passed the others: the plain residual
# N(h + a N(y)), an effective initial alpha of 1 instead of 0.05, qkv normalized along the wrong axis.
PAPER_STD = 1 / math.sqrt(64)
# Megatron layout [out, in]: projections reading the hidden state have unit rows (dim 1), the ones
# writing into it unit columns (dim 0); embedding and lm_head [vocab, d_model] unit rows.
PAPER_AXES = {"embed.weight": 1, "lm_head.weight": 1, "attn.qkv.weight": 1, "mlp.gate.weight": 1,
              "mlp.up.weight": 1, "attn.out.weight": 0, "mlp.down.weight": 0}


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.double(), dim=-1, eps=0.0)


@pytest.mark.parametrize("init_std", [0.02, PAPER_STD])
def test_the_residual_update_interpolates_on_the_sphere_with_alpha_0_05(init_std):
    """h <- N(h + alpha (N(y) - h)) with alpha = ngpt_alpha_init = 0.05 at init, per dimension."""
    block = model(init_std=init_std).layers[0]
    g = torch.Generator().manual_seed(3)
    h = unit(torch.randn(2, 5, 64, generator=g)).float()
    y = torch.randn(2, 5, 64, generator=g) * 7
    expected = unit(h.double() + 0.05 * (unit(y) - h.double()))
    for alpha in (block.attn_alpha, block.mlp_alpha):
        torch.testing.assert_close(block.step(h, y, alpha).double(), expected, atol=2e-6, rtol=0)
    # a trained alpha moves the step: alpha_param * (0.05 / init_std), per dimension
    with torch.no_grad():
        block.attn_alpha.mul_(torch.linspace(0.5, 3.0, 64))
    alpha = torch.linspace(0.5, 3.0, 64).double() * 0.05
    torch.testing.assert_close(block.step(h, y, block.attn_alpha).double(),
                               unit(h.double() + alpha * (unit(y) - h.double())), atol=2e-6, rtol=0)


@pytest.mark.parametrize("init_std", [0.02, PAPER_STD])
def test_a_block_is_two_interpolation_steps(init_std):
    m = model(init_std=init_std)
    train(m, batch(), 2)  # parameters away from their init
    block = m.layers[1]
    h = unit(torch.randn(2, 16, 64)).float()
    cos, sin = m.rope_cos[:16], m.rope_sin[:16]
    with torch.no_grad():
        a_attn = (block.attn_alpha.double() * 0.05 / init_std).abs()
        h1 = unit(h.double() + a_attn * (unit(block.attn(h, cos, sin)) - h.double()))
        a_mlp = (block.mlp_alpha.double() * 0.05 / init_std).abs()
        h2 = unit(h1 + a_mlp * (unit(block.mlp(h1.float())) - h1))
        torch.testing.assert_close(block(h, cos, sin).double(), h2, atol=3e-6, rtol=0)


@pytest.mark.parametrize("init_std", [0.02, PAPER_STD])
def test_weights_are_unit_along_the_papers_axes(init_std):
    m = model(init_std=init_std)
    train(m, batch(), 2)
    checked = 0
    for name, p in m.named_parameters():
        axis = next((a for suffix, a in PAPER_AXES.items() if name == suffix or name.endswith("." + suffix)), None)
        if axis is None:
            continue
        checked += 1
        norms = p.detach().double().norm(dim=axis)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0, msg=name)
        other = p.detach().double().norm(dim=1 - axis)
        assert (other - 1).abs().max() > 1e-2, f"{name}: unit along both axes?"
    assert checked == 2 + 5 * 2


@pytest.mark.parametrize("init_std", [0.02, PAPER_STD])
def test_the_scalars_start_at_their_papers_values(init_std):
    """Effective values at init: alpha 0.05, s_qk 1, s_z 1, s_u = s_v = 1 (times sqrt(d_model) in use)."""
    m = model(init_std=init_std)
    for block in m.layers:
        for alpha in (block.attn_alpha, block.mlp_alpha):
            torch.testing.assert_close((alpha * (0.05 / init_std)).abs(), torch.full((64,), 0.05))
        torch.testing.assert_close(block.attn.sqk / init_std, torch.ones(64))
        torch.testing.assert_close(block.mlp.su, torch.ones(128))
    torch.testing.assert_close(m.sz / init_std, torch.ones(VOCAB))


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
