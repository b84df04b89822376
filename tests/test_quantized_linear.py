"""The quantized linear (fprop/dgrad/wgrad per role) and the custom recipe built from YAML roles."""

from pathlib import Path

import pytest
import torch
from torch import nn

from megatron_lowp.config import load_config
from megatron_lowp.device import get_device
from megatron_lowp.errors import UserError
from megatron_lowp.model import build_model
from megatron_lowp.numerics import QuantizedTensor, SRGenerator, fake_quantize
from megatron_lowp.precision import GemmSpecs, QuantizedLinear, QuantSpec, build_recipe, role_spec
from megatron_lowp.precision.quantized_linear import saved_operands
from megatron_lowp.precision.recipe import Linear
from megatron_lowp.train import train
from tests.test_train import losses, small_cfg

NV = QuantSpec("nvfp4")
NV_SR = QuantSpec("nvfp4", "stochastic")
E4 = QuantSpec("fp8_e4m3")
E5_SR = QuantSpec("fp8_e5m2", "stochastic")


def pair(specs, seed=0):
    torch.manual_seed(seed)
    layer = QuantizedLinear(64, 32, specs, name="layers.0.mlp.up")
    x = torch.randn(2, 16, 64, requires_grad=True)
    return layer, x


@pytest.mark.parametrize("autocast", [False, True])
def test_high_precision_roles_equal_nn_linear_bit_for_bit(autocast):
    layer, x = pair(GemmSpecs())
    ref = nn.Linear(64, 32, bias=False)
    ref.weight.data.copy_(layer.weight.data)
    x_ref = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y, y_ref = layer(x), ref(x_ref)
    assert y.dtype == y_ref.dtype and torch.equal(y, y_ref)
    (y.float() ** 2).sum().backward()
    (y_ref.float() ** 2).sum().backward()
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("specs", [
    GemmSpecs(x=NV, w=NV, dy=NV_SR, w_t=NV, dy_t=NV_SR, x_t=NV_SR),  # FP4 all the way (training)
    GemmSpecs(x=E4, w=E4, dy=E5_SR, w_t=QuantSpec("fp8_e5m2"), dy_t=E5_SR, x_t=QuantSpec("fp8_e5m2")),  # FP8 paper
    GemmSpecs(x=QuantSpec("mxfp4"), w=QuantSpec("mxfp8"), dy_t=QuantSpec("mxfp8", "stochastic")),
])
def test_gemms_equal_the_fake_quantized_expressions(specs):
    """fprop/dgrad/wgrad written out with fake_quantize, drawing SR noise in the layer's order."""
    layer, x = pair(specs)
    dy = torch.randn(2, 16, 32)
    y = layer(x)
    y.backward(dy)

    gen = SRGenerator(layer.sr.seed)
    fq = lambda t, spec, axis: t if spec is None else fake_quantize(  # noqa: E731
        t, spec.fmt, rounding=spec.rounding, axis=axis, generator=gen, **spec.kwargs())
    x2, w, dy2 = x.detach().reshape(32, 64), layer.weight.detach(), dy.reshape(32, 32)
    y_ref = fq(x2, specs.x, -1) @ fq(w, specs.w, -1).t()
    x_t, w_t = fq(x2, specs.x_t, 0), fq(w, specs.w_t, 0)
    dx_ref = fq(dy2, specs.dy, -1) @ w_t
    dw_ref = fq(dy2, specs.dy_t, 0).t() @ x_t
    assert torch.equal(y.reshape(32, 32), y_ref)
    assert torch.equal(x.grad.reshape(32, 64), dx_ref)
    assert torch.equal(layer.weight.grad, dw_ref)
    assert layer.sr.offset == gen.offset  # the layer consumed exactly the noise the reference did


def test_backward_saves_packed_operands_along_their_contraction_axes():
    layer, x = pair(GemmSpecs(x=NV, w=NV, dy=NV, w_t=NV, dy_t=NV, x_t=NV_SR))
    y = layer(x)
    saved = saved_operands(y.grad_fn)
    saved_x, saved_w = saved["x_t"], saved["w_t"]
    assert isinstance(saved_x, QuantizedTensor) and isinstance(saved_w, QuantizedTensor)
    assert saved_x.data.dtype == torch.uint8 and saved_x.data.numel() == 32 * 64 // 2  # 4 bits per value
    assert saved_x.axis % 2 == 0 and saved_w.axis % 2 == 0  # x_t blocks along tokens, w_t along out_features
    y.sum().backward()
    with pytest.raises(RuntimeError, match="freed"):  # freed after backward
        saved_operands(y.grad_fn)


def test_sr_stream_is_in_the_state_dict():
    layer, x = pair(GemmSpecs(dy=NV_SR))
    layer(x).sum().backward()
    state = layer.state_dict()
    other = QuantizedLinear(64, 32, GemmSpecs(dy=NV_SR), name="other")
    other.load_state_dict(state)
    assert (other.sr.seed, other.sr.offset) == (layer.sr.seed, layer.sr.offset) and layer.sr.offset == 32 * 32


def small_model_cfg(*overrides):
    return load_config(None, ["model.vocab_size=64", "model.d_model=32", "model.n_layers=4", "model.n_heads=2",
                              "model.ffn_hidden_size=64", "model.max_seq_len=32", "train.seq_len=32", *overrides])


def test_high_precision_layers_by_glob_and_by_block():
    cfg = small_model_cfg("precision.recipe=custom", "precision.x.format=nvfp4", "precision.w.format=nvfp4",
                          "precision.high_precision=[lm_head, '*.attn.out']", "precision.high_precision_first_blocks=1",
                          "precision.high_precision_last_blocks=1")
    model = build_model(cfg.model, build_recipe(cfg, get_device("cpu")))
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert quantized == [f"layers.{i}.{p}" for i in (1, 2) for p in ("attn.qkv", "mlp.down", "mlp.gate", "mlp.up")]
    assert type(model.lm_head) is Linear and type(model.layers[0].mlp.up) is Linear


def test_role_sections_from_yaml():
    cfg = small_model_cfg("precision.dy.format=nvfp4", "precision.dy.rounding=stochastic",
                          "precision.dy.tensor_scale=fixed", "precision.dy.tensor_amax=2.0",
                          "precision.x.format=fp8_e4m3", "precision.x.power_of_two=true")
    assert role_spec(cfg.precision.dy) == QuantSpec(
        "nvfp4", "stochastic", (("scale_rounding", "decode"), ("tensor_amax", 2.0), ("tensor_scale", "fixed"), ("tile", False)))
    # flavour "device": the E4M3 variant follows the device's E4M3 maximum (448 OCP, 240 Gaudi2)
    assert role_spec(cfg.precision.x).kwargs() == {"scaling": "tensor", "power_of_two": True, "flavour": "ocp"}
    assert role_spec(cfg.precision.x, e4m3_max=240.0).kwargs()["flavour"] == "gaudi2"
    pinned = small_model_cfg("precision.x.format=fp8_e4m3", "precision.x.flavour=ocp")
    assert role_spec(pinned.precision.x, e4m3_max=240.0).kwargs()["flavour"] == "ocp"
    assert role_spec(cfg.precision.w) is None


def test_fp8_recipe_takes_the_e4m3_maximum_from_the_device(monkeypatch):
    """On a Gaudi2 (E4M3 max 240) the fp8 package's E4M3 roles saturate at 240, on CUDA/CPU at 448."""
    import dataclasses

    from megatron_lowp.device import get_device
    from megatron_lowp.precision import available_recipes, build_recipe

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "recipes/tiny/fp8.yaml", extra_choices={"precision.recipe": available_recipes()})
    device = get_device("cpu")
    assert build_recipe(cfg, device).specs.x.kwargs()["flavour"] == "ocp"
    gaudi2 = dataclasses.replace(device.capabilities, fp8_e4m3_max=240.0)
    monkeypatch.setattr(type(device), "capabilities", property(lambda self: gaudi2))
    specs = build_recipe(cfg, device).specs
    assert specs.x.kwargs()["flavour"] == specs.w.kwargs()["flavour"] == "gaudi2"
    assert "flavour" not in specs.dy.kwargs()  # E5M2 has one variant
    big = torch.tensor([1000.0, 1.0])
    assert specs.x.fake_quantize(big, -1, None, scale=torch.tensor(1.0)).max() == 240.0


def assert_resume_is_bit_identical(repo, tmp_path, *precision):
    """6 straight steps == 3 steps + resume for 3, every logged number compared with ==."""
    steps = ["train.steps=6", "train.eval_every=3", "train.eval_samples=4", "train.checkpoint_every=3", *precision]
    straight = train(small_cfg(repo, tmp_path, "run.name=a", *steps))
    train(small_cfg(repo, tmp_path, "run.name=b", "train.stop_at_step=3", *steps))
    resumed = train(small_cfg(repo, tmp_path, "run.name=b", *steps))
    assert losses(resumed.run_dir) == losses(straight.run_dir) and len(losses(straight.run_dir)) == 6


def test_quantized_training_resumes_bit_identically(repo, tmp_path):
    """NVFP4 all the way with stochastic rounding: the SR streams travel in the checkpoint."""
    roles = [f"precision.{role}.format=nvfp4" for role in ("x", "w", "dy", "w_t", "dy_t", "x_t")]
    sr = [f"precision.{role}.rounding=stochastic" for role in ("dy", "dy_t", "x_t")]
    assert_resume_is_bit_identical(repo, tmp_path, "precision.recipe=custom", *roles, *sr)


FP8_PAPER = GemmSpecs(x=E4, w=E4, dy=E5_SR, w_t=E4, dy_t=E5_SR, x_t=E4)


def run_layer(specs, backend, shape=(4, 16, 64), out=32):
    torch.manual_seed(0)
    layer = QuantizedLinear(shape[-1], out, specs, name="t", backend=backend)
    x = torch.randn(*shape, requires_grad=True)
    dy = torch.randn(*shape[:-1], out)
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.sr.offset


def test_native_fp8_matches_emulated_and_really_runs_scaled_mm(monkeypatch):
    from megatron_lowp.precision import quantized_linear as ql

    calls = []
    real = ql._scaled_mm
    monkeypatch.setattr(ql, "_scaled_mm", lambda *a: calls.append(a[0].dtype) or real(*a))
    native = run_layer(FP8_PAPER, "native")
    assert calls == [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e5m2]  # fprop, dgrad, wgrad
    emulated = run_layer(FP8_PAPER, "emulated")
    assert native[3] == emulated[3]  # the same stochastic-rounding draws
    for a, b in zip(native[:3], emulated[:3], strict=True):
        # same FP8 operands; only the accumulation order / where the scale is applied differs
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_native_falls_back_where_no_fp8_kernel_exists(monkeypatch):
    from megatron_lowp.precision import quantized_linear as ql

    calls = []
    monkeypatch.setattr(ql, "_scaled_mm", lambda *a: calls.append(1))
    e5 = QuantSpec("fp8_e5m2")
    run_layer(GemmSpecs(x=e5, w=e5, dy=e5, w_t=e5, dy_t=e5, x_t=e5), "native")  # E5M2 x E5M2
    run_layer(FP8_PAPER, "native", shape=(4, 5, 64))  # 20 tokens: not a multiple of 16
    run_layer(GemmSpecs(x=NV, w=NV), "native")  # NVFP4 has no native GEMM on this path
    assert calls == []  # every GEMM above fell back to the emulated path


def test_backend_from_yaml():
    cfg = small_model_cfg("precision.recipe=custom", "precision.x.format=fp8_e4m3", "precision.w.format=fp8_e4m3",
                          "precision.backend=native")
    model = build_model(cfg.model, build_recipe(cfg, get_device("cpu")))
    assert model.layers[0].attn.qkv.backend == "native"


DELAYED = QuantSpec("fp8_e4m3", amax_history=2)


def test_delayed_scaling_uses_past_steps_and_eval_does_not_move_it():
    from megatron_lowp.numerics import E4M3

    layer = QuantizedLinear(16, 16, GemmSpecs(x=DELAYED), name="d")
    assert layer.delayed.scale("x") is None  # no history yet: current scaling
    x1 = torch.full((16, 16), 2.0)
    layer(x1).sum().backward()
    layer.commit_amax()
    assert layer.delayed.scale("x").item() == pytest.approx(E4M3.max_value / 2.0)
    layer.eval()
    with torch.no_grad():
        layer(torch.full((16, 16), 100.0))  # an evaluation batch must not move the scale
    layer.train()
    assert layer.delayed.scale("x").item() == pytest.approx(E4M3.max_value / 2.0)
    # a step with a 10x larger input is quantized with the old scale: 20 * 224 saturates at 448
    x2 = torch.full((16, 16), 20.0, requires_grad=True)
    y = layer(x2)
    w_q = layer.weight.detach()
    assert torch.allclose(y, torch.full((16, 16), 2.0) @ w_q.t(), rtol=1e-6, atol=1e-6)  # 448 / 224 = 2
    y.sum().backward()
    layer.commit_amax()
    assert layer.delayed.scale("x").item() == pytest.approx(E4M3.max_value / 20.0)  # max over the 2-step window
    layer(x1).sum().backward()
    layer.commit_amax()
    layer(x1).sum().backward()
    layer.commit_amax()
    assert layer.delayed.scale("x").item() == pytest.approx(E4M3.max_value / 2.0)  # the 20 left the window


def test_delayed_scaling_takes_the_max_over_micro_batches_and_ranks():
    layer = QuantizedLinear(16, 16, GemmSpecs(x=DELAYED, dy=QuantSpec("fp8_e5m2", amax_history=1)), name="d")
    for value in (1.0, 3.0, 2.0):  # three micro-batches of one optimizer step
        layer(torch.full((16, 16), value, requires_grad=True)).sum().backward()  # x needs dgrad, so dy is quantized
    seen = []
    layer.commit_amax(reduce_max=lambda a: seen.append(a.item()) or a * 2)  # a pretend second rank with 2x
    assert sorted(seen)[-1] == 3.0 and len(seen) == 2  # x and dy each reduced once
    assert layer.delayed.histories["x"].amax().item() == 6.0


def test_delayed_state_travels_in_the_state_dict():
    layer = QuantizedLinear(16, 16, GemmSpecs(x=DELAYED), name="d")
    layer(torch.full((16, 16), 5.0)).sum().backward()
    layer.commit_amax()
    other = QuantizedLinear(16, 16, GemmSpecs(x=DELAYED), name="d")
    other.load_state_dict(layer.state_dict())
    assert other.delayed.scale("x").item() == layer.delayed.scale("x").item() and other.delayed.commits == 1


def test_delayed_needs_per_tensor_fp8():
    with pytest.raises(UserError, match=r"precision.x.amax: 'delayed' needs a per-tensor FP8 format"):
        build_recipe(small_model_cfg("precision.recipe=custom", "precision.x.format=nvfp4", "precision.x.amax=delayed"),
                     get_device("cpu"))


def test_fp8_delayed_training_resumes_bit_identically(repo, tmp_path):
    """The amax histories are in the checkpoint: a resumed run does not restart from fresh scales."""
    args = ["precision.recipe=custom", "precision.smooth_swiglu=true",
            "precision.dy.rounding=stochastic", "precision.dy_t.rounding=stochastic"]
    for role, fmt in (("x", "fp8_e4m3"), ("w", "fp8_e4m3"), ("dy", "fp8_e5m2"), ("w_t", "fp8_e5m2"),
                      ("dy_t", "fp8_e5m2"), ("x_t", "fp8_e5m2")):
        args += [f"precision.{role}.format={fmt}", f"precision.{role}.amax=delayed", f"precision.{role}.power_of_two=true"]
    assert_resume_is_bit_identical(repo, tmp_path, *args)


def test_fp8_recipe_builds_the_papers_layers(repo):
    from megatron_lowp.model.llama import SmoothGatedSiLU
    from megatron_lowp.precision import available_recipes

    cfg = load_config(repo / "recipes/tiny/fp8.yaml", ["model.vocab_size=4096"],
                      extra_choices={"precision.recipe": available_recipes()})
    model = build_model(cfg.model, build_recipe(cfg, get_device("cpu")))
    qkv = model.layers[0].attn.qkv
    assert isinstance(qkv, QuantizedLinear) and set(qkv.delayed.specs) == {"x", "w", "dy", "w_t", "dy_t", "x_t"}
    assert qkv.specs.dy == QuantSpec("fp8_e5m2", "stochastic", (("power_of_two", True), ("scaling", "tensor")), 1)
    assert isinstance(model.layers[3].mlp.act, SmoothGatedSiLU)
    assert type(model.lm_head) is Linear  # the LM head stays high precision


def test_inference_quantizes_no_backward_operands():
    """Under no_grad the wgrad operands are not quantized: any token count works (NVFP4 wgrad blocks
    run along the tokens), no SR noise is drawn, and the output equals the training forward's."""
    specs = GemmSpecs(x=NV, w=NV, dy=NV_SR, w_t=NV, dy_t=NV_SR, x_t=NV_SR)
    layer = QuantizedLinear(32, 16, specs, name="inf")
    x = torch.randn(3, 7, 32)  # 21 tokens: not a multiple of 16
    with torch.no_grad():
        y = layer(x)
    assert layer.sr.offset == 0
    with pytest.raises(UserError, match="block size 16 does not divide"):
        layer(x.requires_grad_())  # training needs the wgrad blocks, and says why
    x16 = torch.randn(32, 32)
    with torch.no_grad():
        y16 = layer(x16)
    assert torch.equal(y16, layer(x16)) and y.shape == (3, 7, 16)
