"""The gradient-noise monitor (the sqrt(3) rule of "FP4 All the Way"): the estimator on synthetic data
with a known answer, and a quadratic toy through a real NVFP4 QuantizedLinear."""

import gc
import json
import math
import weakref

import pytest
import torch
from torch import nn

from megatron_lowp.numerics import fake_quantize
from megatron_lowp.precision import GemmSpecs, QuantizedLinear, QuantSpec, grad_noise, high_precision_backward
from megatron_lowp.precision.grad_noise import GradNoiseReport, measure_gradient_noise, noise_ratio, to_rows

NV = QuantSpec("nvfp4")
NV_SR = QuantSpec("nvfp4", "stochastic")
FP4_ALL_THE_WAY = GemmSpecs(x=NV, w=NV, dy=NV_SR, w_t=NV, dy_t=NV_SR, x_t=NV_SR)  # the paper's split rounding
SQRT3 = math.sqrt(3)


# 1. The pure estimator: g and n drawn with a known ratio ------------------------------------------

@pytest.mark.parametrize("true_ratio", [0.5, SQRT3, 4.0])
def test_estimator_recovers_a_known_ratio(true_ratio):
    gen = torch.Generator().manual_seed(1)
    shapes = [(400, 250), (300, 200), (40_000,)]  # d = 200k over three tensors
    g = [torch.randn(s, generator=gen) * scale for s, scale in zip(shapes, (1.0, 3.0, 0.2), strict=True)]
    d = sum(t.numel() for t in g)
    sigma = math.sqrt(sum(float(t.double().square().sum()) for t in g)) / (true_ratio * math.sqrt(d))
    factors = (0.5, 1.0, 1.6)  # uneven noise per tensor, normalised so the overall sigma is sigma
    norm = math.sqrt(sum(f * f * t.numel() for f, t in zip(factors, g, strict=True)) / d)
    sigmas = [sigma * f / norm for f in factors]
    n = [torch.randn(t.shape, generator=gen) * s for t, s in zip(g, sigmas, strict=True)]
    names = ["a.weight", "b.weight", "c.bias"]
    report = noise_ratio(g, [gi + ni for gi, ni in zip(g, n, strict=True)], names)

    assert report.params == d
    assert report.ratio == pytest.approx(true_ratio, rel=0.02)
    noise_var = sum(s * s * t.numel() for s, t in zip(sigmas, g, strict=True)) / d
    assert report.noise_std == pytest.approx(math.sqrt(noise_var), rel=0.02)
    assert report.grad_rms * math.sqrt(d) == pytest.approx(math.sqrt(sum(float(t.double().square().sum()) for t in g)))
    assert list(report.per_layer) == names
    for name, gi, ni in zip(names, g, n, strict=True):  # per tensor: ||g|| / ||n||, computed independently
        assert report.per_layer[name] == pytest.approx(float(gi.double().norm() / ni.double().norm()), rel=1e-5)
    assert report.below(SQRT3) == (true_ratio < SQRT3 * 0.99)


def test_estimator_edge_cases():
    g = [torch.ones(3), torch.zeros(2)]
    report = noise_ratio(g, [t.clone() for t in g], ["a", "b"])
    assert report.ratio == math.inf and report.noise_std == 0.0 and report.per_layer == {"a": math.inf, "b": math.inf}
    assert not report.below(SQRT3)
    bf16 = noise_ratio([torch.ones(4, dtype=torch.bfloat16)], [torch.full((4,), 1.5, dtype=torch.bfloat16)], ["w"])
    assert bf16.ratio == pytest.approx(2.0) and bf16.noise_std == pytest.approx(0.5)
    assert noise_ratio([], [], []).ratio == math.inf
    with pytest.raises(ValueError):
        noise_ratio([torch.ones(3)], [torch.ones(3)], ["a", "b"])
    with pytest.raises(ValueError):
        noise_ratio([torch.ones(3)], [torch.ones(4)], ["a"])


# 2-3. The quadratic toy: one NVFP4 QuantizedLinear, loss 0.5 ||X W^T - Y||^2 / T ----------------

T, K, N = 256, 64, 32


def toy(label_noise=1.0, seed=0):
    """Y = X W*^T + label noise orthogonal to X's columns, so W* is exactly the least-squares
    solution; W* is on the NVFP4 grid, so at W = W* the forward quantizes W exactly and the
    gradient's only floor is the rounding of X. Returns (layer, loss_fn, W*, a far-away direction)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen, dtype=torch.float64)
    w_star = fake_quantize(torch.randn(N, K, generator=gen) / 8, "nvfp4")
    assert torch.equal(fake_quantize(w_star, "nvfp4"), w_star)
    eps = torch.randn(T, N, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(x)
    y = (x @ w_star.double().t() + label_noise * (eps - q @ (q.t() @ eps))).float()
    x = x.float()
    layer = QuantizedLinear(K, N, FP4_ALL_THE_WAY, name="layers.0.mlp.up")

    def loss_fn():
        return 0.5 * ((layer(x) - y) ** 2).sum() / T

    loss_fn.x, loss_fn.y = x, y
    return layer, loss_fn, w_star, torch.randn(N, K, generator=gen) / 8


def test_high_precision_gradient_is_the_exact_gradient_of_the_quantized_forward(monkeypatch):
    """g_hp = (Q(X) Q(W)^T - Y)^T X / T: the quantized forward's residual (straight through the
    rounding) against the high-precision X of the wgrad, checked against float64 by hand."""
    layer, loss_fn, w_star, far = toy()
    layer.weight.data.copy_(w_star + 0.5 * far)
    captured = {}

    def spy(g_hp, g_q, names):
        captured.update(g_hp=g_hp[0], g_q=g_q[0], names=list(names))
        return noise_ratio(g_hp, g_q, names)

    monkeypatch.setattr(grad_noise, "noise_ratio", spy)
    sr_before = layer.sr.state_dict()
    report = measure_gradient_noise(layer, loss_fn)

    x, y, w = loss_fn.x.double(), loss_fn.y.double(), layer.weight.detach()
    xq, wq = fake_quantize(loss_fn.x, "nvfp4").double(), fake_quantize(w, "nvfp4").double()
    exact = (xq @ wq.t() - y).t() @ x / T
    unquantized_forward = (x @ w.double().t() - y).t() @ x / T
    g_hp = captured["g_hp"].double()
    assert captured["names"] == ["weight"]
    assert (g_hp - exact).norm() < 1e-5 * exact.norm()
    assert (unquantized_forward - exact).norm() > 1e-3 * exact.norm()  # the check can tell the forwards apart
    assert report.grad_rms == pytest.approx(float(exact.norm()) / math.sqrt(N * K), rel=1e-5)
    assert report.params == N * K and report.per_layer == {"weight": pytest.approx(report.ratio)}

    # No trace: the SR stream is rewound, so the next training step on this batch draws the same
    # noise and its gradient is exactly the g_q that was measured.
    assert layer.sr.state_dict() == sr_before
    loss_fn().backward()
    assert torch.equal(layer.weight.grad, captured["g_q"])


def test_single_shot_sigma_matches_monte_carlo_and_sr_gradient_is_unbiased():
    layer, loss_fn, w_star, far = toy()
    layer.weight.data.copy_(w_star + 0.3 * far)
    report = measure_gradient_noise(layer, loss_fn)
    with high_precision_backward(layer):
        (g_hp,) = torch.autograd.grad(loss_fn(), [layer.weight])
    # Each call of the quantized layer advances its SR stream: independent draws of the noise.
    draws = torch.stack([torch.autograd.grad(loss_fn(), [layer.weight])[0] for _ in range(32)]).double()
    noise = draws - g_hp.double()
    sigma_mc = float(noise.square().mean().sqrt())
    # d = 2048 coordinates each sample the noise, so one draw pins sigma down: single-draw estimates
    # spread by ~2% (coefficient of variation measured over 400 draws: 1.7%). 10% is > 5 spreads.
    assert report.noise_std == pytest.approx(sigma_mc, rel=0.10)
    per_draw = noise.square().mean(dim=(1, 2)).sqrt()
    assert float((per_draw / sigma_mc - 1).abs().max()) < 0.10

    # SR is unbiased, and so is a product of independent SR operands: the mean of M draws approaches
    # g_hp with ||mean_M - g_hp||^2 ~ sigma^2 d / M. Normalised by that, the error stays ~1 as M grows.
    # (Not exactly: the block max can saturate at 6 when its E4M3 scale rounds down, a small bias
    # measured at ~9% of the per-draw noise norm, which adds M * 0.008 here: 1.03 at M=4, 1.13 at M=16;
    # an RTN backward would instead give M, i.e. 4 and 16.)
    errors = {}
    for m in (4, 16):
        err = float((draws[:m].mean(0) - g_hp.double()).norm())
        errors[m] = err
        assert 0.75 < err**2 * m / (sigma_mc**2 * N * K) < 1.35
    assert errors[16] < 0.65 * errors[4]  # ~1/sqrt(M): 0.5 for no bias


def test_ratio_falls_below_sqrt3_near_the_optimum_while_the_noise_floor_stays():
    """The paper's analysis: the gradient shrinks toward the optimum, the FP4 noise does not (it is
    set by the residual, which stays at the label noise), so the ratio crosses sqrt(3)."""
    layer, loss_fn, w_star, far = toy()
    reports = {}
    for a in (1.0, 0.5, 0.2, 0.1, 0.0):  # W = W* + a * far: from far away to the least-squares solution
        layer.weight.data.copy_(w_star + a * far)
        reports[a] = measure_gradient_noise(layer, loss_fn)
    ratios = [reports[a].ratio for a in (1.0, 0.5, 0.2, 0.1, 0.0)]
    assert ratios == sorted(ratios, reverse=True)  # monotone toward the optimum
    far_r, near_r = reports[1.0], reports[0.0]  # observed: 8.5 and 0.56
    assert far_r.ratio > 2 * SQRT3 and not far_r.below(SQRT3)
    assert near_r.ratio < SQRT3 / 2 and near_r.below(SQRT3)
    assert near_r.grad_rms < far_r.grad_rms / 10  # the gradient fell > 10x ...
    assert near_r.noise_std > far_r.noise_std / 2  # ... the noise floor did not follow


# 4. Side effects: .grad, specs, SR, delayed scaling, RNG; high-precision models -------------------

def small_model(specs_a, specs_b, dropout=0.0):
    torch.manual_seed(0)
    return nn.Sequential(QuantizedLinear(32, 48, specs_a, name="0"), nn.GELU(), nn.Dropout(dropout),
                         QuantizedLinear(48, 32, specs_b, name="3"), nn.LayerNorm(32), nn.Linear(32, 8))


def test_measurement_leaves_grads_specs_streams_and_rng_alone():
    delayed_fp8 = GemmSpecs(x=QuantSpec("fp8_e4m3", amax_history=4), w=QuantSpec("fp8_e4m3"),
                            dy=QuantSpec("fp8_e5m2", "stochastic", amax_history=4))
    model = small_model(FP4_ALL_THE_WAY, delayed_fp8)
    x = torch.randn(64, 32)
    held = []

    def loss_fn():
        out = model(x)
        held.append(weakref.ref(out))
        return out.square().mean()

    model[0].weight.grad = torch.full_like(model[0].weight, 0.25)  # accumulated grads must survive
    telemetry = model[0].stats = {}  # a telemetry step gathering per-role stats: the monitor adds none
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    specs_before = [model[0].specs, model[3].specs]
    sr_before = [model[0].sr.state_dict(), model[3].sr.state_dict()]
    rng_before = torch.get_rng_state()

    report = measure_gradient_noise(model, loss_fn, only_quantized=False)

    assert set(report.per_layer) == {n for n, _ in model.named_parameters()}
    assert 0 < report.noise_std and math.isfinite(report.ratio)
    # Layer 0 sees its own wgrad noise plus layer 3's dgrad noise (its dy is SR FP8); layer 3's wgrad
    # is high precision and nothing after it is quantized, so it and the head get no noise at all.
    assert math.isfinite(report.per_layer["0.weight"])
    assert report.per_layer["3.weight"] == report.per_layer["5.weight"] == report.per_layer["4.bias"] == math.inf
    for name, p in model.named_parameters():
        assert (p.grad is None) if grads_before[name] is None else torch.equal(p.grad, grads_before[name])
    assert [model[0].specs, model[3].specs] == specs_before and model[0].specs is specs_before[0]
    assert [model[0].sr.state_dict(), model[3].sr.state_dict()] == sr_before
    assert model[3].delayed.pending == {}  # the monitor's amaxes do not enter the delayed scales
    assert model[0].stats is telemetry and telemetry == {}
    assert torch.equal(torch.get_rng_state(), rng_before)
    gc.collect()
    assert len(held) == 2 and all(ref() is None for ref in held)  # no graph or output kept alive

    default = measure_gradient_noise(model, loss_fn)  # default: the quantized linears' weights only
    assert list(default.per_layer) == ["0.weight", "3.weight"] and default.params == 32 * 48 * 2


@pytest.mark.parametrize("kind", ["forward_only", "nn_linear"])
def test_high_precision_backward_reports_no_noise(kind):
    # Dropout and an SR forward role: both passes must see the same mask and the same SR draws, or
    # their differences would read as noise.
    if kind == "forward_only":
        model = small_model(FP4_ALL_THE_WAY.forward_only(), GemmSpecs(x=NV_SR, w=NV), dropout=0.5)
    else:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 48), nn.Dropout(0.5), nn.Linear(48, 8))
    x = torch.randn(64, 32)
    report = measure_gradient_noise(model, lambda: model(x).square().mean(), only_quantized=False)
    assert report.noise_std == 0.0 and report.ratio == math.inf and report.grad_rms > 0
    assert report.params == sum(p.numel() for p in model.parameters())
    assert all(r == math.inf for r in report.per_layer.values()) and not report.below(SQRT3)
    rows = to_rows(report, step=7)
    assert rows[0]["ratio"] is None and json.loads(json.dumps(rows, allow_nan=False)) == rows

    quantized_only = measure_gradient_noise(model, lambda: model(x).square().mean())
    expected = 0 if kind == "nn_linear" else 32 * 48 + 48 * 32
    assert quantized_only.params == expected and quantized_only.ratio == math.inf


# 5. Rows for numerics.jsonl --------------------------------------------------------------------

def test_rows_are_json_serialisable():
    layer, loss_fn, w_star, far = toy()
    layer.weight.data.copy_(w_star + far)
    report = measure_gradient_noise(layer, loss_fn)
    rows = to_rows(report, step=1200)
    text = json.dumps(rows, allow_nan=False)  # strict JSON: no NaN, no Infinity
    assert json.loads(text) == rows
    overall, per_layer = rows[0], rows[1:]
    assert overall == {"step": 1200, "kind": "grad_noise", "layer": "all", "ratio": report.ratio,
                       "grad_rms": report.grad_rms, "noise_std": report.noise_std, "params": N * K}
    assert all(isinstance(overall[k], float) and math.isfinite(overall[k]) for k in ("ratio", "grad_rms", "noise_std"))
    assert per_layer == [{"step": 1200, "kind": "grad_noise", "layer": "weight", "ratio": report.per_layer["weight"]}]
    empty = to_rows(GradNoiseReport(ratio=math.inf), step=0)
    assert empty == [{"step": 0, "kind": "grad_noise", "layer": "all", "ratio": None, "grad_rms": 0.0,
                      "noise_std": 0.0, "params": 0}]


def test_noise_propagated_through_dgrad_is_counted():
    """A layer whose own wgrad is high precision still gets noise from a later layer's quantized dgrad."""
    model = small_model(FP4_ALL_THE_WAY.forward_only(), GemmSpecs(x=NV, w=NV, dy=NV_SR))
    x = torch.randn(64, 32)
    report = measure_gradient_noise(model, lambda: model(x).square().mean())
    assert math.isfinite(report.per_layer["0.weight"]) and report.per_layer["3.weight"] == math.inf
