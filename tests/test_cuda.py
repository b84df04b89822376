"""GPU checks (marker `cuda`; skipped where torch sees no CUDA GPU):

    python -m pytest -m cuda tests/test_cuda.py          # scripts/device_check.py runs this

- the compiled Triton quantizers give the torch reference's bits on CUDA tensors (FP8 E4M3/E5M2,
  NVFP4; round-to-nearest and stochastic; subnormal inputs and subnormal block scales), and the
  stochastic-rounding stream continues across backends and devices;
- the native FP8 GEMMs (torch._scaled_mm) agree with emulation in fprop, dgrad and wgrad;
- 20 training steps of bf16, fp8 (native), fp4 and ngpt_fp4 on the GPU are finite and resume
  bit-exactly with device.deterministic.

MEGATRON_LOWP_CUDA_TESTS_ON=cpu runs the same tests on the CPU through Triton's interpreter (slow):
a way to check the tests themselves on a machine without a GPU.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from megatron_lowp.config import load_config
from megatron_lowp.numerics import SRGenerator, fake_quantize, quantize
from megatron_lowp.precision import GemmSpecs, QuantizedLinear, QuantSpec, available_recipes

ON = os.environ.get("MEGATRON_LOWP_CUDA_TESTS_ON", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(ON == "cuda" and not torch.cuda.is_available(), reason="needs an NVIDIA GPU (torch sees no CUDA)"),
]


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if ON == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("MEGATRON_LOWP_CPU_COMPILE", "0")  # CPU references in eager ops: no compile wait


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().cpu()
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def assert_same(a, b) -> None:
    """Two QuantizedTensors hold the same bits (data, scales, tensor scale)."""
    assert (a.fmt, tuple(a.shape), a.axis, a.data.dtype) == (b.fmt, tuple(b.shape), b.axis, b.data.dtype)
    assert torch.equal(bits(a.data), bits(b.data))
    assert torch.equal(bits(a.scale), bits(b.scale))
    assert (a.tensor_scale is None) == (b.tensor_scale is None)
    if a.tensor_scale is not None:
        assert torch.equal(bits(a.tensor_scale), bits(b.tensor_scale))


def wide(shape, seed: int) -> torch.Tensor:
    """Values over 2^-30 .. 2^24: below, in and above both FP8 formats' subnormal ranges, past their
    maxima; zeros and -0."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 25, (n,), generator=g).float())
    x[::17] = 0.0
    x[5::17] = -0.0
    return x.reshape(shape)


def nvfp4_data(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Blocks of 16 at scales from 2^-20 to 2^6 of the tensor's largest value (tiny ones get subnormal
    or zero E4M3 block scales), an all-zero block, -0 and one outlier that sets the tensor amax."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    flat = x.view(-1, 16)
    flat *= torch.exp2(torch.randint(-26, 1, (flat.shape[0], 1), generator=g).float())
    flat[1] = 0.0
    flat[2, 3] = 64.0
    flat[3, :8] = -0.0
    return x


def test_the_kernels_run_compiled_on_the_device():
    from megatron_lowp.device import triton_kernels_usable
    from megatron_lowp.numerics import triton_kernels as tk

    x = torch.ones(16, device=ON)
    assert triton_kernels_usable(x)
    if ON == "cuda":
        from triton.runtime.interpreter import InterpretedFunction

        assert not isinstance(tk.kernels().fp8, InterpretedFunction)
        assert not isinstance(tk.kernels().nvfp4, InterpretedFunction)


@pytest.mark.parametrize("fmt,flavour", [("fp8_e4m3", "ocp"), ("fp8_e4m3", "gaudi2"), ("fp8_e5m2", None)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fp8_kernel_bits_equal_torch_on_the_device(fmt, flavour, rounding):
    """Given scale (saturation, subnormals) and current scaling; shapes across one and many programs;
    the torch path on the device and on the CPU as references."""
    opts = {} if flavour is None else {"flavour": flavour}
    for i, shape in enumerate([(1,), (1025,), (3, 700), (257, 4099)]):
        x = wide(shape, seed=i)
        for extra in ({"scale": 1.5}, {}):
            gens = [SRGenerator(11, 2**32 - 77 + i) for _ in range(3)]  # counters cross 2^32
            got = quantize(x.to(ON), fmt, rounding=rounding, generator=gens[0], backend="triton", **opts, **extra)
            ref = quantize(x.to(ON), fmt, rounding=rounding, generator=gens[1], backend="torch", **opts, **extra)
            cpu = quantize(x, fmt, rounding=rounding, generator=gens[2], backend="torch", **opts, **extra)
            assert got.data.device.type == ON
            assert_same(got, ref)
            assert_same(got, cpu)
            assert gens[0].state_dict() == gens[1].state_dict() == gens[2].state_dict()
    codes = bits(got.data) & 0x7F
    subnormal_top = 8 if fmt == "fp8_e4m3" else 4  # exponent field 0: codes 1..7 (E4M3), 1..3 (E5M2)
    assert ((codes > 0) & (codes < subnormal_top)).any() and (codes == 0).any()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_nvfp4_kernel_bits_equal_torch_on_the_device(rounding):
    for i, (rows, cols) in enumerate([(1, 64), (130, 16), (1024, 1024)]):
        x = nvfp4_data(rows, cols, seed=i)
        for opts in ({}, {"tensor_scale": "fixed", "tensor_amax": 3.0}, {"tensor_scale": "off"}):
            gens = [SRGenerator(7, 2**33 + 5) for _ in range(3)]
            got = quantize(x.to(ON), "nvfp4", rounding=rounding, generator=gens[0], backend="triton", **opts)
            ref = quantize(x.to(ON), "nvfp4", rounding=rounding, generator=gens[1], backend="torch", **opts)
            cpu = quantize(x, "nvfp4", rounding=rounding, generator=gens[2], backend="torch", **opts)
            assert_same(got, ref)
            assert_same(got, cpu)
            assert torch.equal(bits(got.dequantize()), bits(cpu.dequantize()))
            assert gens[0].offset == gens[2].offset
    scales = bits(got.scale).reshape(-1)  # the last, 1024 x 1024 with amax scaling: subnormal and zero scales occur
    assert ((scales & 0x78) == 0).logical_and(scales != 0).any() and (scales == 0).any()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4"])
def test_sr_stream_continues_across_backends_and_devices(fmt):
    xs = [nvfp4_data(4, 32, seed=1), nvfp4_data(64, 48, seed=2), nvfp4_data(2, 64, seed=3)]
    g_ref = SRGenerator(2**40 + 3, 2**32 - 1000)
    ref = [quantize(x, fmt, rounding="stochastic", generator=g_ref, backend="torch") for x in xs]
    g = SRGenerator(2**40 + 3, 2**32 - 1000)
    mixed = [quantize(xs[0], fmt, rounding="stochastic", generator=g, backend="torch"),
             quantize(xs[1].to(ON), fmt, rounding="stochastic", generator=g, backend="triton"),
             quantize(xs[2].to(ON), fmt, rounding="stochastic", generator=g, backend="torch")]
    for a, b in zip(mixed, ref, strict=True):
        assert_same(a, b)
    assert g.state_dict() == g_ref.state_dict()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "nvfp4"])
def test_fake_quantize_bf16_on_the_device_equals_torch(fmt):
    x = (torch.randn(64, 256, generator=torch.Generator().manual_seed(5)) * 3).to(torch.bfloat16)
    for rounding in ("nearest", "stochastic"):
        got = fake_quantize(x.to(ON), fmt, rounding=rounding, generator=SRGenerator(3), backend="triton")
        ref = fake_quantize(x, fmt, rounding=rounding, generator=SRGenerator(3), backend="torch")
        assert got.dtype == torch.bfloat16 and torch.equal(bits(got), bits(ref))


# --- native FP8 GEMMs ------------------------------------------------------------------------------

POW2 = (("power_of_two", True),)
E4 = QuantSpec("fp8_e4m3", "nearest", POW2)
E5_SR = QuantSpec("fp8_e5m2", "stochastic", POW2)
# One E4M3 side in every GEMM, so all three run on _scaled_mm; power-of-two scales make dequantized
# operands exact in BF16, leaving only the accumulation and the output rounding to differ.
ALL_NATIVE = GemmSpecs(x=E4, w=E4, dy=E5_SR, w_t=E4, dy_t=E5_SR, x_t=E4)


def run_layer(backend: str, tokens=256, k=512, n=384):
    from megatron_lowp.device import get_device

    device = get_device(ON)
    torch.manual_seed(0)
    layer = QuantizedLinear(k, n, ALL_NATIVE, name="t", backend=backend).to(ON)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1)).to(ON).requires_grad_()
    dy = torch.randn(tokens, n, generator=torch.Generator().manual_seed(2)).to(ON)
    with device.autocast(torch.bfloat16):
        y = layer(x)
    y.backward(dy.to(y.dtype))
    return y.detach().float(), x.grad.float(), layer.weight.grad.float(), layer.sr.offset


def test_native_fp8_fprop_dgrad_wgrad_match_emulation(monkeypatch):
    from megatron_lowp.precision import quantized_linear as ql

    calls = []
    real = ql._scaled_mm
    monkeypatch.setattr(ql, "_scaled_mm", lambda *a: calls.append((a[0].dtype, a[2].dtype, a[0].device.type)) or real(*a))
    native = run_layer("native")
    assert calls == [(torch.float8_e4m3fn, torch.float8_e4m3fn, ON), (torch.float8_e5m2, torch.float8_e4m3fn, ON),
                     (torch.float8_e5m2, torch.float8_e4m3fn, ON)]  # fprop, dgrad, wgrad
    emulated = run_layer("emulated")
    assert native[3] == emulated[3] > 0  # the same stochastic-rounding draws
    for name, a, b in zip(("y", "dx", "dw"), native[:3], emulated[:3], strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and a.abs().max() > 0
        err = (a - b).abs().max().item()
        assert err <= 2**-6 * b.abs().max().item(), f"{name}: max |native - emulated| = {err:.3g}"


# --- training ---------------------------------------------------------------------------------------

SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_size=128",
         "train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=20",
         "optim.warmup_steps=2", "train.log_every=1", "train.eval_every=10",
         "train.checkpoint_every=10", "logging.progress=false", f"device.type={ON}", "device.deterministic=true"]
RECIPES = {
    "bf16": ["precision.recipe=bf16"],
    "fp8": ["precision.recipe=fp8", "precision.backend=native"],
    "fp4": ["precision.recipe=fp4", "precision.grad_noise.every=5"],
    "ngpt_fp4": ["precision.recipe=ngpt_fp4", "model.arch=ngpt", "model.init_std=0.125", "optim.weight_decay=0.0"],
}


def rows(run_dir) -> list[tuple]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"], r["grad_norm"], r.get("val_loss")) for r in map(json.loads, lines) if "loss" in r]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_twenty_steps_are_finite_and_resume_bit_exactly(recipe, repo, tmp_path, monkeypatch):
    from megatron_lowp.numerics import triton_kernels as tk
    from megatron_lowp.precision import quantized_linear as ql
    from megatron_lowp.train import train

    used = {"scaled_mm": 0, "triton": 0}
    real_mm, real_fp8, real_nvfp4 = ql._scaled_mm, tk.fp8_quantize, tk.nvfp4_quantize

    def count(key, fn):
        def wrapper(*a, **k):
            used[key] += 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(ql, "_scaled_mm", count("scaled_mm", real_mm))
    monkeypatch.setattr(tk, "fp8_quantize", count("triton", real_fp8))
    monkeypatch.setattr(tk, "nvfp4_quantize", count("triton", real_nvfp4))

    def cfg(*extra):
        return load_config(repo / "recipes/quickstart.yaml", [*SMALL, *RECIPES[recipe], f"run.out_dir={tmp_path}", *extra],
                           extra_choices={"precision.recipe": available_recipes()})

    straight = train(cfg("run.name=straight"))
    train(cfg("run.name=resumed", "train.stop_at_step=10"))
    resumed = train(cfg("run.name=resumed"))
    a, b = rows(straight.run_dir), rows(resumed.run_dir)
    assert [r[0] for r in a] == list(range(1, 21))
    assert all(math.isfinite(v) for r in a for v in r[1:] if v is not None)
    assert a[-1][1] < a[0][1]  # it learns
    assert b == a  # bit-exact: every loss, grad norm and validation loss compared with ==
    if recipe == "fp8":
        assert used["scaled_mm"] > 0
    if recipe in ("fp8", "fp4", "ngpt_fp4"):
        assert used["triton"] > 0
