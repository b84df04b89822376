"""LowPrecisionAdamW: AdamW with FP8 / BF16 moments (docs/papers.md §1.4), exact math, storage, checkpoints."""

import copy
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from megatron_lowp.config import load_config
from megatron_lowp.errors import UserError
from megatron_lowp.model import build_model
from megatron_lowp.numerics import fake_quantize, quantize
from megatron_lowp.optim import LowPrecisionAdamW, build_optimizer
from megatron_lowp.precision.recipe import PrecisionRecipe
from megatron_lowp.train import train
from tests.test_train import checkpoint_tensors, losses, small_cfg

LRS = [1e-2, 3e-2, 2e-2, 5e-3, 1e-2, 0.0, 1e-2]  # per-step lr, set on the groups like the training loop does
BETAS, EPS = (0.9, 0.95), 1e-8


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 48, generator=g), torch.randn(24, 16, generator=g), torch.randn(48, generator=g)]


def grads_for(step, params):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g) * (1 + step) for p in params]


def groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def run_optimizer(make_opt, steps=None, seed=0):
    steps = len(LRS) if steps is None else steps
    params = [nn.Parameter(p) for p in make_params(seed)]
    opt = make_opt(groups(params))
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        for p, g in zip(params, grads_for(step, params), strict=True):
            p.grad = g
        opt.step()
    return params, opt


def reference_adamw(moments):
    """AdamW written out by hand in FP32 (torch's ops in torch's order), with the stored moments
    quantize-dequantized after each step through numerics' quantize / fake_quantize."""
    params = make_params()
    wds = [0.1, 0.1, 0.0]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    beta1, beta2 = BETAS
    for step in range(len(LRS)):
        lr, t = LRS[step], float(step + 1)
        for i, (p, g) in enumerate(zip(params, grads_for(step, params), strict=True)):
            p.mul_(1 - lr * wds[i])
            m[i].lerp_(g, 1 - beta1)
            v[i].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v[i].sqrt() / (1 - beta2**t) ** 0.5).add_(EPS)
            p.addcdiv_(m[i], denom, value=-(lr / (1 - beta1**t)))
            if moments == "bf16":
                m[i], v[i] = m[i].bfloat16().float(), v[i].bfloat16().float()
            elif moments == "fp8" and p.ndim >= 2:
                m[i] = fake_quantize(m[i], "fp8_e4m3")  # per-tensor FMAX/amax scale, nearest-even
                qv = quantize(v[i], "fp8_e5m2")
                codes = qv.data.float()
                codes = torch.where((v[i] > 0) & (codes == 0), 2.0**-16, codes)  # the v floor
                v[i] = codes / qv.scale
    return params, m, v


def stored(opt, p, key):
    s = opt.state[p]
    scale = s.get(key + "_scale", torch.tensor(1.0))
    return s[key].float() / scale


def test_fp32_storage_is_torch_adamw_bit_for_bit():
    ours, opt = run_optimizer(lambda g: LowPrecisionAdamW(g, lr=1.0, betas=BETAS, eps=EPS, moments="fp32"))
    theirs, ref = run_optimizer(lambda g: torch.optim.AdamW(g, lr=1.0, betas=BETAS, eps=EPS, foreach=False))
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[a][key], ref.state[b][key])


@pytest.mark.parametrize("moments", ["fp8", "bf16"])
def test_lowp_moments_equal_hand_written_reference_bit_for_bit(moments):
    ours, opt = run_optimizer(lambda g: LowPrecisionAdamW(g, lr=1.0, betas=BETAS, eps=EPS, moments=moments))
    params, m, v = reference_adamw(moments)
    for i, p in enumerate(ours):
        assert torch.equal(p.detach(), params[i]), i
        assert torch.equal(stored(opt, p, "exp_avg"), m[i]), i
        assert torch.equal(stored(opt, p, "exp_avg_sq"), v[i]), i
    # and the quantization really happened: the FP8 moments differ from what FP32 storage would hold
    fp32_params, _, _ = reference_adamw("fp32")
    assert not torch.equal(ours[0].detach(), fp32_params[0])


def test_fp8_moments_track_torch_adamw_on_regression():
    torch.manual_seed(0)
    x = torch.randn(512, 32)
    w_true = torch.randn(32, 16)
    y = x @ w_true + 0.01 * torch.randn(512, 16)

    def train(make_opt):
        torch.manual_seed(1)
        model = nn.Linear(32, 16)  # weight: FP8 moments; bias (1-D): FP32 moments
        opt = make_opt(model.parameters())
        losses = []
        for _ in range(200):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    kw = {"lr": 3e-2, "betas": (0.9, 0.95), "weight_decay": 0.0}
    ref_losses, ref_w = train(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw))
    fp8_losses, fp8_w = train(lambda ps: LowPrecisionAdamW(ps, moments="fp8", **kw))
    # both converge: loss 35 -> ~1e-4 (the noise floor), within 5% of each other at the end
    assert fp8_losses[-1] < 1e-4 * fp8_losses[0] and ref_losses[-1] < 1e-4 * ref_losses[0]
    assert fp8_losses[-1] == pytest.approx(ref_losses[-1], rel=0.05)
    # the first 50 steps (loss 35 -> 2.5) stay within 10% of torch's curve (measured: 4.7%)
    assert all(abs(a - b) <= 0.1 * b for a, b in zip(fp8_losses[:50], ref_losses[:50], strict=True))
    # and the solutions agree to 0.5% (relative L2; measured 0.07%)
    assert ((fp8_w - ref_w).norm() / ref_w.norm()).item() < 5e-3


def test_state_dtypes_and_bytes():
    def one_step(moments):
        params = [nn.Parameter(torch.randn(64, 64)), nn.Parameter(torch.ones(64))]
        opt = LowPrecisionAdamW(params, moments=moments)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        return params, opt

    (w, gain), opt = one_step("fp8")
    assert opt.state[w]["exp_avg"].dtype == torch.float8_e4m3fn
    assert opt.state[w]["exp_avg_sq"].dtype == torch.float8_e5m2
    assert opt.state[w]["exp_avg_scale"].dtype == opt.state[w]["exp_avg_sq_scale"].dtype == torch.float32
    assert opt.state[gain]["exp_avg"].dtype == opt.state[gain]["exp_avg_sq"].dtype == torch.float32
    assert "exp_avg_scale" not in opt.state[gain]
    # bytes: 2-D 4096 x (1 + 1) + two fp32 scales + fp32 step; 1-D 64 x (4 + 4) + step
    assert opt.state_bytes() == {"bytes": 4096 * 2 + 8 + 4 + 64 * 8 + 4, "params": 4160,
                                 "per_param": (4096 * 2 + 8 + 4 + 64 * 8 + 4) / 4160}
    (w16, _), opt16 = one_step("bf16")
    assert opt16.state[w16]["exp_avg"].dtype == opt16.state[w16]["exp_avg_sq"].dtype == torch.bfloat16
    assert opt16.state_bytes()["bytes"] == 4160 * 4 + 2 * 4
    _, opt32 = one_step("fp32")
    assert opt32.state_bytes()["bytes"] == 4160 * 8 + 2 * 4
    assert opt.state_bytes()["per_param"] < 2.2 and opt32.state_bytes()["per_param"] > 8


def test_outlier_saturates_to_fmax_and_zero_moment_stays_zero():
    lr = 1e-3
    w = nn.Parameter(torch.zeros(4, 256))
    z = nn.Parameter(torch.ones(8, 8))
    opt = LowPrecisionAdamW([w, z], lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    g = torch.full((4, 256), 5e-2)
    g[1::2] *= -1
    g[0, 0] = 1e4  # one huge outlier sets both scales
    w.grad, z.grad = g, torch.zeros(8, 8)
    opt.step()
    s = opt.state[w]
    m_codes, v_codes = s["exp_avg"].float(), s["exp_avg_sq"].float()
    # the outlier maps onto the format max; m = 0.1 * g, v = 0.05 * g^2
    assert m_codes[0, 0] == 448 and s["exp_avg_scale"] == pytest.approx(448 / 1e3, rel=1e-6)
    assert v_codes[0, 0] == 57344 and s["exp_avg_sq_scale"] == pytest.approx(57344 / 5e6, rel=1e-6)
    # m of the ordinary elements (5e-3 * 0.448 = 2^-8.8) rounds to E4M3's smallest subnormal 2^-9
    assert torch.all(m_codes.flatten()[1:].abs() == 2.0**-9)
    # v of the ordinary elements (1.25e-4 * 0.0115 = 2^-19.5) is below E5M2's 2^-16: floored, not flushed
    assert torch.all(v_codes.flatten()[1:] == 2.0**-16)
    # so no element takes a giant m / eps step: every step is at most lr in size (Adam's step-1 bound)
    assert torch.isfinite(w).all() and w.detach().abs().max() <= lr * 1.0001
    # the all-zero moment stays exactly zero with scale 1, and its parameter does not move
    sz = opt.state[z]
    assert torch.all(sz["exp_avg"].reshape(-1).view(torch.uint8) == 0) and torch.all(sz["exp_avg_sq"].reshape(-1).view(torch.uint8) == 0)
    assert sz["exp_avg_scale"] == 1 and sz["exp_avg_sq_scale"] == 1
    assert torch.equal(z.detach(), torch.ones(8, 8))


def test_v_floor_prevents_the_m_over_eps_blowup():
    """Without the floor, v flushed to 0 would give the ordinary elements steps of m / eps."""
    g = torch.full((4, 256), 5e-2)
    g[0, 0] = 1e4
    m = fake_quantize(0.1 * g, "fp8_e4m3")
    v_plain = fake_quantize(0.05 * g * g, "fp8_e5m2")  # plain RNE as in the paper's code
    assert m[0, 1] > 0 and v_plain[0, 1] == 0
    blowup = (m / (v_plain.sqrt() / 0.05**0.5 + 1e-8) / 0.1)[0, 1]
    assert blowup > 1e4  # an update 10000x larger than Adam's bound of ~1 (times lr)


def test_stochastic_rounding_is_reproducible_and_unbiased():
    def run(seed):
        return run_optimizer(lambda g: LowPrecisionAdamW(g, betas=BETAS, moments="fp8", rounding="stochastic",
                                                         sr_seed=seed), steps=3)

    a, opt_a = run(7)
    b, _ = run(7)
    c, _ = run(8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    # each step draws one uniform per element of m and of v of every 2-D parameter
    assert opt_a.sr_generator.offset == 3 * 2 * (32 * 48 + 24 * 16)
    # SR is unbiased: the mean of many stochastic casts of a moment equals it to within 1%
    p = nn.Parameter(torch.zeros(1, 4096))
    opt = LowPrecisionAdamW([p], moments="fp8", rounding="stochastic")
    t = torch.rand(1, 4096) * 0.37 + 0.01
    means = torch.stack([(opt._store_moment(st := {}, p, 0, t), st["exp_avg"].float() / st["exp_avg_scale"])[1]
                         for _ in range(64)]).mean(0)
    assert (means.mean() / t.mean()).item() == pytest.approx(1.0, abs=0.01)


def test_bad_settings_are_user_errors():
    p = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(UserError, match="optim.moments_rounding: 'stochastic' is not available for optim.moments=bf16"):
        LowPrecisionAdamW(p, moments="bf16", rounding="stochastic")
    with pytest.raises(UserError, match="optim.moment2_format: 'fp4' is not one of fp8_e4m3, fp8_e5m2"):
        LowPrecisionAdamW(p, moment2_format="fp4")


def test_state_dict_round_trip_keeps_fp8_bits_and_rejects_a_different_layout():
    params, opt = run_optimizer(lambda g: LowPrecisionAdamW(g, moments="fp8", rounding="stochastic"), steps=3)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["param_groups"][0]["sr_offset"] == opt.sr_generator.offset > 0
    assert sd["param_groups"][0]["moment_storage"] == "fp8 (m fp8_e4m3, v fp8_e5m2)"
    fresh = LowPrecisionAdamW(groups([nn.Parameter(p.detach().clone()) for p in params]), moments="fp8",
                              rounding="stochastic")
    fresh.load_state_dict(sd)
    assert fresh.sr_generator.state_dict() == opt.sr_generator.state_dict()
    assert not {"sr_seed", "sr_offset", "moment_storage"} & set(fresh.param_groups[0])
    for p, q in zip(params, (p for g in fresh.param_groups for p in g["params"]), strict=True):
        for key, value in opt.state[p].items():
            assert fresh.state[q][key].dtype == value.dtype
            assert torch.equal(fresh.state[q][key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))
    other = LowPrecisionAdamW(groups([nn.Parameter(p.detach().clone()) for p in params]), moments="bf16")
    with pytest.raises(UserError, match=r"moments as fp8 \(m fp8_e4m3, v fp8_e5m2\), this run as bf16"):
        other.load_state_dict(copy.deepcopy(sd))
    # a state without the storage note (e.g. written by hand) is still checked tensor by tensor
    del sd["param_groups"][0]["moment_storage"]
    with pytest.raises(UserError, match=r"holds \(exp_avg: float8_e4m3fn.*optim.moments=bf16"):
        other.load_state_dict(copy.deepcopy(sd))


def tiny_model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 8))


def train_steps(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_dcp_save_load_through_get_and_set_state_dict(tmp_path):
    model = tiny_model(0)
    opt = LowPrecisionAdamW(model.parameters(), lr=1e-2, moments="fp8", rounding="stochastic", sr_seed=3)
    train_steps(model, opt, 3, seed=0)
    model_sd, optim_sd = get_state_dict(model, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp_path / "ckpt")

    # a fresh optimizer: get_state_dict initialises its state with a zero-grad, lr=0 step
    model2 = tiny_model(1)
    opt2 = LowPrecisionAdamW(model2.parameters(), lr=1e-2, moments="fp8", rounding="stochastic", sr_seed=99)
    before = [p.detach().clone() for p in model2.parameters()]
    state = dict(zip(("model", "optim"), get_state_dict(model2, opt2), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(before, model2.parameters(), strict=True))  # nothing moved
    assert opt2.param_groups[0]["lr"] == 1e-2
    w = model2[0].weight
    assert opt2.state[w]["exp_avg"].dtype == torch.float8_e4m3fn and opt2.state[w]["exp_avg_scale"] == 1
    assert torch.all(opt2.state[w]["exp_avg"].reshape(-1).view(torch.uint8) == 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=tmp_path / "ckpt")
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])

    assert opt2.sr_generator.state_dict() == opt.sr_generator.state_dict() == {"seed": 3, "offset": opt.sr_generator.offset}
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == opt2.state[q].keys()
        for key, value in opt.state[p].items():
            assert opt2.state[q][key].dtype == value.dtype, key
            assert torch.equal(opt2.state[q][key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)), key
    # and both continue identically (same SR stream, same moments)
    train_steps(model, opt, 2, seed=5)
    train_steps(model2, opt2, 2, seed=5)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters(), strict=True))

    # a resume with other moment settings is refused (DCP alone would cast the scaled FP8 codes into bf16)
    model3 = tiny_model(2)
    opt3 = LowPrecisionAdamW(model3.parameters(), lr=1e-2, moments="bf16")
    state3 = dict(zip(("model", "optim"), get_state_dict(model3, opt3), strict=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state3, checkpoint_id=tmp_path / "ckpt")
    with pytest.raises(UserError, match=r"stores its Adam moments as fp8 \(m fp8_e4m3, v fp8_e5m2\), this run as bf16"):
        set_state_dict(model3, opt3, model_state_dict=state3["model"], optim_state_dict=state3["optim"])


def test_config_and_build_optimizer():
    base = ["model.vocab_size=50", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
            "model.max_seq_len=16", "train.seq_len=16"]
    cfg = load_config(None, [*base, "optim.moments=fp8"])
    assert (cfg.optim.moments, cfg.optim.moment1_format, cfg.optim.moment2_format, cfg.optim.moments_rounding) == (
        "fp8", "fp8_e4m3", "fp8_e5m2", "nearest")
    with pytest.raises(UserError, match=r"optim.moment1_format: 'fp4' is not allowed; expected one of fp8_e4m3, fp8_e5m2"):
        load_config(None, ["optim.moment1_format=fp4"])
    with pytest.raises(UserError, match=r"optim.moments: 'fp16' is not allowed; expected one of fp32, bf16, fp8"):
        load_config(None, ["optim.moments=fp16"])
    model = build_model(cfg.model, PrecisionRecipe(name="fp32", autocast_dtype=None))
    opt = build_optimizer(model, cfg.optim)
    assert isinstance(opt, LowPrecisionAdamW) and opt.moments == "fp8"
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optim.weight_decay, 0.0]
    cfg32 = load_config(None, base)
    assert type(build_optimizer(model, cfg32.optim)) is torch.optim.AdamW
    with pytest.raises(UserError, match="'stochastic' needs optim.moments=fp8"):
        build_optimizer(model, load_config(None, [*base, "optim.moments_rounding=stochastic"]).optim)
    cfg16 = load_config(None, [*base, "optim.moments=bf16", "optim.moment2_format=fp8_e4m3"])
    assert build_optimizer(model, cfg16.optim).moments == "bf16"


@pytest.mark.parametrize("rounding", ["nearest", pytest.param("stochastic", marks=pytest.mark.slow)])
def test_trainer_resume_is_bit_identical_with_fp8_moments(repo, tmp_path, rounding):
    """tests/test_train.py::test_resume_is_bit_identical with optim.moments=fp8: 8 steps == 4 + resume 4."""
    opts = ["optim.moments=fp8", f"optim.moments_rounding={rounding}", "train.eval_every=0"]
    ref = train(small_cfg(repo, tmp_path, "run.name=ref", *opts))
    first = train(small_cfg(repo, tmp_path, "run.name=split", *opts, "train.stop_at_step=4"))
    assert first.step == 4
    second = train(small_cfg(repo, tmp_path, "run.name=split", *opts))
    assert second.step == 8
    # every logged number of every step, compared exactly
    assert losses(second.run_dir) == losses(ref.run_dir) and len(losses(ref.run_dir)) == 8
    assert losses(ref.run_dir)[-1][1] < losses(ref.run_dir)[0][1] - 0.03  # it trains (8 tiny steps)
    resumed, reference = checkpoint_tensors(second.checkpoint), checkpoint_tensors(ref.checkpoint)
    assert resumed.keys() == reference.keys()
    fp8 = [k for k, v in reference.items() if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)]
    assert len(fp8) >= 10  # the moments in the checkpoint are real FP8 tensors
    assert all(torch.equal(resumed[k].reshape(-1).view(torch.uint8), reference[k].reshape(-1).view(torch.uint8))
               for k in fp8)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference if k not in fp8)


def test_fp16_pts_master_weights_stay_on_the_scaled_fp16_grid_and_converge():
    """optim.master_weights=fp16_pts (the FP8 paper's script): after every step each >= 2-D weight
    times 65504/amax is an FP16 value (up to the FP32 rounding of dividing and re-multiplying by a
    scale that is not a power of two: relative 1e-6, where FP32 weights sit up to 2^-12 off the
    grid); 1-D parameters are untouched; regression still converges."""

    def off_grid(t):
        scaled = t.detach() * (65504.0 / t.detach().abs().max())
        return ((scaled - scaled.to(torch.float16).to(torch.float32)).abs() / scaled.abs().clamp_min(1e-30)).max()

    torch.manual_seed(0)
    x = torch.randn(512, 32)
    y = x @ torch.randn(32, 16) + 0.01 * torch.randn(512, 16)
    torch.manual_seed(1)
    model = nn.Linear(32, 16)
    opt = LowPrecisionAdamW(model.parameters(), lr=3e-2, betas=(0.9, 0.95), weight_decay=0.0, moments="fp8",
                            master_weights="fp16_pts")
    first = None
    for _ in range(200):
        loss = nn.functional.mse_loss(model(x), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert off_grid(model.weight) < 1e-6
    assert off_grid(model.bias) > 1e-5  # 1-D: FP32 as it is
    assert loss.item() < 1e-4 * first
    cfg = load_config(None, ["optim.master_weights=fp16_pts"]).optim
    assert isinstance(build_optimizer(nn.Linear(4, 4), cfg), LowPrecisionAdamW)
    with pytest.raises(UserError, match="optim.master_weights"):
        load_config(None, ["optim.master_weights=fp8"])
