"""The fused Triton quantizers reproduce the PyTorch reference bit for bit (run under TRITON_INTERPRET=1).

triton.jit chooses interpreter or compiler when it decorates, and reads TRITON_INTERPRET then; the
kernels are built lazily per mode, so setting the variable per test (monkeypatch) is enough and does
not leak into other test modules (where CPU calls must keep using the torch path).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from megatron_lowp.device import kernels as device_kernels  # noqa: E402
from megatron_lowp.device import triton_kernels_usable  # noqa: E402
from megatron_lowp.errors import UserError  # noqa: E402
from megatron_lowp.numerics import SRGenerator, fake_quantize, quantize  # noqa: E402
from megatron_lowp.numerics import triton_kernels as tk  # noqa: E402
from megatron_lowp.numerics.formats import E4M3, E4M3_GAUDI2, E5M2, TORCH_DTYPES  # noqa: E402
from megatron_lowp.numerics.rounding import round_to_format  # noqa: E402


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


def wide_data(shape, seed: int) -> torch.Tensor:
    """Values over 2^-24 .. 2^24 (subnormal range and beyond max of both FP8 formats), zeros and -0."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-24, 25, (n,), generator=g).to(torch.float32))
    x[::17] = 0.0
    x[5::17] = -0.0
    return x.reshape(shape)


def assert_same_qt(a, b) -> None:
    assert a.fmt == b.fmt and a.shape == b.shape and a.axis == b.axis and a.options == b.options
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
    assert torch.equal(bits(a.data), bits(b.data))
    assert a.scale.dtype == b.scale.dtype and torch.equal(bits(a.scale), bits(b.scale))
    if a.tensor_scale is None:
        assert b.tensor_scale is None
    else:
        assert torch.equal(bits(a.tensor_scale), bits(b.tensor_scale))


def test_interpreter_takes_effect_and_usable_follows_the_env(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    x = torch.ones(4)
    assert triton_kernels_usable(x)
    assert isinstance(tk.kernels().fp8, InterpretedFunction)
    assert isinstance(tk.kernels().nvfp4, InterpretedFunction)
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_kernels_usable(x)  # plain CPU tensor, no interpreter: torch path
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(device_kernels, "_triton_importable", lambda: False)
    assert not triton_kernels_usable(x)


SHAPES = [(1,), (7,), (1024,), (1025,), (3, 700), (2, 3, 5, 67)]


@pytest.mark.parametrize("fmt,flavour", [("fp8_e4m3", "ocp"), ("fp8_e4m3", "gaudi2"), ("fp8_e5m2", None)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fp8_fixed_scale_bits_match_torch(fmt, flavour, rounding):
    """scale=1.5 on wide data: saturation, subnormals, zeros, -0; several shapes incl. non-multiples of 1024."""
    opts = {"scale": 1.5} if flavour is None else {"scale": 1.5, "flavour": flavour}
    for i, shape in enumerate(SHAPES):
        x = wide_data(shape, seed=i)
        g_t, g_k = SRGenerator(11, 1000 + i), SRGenerator(11, 1000 + i)
        ref = quantize(x, fmt, rounding=rounding, generator=g_t, backend="torch", **opts)
        got = quantize(x, fmt, rounding=rounding, generator=g_k, backend="triton", **opts)
        assert_same_qt(got, ref)
        assert g_k.state_dict() == g_t.state_dict()
    # the saturated and subnormal codes really occur in this data
    codes = bits(ref.data) & 0x7F
    top = 0x7E if (fmt, flavour) == ("fp8_e4m3", "ocp") else (0x77 if flavour == "gaudi2" else 0x7B)
    assert (codes == top).any() and ((codes > 0) & (codes < (8 if fmt == "fp8_e4m3" else 4))).any()


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fp8_current_scaling_and_fake_quantize_match_torch(fmt, rounding):
    x = (torch.randn(3, 333, generator=torch.Generator().manual_seed(3)) * 7).to(torch.bfloat16)
    for power_of_two in (False, True):
        g_t, g_k = SRGenerator(5), SRGenerator(5)
        ref = fake_quantize(x, fmt, rounding=rounding, generator=g_t, backend="torch", power_of_two=power_of_two)
        got = fake_quantize(x, fmt, rounding=rounding, generator=g_k, backend="triton", power_of_two=power_of_two)
        assert got.dtype == torch.bfloat16 and torch.equal(got.view(torch.int16), ref.view(torch.int16))
        assert g_k.offset == g_t.offset == x.numel() * (rounding == "stochastic")


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E4M3_GAUDI2])
def test_fp8_every_code_midpoint_and_neighbour_rounds_like_torch(fmt):
    """Every representable value, every midpoint (ties to even), one float32 ulp either side of it."""
    codes = torch.arange(256, dtype=torch.uint8).view(TORCH_DTYPES[fmt.name]).to(torch.float32)
    v = torch.unique(codes[torch.isfinite(codes) & (codes.abs() <= fmt.max_value)])
    mids = (v[1:] + v[:-1]) / 2
    x = torch.cat([v, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), v * 1.0001])
    one = torch.ones(())
    for rounding in ("nearest", "stochastic"):
        g_t, g_k = SRGenerator(1, 2**32 - 100), SRGenerator(1, 2**32 - 100)  # counters cross 2^32
        u = g_t.uniform(x.shape) if rounding == "stochastic" else None
        ref = round_to_format(x, fmt, rounding, u).to(TORCH_DTYPES[fmt.name])
        got, amax = tk.fp8_quantize(x, one, fmt, rounding, g_k, return_amax=True)
        assert torch.equal(bits(got), bits(ref))
        assert torch.equal(bits(amax), bits(x.abs().amax()))
        assert g_k.offset == g_t.offset


def test_fp8_fused_amax_over_many_programs():
    x = wide_data((5000,), seed=9).to(torch.bfloat16)
    data, amax = tk.fp8_quantize(x, torch.tensor(2.0**-10), E5M2, "nearest", None, return_amax=True)
    assert amax.dtype == torch.float32 and amax.item() == x.float().abs().max().item()
    ref = round_to_format(x.float() * 2.0**-10, E5M2).to(torch.float8_e5m2)
    assert torch.equal(bits(data), bits(ref))
    data0, none = tk.fp8_quantize(x[:0], torch.tensor(1.0), E4M3)
    assert data0.shape == (0,) and none is None


def nvfp4_data(shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-6, 7, shape[:-1] + (1,), generator=g).float())
    flat = x.reshape(-1, 16)
    flat[1] = 0.0  # an all-zero block
    flat[2, 3] = 1e4  # a single outlier (sets the tensor amax)
    flat[3, :8] = -0.0
    return x


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("shape", [(1, 64), (4, 48), (3, 5, 32), (130, 16)])
def test_nvfp4_bits_match_torch(rounding, shape):
    x = nvfp4_data(shape, seed=len(shape) * 100 + shape[-1])
    for opts in ({}, {"tensor_scale": "fixed", "tensor_amax": 3.0}, {"tensor_scale": "off"}):
        g_t, g_k = SRGenerator(7, 2**33 + 5), SRGenerator(7, 2**33 + 5)
        ref = quantize(x, "nvfp4", rounding=rounding, generator=g_t, backend="torch", **opts)
        got = quantize(x, "nvfp4", rounding=rounding, generator=g_k, backend="triton", **opts)
        assert_same_qt(got, ref)
        assert g_k.offset == g_t.offset
        assert torch.equal(bits(got.dequantize()), bits(ref.dequantize()))
    # the zero block stores scale 0 and code 0 bytes; the outlier block's scale saturates at 448
    assert bits(ref.scale).reshape(-1)[1] == 0 and (ref.data.reshape(-1, 8)[1] == 0).all()


def test_nvfp4_block_scale_rounding_order_at_e4m3_midpoints():
    """Block maxima whose (blockmax / 6) * S sits within a few float32 ulps of an E4M3 midpoint, where
    another operation order (blockmax * (S / 6)) gives a different scale: the kernel must follow the reference."""
    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).to(torch.float32).abs()
    v = torch.unique(v[torch.isfinite(v) & (v <= 448)])
    S = torch.tensor(2688 / 3.0)  # what tensor_scale="fixed", tensor_amax=3 gives
    b0 = (v[1:] + v[:-1]) / 2 * 6 / S
    cand = torch.cat([b0 * (1 + k * torch.finfo(torch.float32).eps) for k in range(-6, 7)])
    order_matters = round_to_format((cand / 6.0) * S, E4M3) != round_to_format(cand * (S / 6.0), E4M3)
    assert int(order_matters.sum()) > 10
    bmax = cand[order_matters]
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(bmax.numel(), 16, generator=g) * 2 - 1) * bmax[:, None]
    x[torch.arange(bmax.numel()), torch.randint(0, 16, (bmax.numel(),), generator=g)] = bmax
    for rounding in ("nearest", "stochastic"):
        ref = quantize(
            x,
            "nvfp4",
            rounding=rounding,
            backend="torch",
            generator=SRGenerator(1),
            tensor_scale="fixed",
            tensor_amax=3.0,
        )
        got = quantize(
            x,
            "nvfp4",
            rounding=rounding,
            backend="triton",
            generator=SRGenerator(1),
            tensor_scale="fixed",
            tensor_amax=3.0,
        )
        assert_same_qt(got, ref)


def test_nvfp4_other_power_of_two_block_and_fake_quantize():
    x = nvfp4_data((6, 64), seed=4).to(torch.float16)
    for rounding in ("nearest", "stochastic"):
        g_t, g_k = SRGenerator(3), SRGenerator(3)
        ref = fake_quantize(x, "nvfp4", rounding=rounding, generator=g_t, backend="torch", block_size=32)
        got = fake_quantize(x, "nvfp4", rounding=rounding, generator=g_k, backend="triton", block_size=32)
        assert got.dtype == torch.float16 and torch.equal(got.view(torch.int16), ref.view(torch.int16))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "nvfp4"])
def test_sr_stream_advances_identically_over_consecutive_calls(fmt):
    x1, x2 = nvfp4_data((4, 32), seed=1), nvfp4_data((2, 48), seed=2)
    g_t, g_k = SRGenerator(2**40 + 3, 17), SRGenerator(2**40 + 3, 17)
    r1 = quantize(x1, fmt, rounding="stochastic", generator=g_t, backend="torch")
    r2 = quantize(x2, fmt, rounding="stochastic", generator=g_t, backend="torch")
    k1 = quantize(x1, fmt, rounding="stochastic", generator=g_k, backend="triton")
    k2 = quantize(x2, fmt, rounding="stochastic", generator=g_k, backend="triton")
    assert_same_qt(k1, r1)
    assert_same_qt(k2, r2)
    assert g_k.state_dict() == g_t.state_dict() == {"seed": 2**40 + 3, "offset": 17 + x1.numel() + x2.numel()}
    # mixing backends continues the same stream too
    g_mix = SRGenerator(2**40 + 3, 17)
    quantize(x1, fmt, rounding="stochastic", generator=g_mix, backend="torch")
    assert_same_qt(quantize(x2, fmt, rounding="stochastic", generator=g_mix, backend="triton"), r2)


def test_auto_dispatch_and_errors(monkeypatch):
    calls = []
    real_fp8, real_nvfp4 = tk.fp8_quantize, tk.nvfp4_quantize
    monkeypatch.setattr(tk, "fp8_quantize", lambda *a, **k: calls.append("fp8") or real_fp8(*a, **k))
    monkeypatch.setattr(tk, "nvfp4_quantize", lambda *a, **k: calls.append("nvfp4") or real_nvfp4(*a, **k))
    x = torch.randn(16, 32)
    quantize(x, "fp8_e4m3")
    quantize(x, "nvfp4")
    assert calls == ["fp8", "nvfp4"]
    # not covered -> auto runs torch; backend="triton" says why
    for fmt, opts in [
        ("fp8_e4m3", {"scaling": "channel"}),
        ("nvfp4", {"scale_rounding": "encode"}),
        ("nvfp4", {"tile": True}),
        ("mxfp4", {}),
    ]:
        ref = quantize(x, fmt, backend="torch", **opts)
        assert_same_qt(quantize(x, fmt, **opts), ref)
        with pytest.raises(UserError, match="backend='triton'"):
            quantize(x, fmt, backend="triton", **opts)
    with pytest.raises(UserError, match="last axis"):
        quantize(x.T.contiguous(), "nvfp4", axis=0, backend="triton")
    assert calls == ["fp8", "nvfp4"]
    with pytest.raises(UserError, match="backend"):
        quantize(x, "fp8_e4m3", backend="cuda-ish")
    with pytest.raises(UserError, match="NaN or Inf"):
        quantize(torch.tensor([1.0, float("nan")]), "fp8_e4m3", backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(UserError, match="TRITON_INTERPRET"):
        quantize(x, "fp8_e4m3", backend="triton")
    quantize(x, "fp8_e4m3")  # auto without a usable triton: torch
    assert calls == ["fp8", "nvfp4"]
