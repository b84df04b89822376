"""Element formats, RTN rounding, FP4 packing and FP8 scaling, checked bit for bit."""

from pathlib import Path

import pytest
import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import (
    E2M1,
    E4M3,
    E4M3_GAUDI2,
    E5M2,
    FORMATS,
    AmaxHistory,
    e8m0_decode,
    e8m0_encode,
    fake_quantize,
    quantize,
    round_to_format,
    scale_from_amax,
)
from megatron_lowp.numerics.packing import codes_to_e2m1, e2m1_to_codes, pack_fp4, unpack_fp4

FP8 = [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


def all_finite_codes(dtype: torch.dtype) -> torch.Tensor:
    v = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    return v[torch.isfinite(v)]


@pytest.mark.parametrize("fmt,dtype", FP8)
def test_rtn_matches_torch_on_every_code_and_midpoint(fmt, dtype):
    codes = all_finite_codes(dtype)
    assert torch.equal(bits(round_to_format(codes, fmt)), bits(codes))  # incl. -0.0
    grid = torch.unique(codes[codes >= 0])  # sorted positive grid
    mids = (grid[1:] + grid[:-1]) / 2  # exact in float32; ties go to the even code
    mids = torch.cat([mids, -mids])
    assert torch.equal(bits(round_to_format(mids, fmt)), bits(mids.to(dtype)))
    # a tie example by hand: E4M3 between 1.0 and 1.125 -> 1.0 (even mantissa); 1.1875 -> 1.25
    if fmt is E4M3:
        assert round_to_format(torch.tensor([1.0625, 1.1875]), fmt).tolist() == [1.0, 1.25]


@pytest.mark.parametrize("fmt,dtype", FP8)
def test_rtn_matches_torch_on_random_values_incl_subnormals(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    n = 200_000
    exps = torch.randint(fmt.min_exponent - fmt.man_bits - 3, fmt.emax + 1, (n,), generator=g).float()
    x = torch.randn(n, generator=g) * torch.exp2(exps)
    x = x.clamp(-fmt.max_value, fmt.max_value)
    assert (x.abs() < fmt.min_normal).sum() > 1000  # the subnormal range is exercised
    assert torch.equal(bits(round_to_format(x, fmt)), bits(x.to(dtype)))


def test_fp8_saturates_where_torch_overflows():
    x = torch.tensor([1e6, -1e6, 60000.0])
    assert round_to_format(x, E5M2).tolist() == [57344.0, -57344.0, 57344.0]
    assert torch.isinf(x.to(torch.float8_e5m2).float()[0])  # torch's cast: inf, not saturation
    assert round_to_format(x, E4M3).tolist() == [448.0, -448.0, 448.0]
    assert round_to_format(torch.tensor([250.0, 239.0, 1e4]), E4M3_GAUDI2).tolist() == [240.0, 240.0, 240.0]


def test_format_constants():
    assert (E4M3.min_normal, E4M3.min_subnormal, E4M3.max_value) == (2**-6, 2**-9, 448.0)
    assert (E5M2.min_normal, E5M2.min_subnormal, E5M2.max_value) == (2**-14, 2**-16, 57344.0)
    assert (E2M1.min_normal, E2M1.min_subnormal, E2M1.emax) == (1.0, 0.5, 2)


E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e2m1_grid_table():
    grid = torch.tensor(E2M1_GRID + [-v for v in E2M1_GRID])
    assert torch.equal(bits(round_to_format(grid, E2M1)), bits(grid))
    # midpoints: to the neighbour with an even mantissa code
    mids = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    expected = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    assert round_to_format(mids, E2M1).tolist() == expected
    assert round_to_format(-mids, E2M1).tolist() == [-v for v in expected]
    # beyond 6 saturates (no 8 exists); just below a midpoint rounds down
    assert round_to_format(torch.tensor([6.1, 7.0, 100.0, -9.0, 4.99]), E2M1).tolist() == [6.0, 6.0, 6.0, -6.0, 4.0]
    # the small negatives round to -0.0 like torch casts do
    assert torch.signbit(round_to_format(torch.tensor([-0.2]), E2M1)).item()


def test_fp4_packing_round_trips_all_codes():
    codes = torch.arange(16, dtype=torch.uint8)
    vals = codes_to_e2m1(codes)
    assert vals[:8].tolist() == E2M1_GRID and vals[8:].tolist() == [-v for v in E2M1_GRID]
    assert torch.equal(e2m1_to_codes(vals), codes)  # incl. -0.0 -> code 8
    packed = pack_fp4(codes)
    assert packed.tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]  # low nibble first
    assert torch.equal(unpack_fp4(packed), codes)
    all_pairs = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(pack_fp4(unpack_fp4(all_pairs)), all_pairs)


def test_e8m0_codes():
    e = torch.tensor([-127, -1, 0, 1, 127])
    codes = e8m0_encode(e)
    assert codes.tolist() == [0, 126, 127, 128, 254]
    vals = e8m0_decode(codes)
    assert vals.tolist() == [2.0**-127, 0.5, 1.0, 2.0, 2.0**127]


def test_scale_from_amax():
    a = torch.tensor([0.0, 1.0, 3.0, 448.0, 1000.0])
    assert scale_from_amax(a, 448.0).tolist() == pytest.approx([1.0, 448.0, 448 / 3, 1.0, 0.448])
    # power of two: largest 2^k with amax * 2^k <= max
    p = scale_from_amax(a, 448.0, power_of_two=True)
    assert p.tolist() == [1.0, 256.0, 128.0, 1.0, 0.25]
    # a value just below a binade edge: 448 / 1.75 = 256 exactly -> 2^8; slightly more -> 2^7
    edge = torch.tensor([1.75, 1.7500001])
    assert scale_from_amax(edge, 448.0, power_of_two=True).tolist() == [256.0, 128.0]
    r = torch.rand(10_000) * 1e3 + 1e-30
    assert (r * scale_from_amax(r, 57344.0, power_of_two=True) <= 57344.0).all()


def test_amax_history_delayed_scaling_and_state():
    h = AmaxHistory(3)
    assert h.scale(240.0).item() == 1.0  # empty history: unscaled, as the FP8 seed's first batch
    for a in [2.0, 8.0, 1.0]:
        h.update(a)
    assert h.amax().item() == 8.0
    assert h.scale(240.0, power_of_two=True).item() == 16.0  # 8 * 16 = 128 <= 240 < 256
    h.update(0.5)  # 2.0 drops out, 8.0 still in the window
    assert h.amax().item() == 8.0
    h.update(0.5)
    h.update(0.5)
    assert h.amax().item() == 0.5
    h2 = AmaxHistory(3)
    h2.load_state_dict(h.state_dict())
    h.update(4.0)
    h2.update(4.0)
    assert torch.equal(h.history, h2.history) and h.index == h2.index
    with pytest.raises(UserError, match="expected a tensor of shape \\(5,\\)"):
        AmaxHistory(5).load_state_dict(h.state_dict())
    with pytest.raises(UserError, match="length"):
        AmaxHistory(0)


def test_fp8_fake_quantize_tensor_and_channel_scaling():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 3.0, -0.001]])
    q = quantize(x, "fp8_e4m3")
    assert q.scale.item() == pytest.approx(4.48)
    assert q.data.dtype == torch.float8_e4m3fn
    assert torch.equal(fake_quantize(x, "fp8_e4m3"), q.dequantize())
    c = quantize(x, "fp8_e4m3", scaling="channel")  # one scale per row (amax over the contraction axis)
    assert c.scale.shape == (2, 1) and c.scale.flatten().tolist() == pytest.approx([224.0, 4.48])
    assert fake_quantize(x, "fp8_e4m3", scaling="channel")[0].tolist() == [1.0, -2.0, 0.5]
    p = fake_quantize(x, "fp8_e5m2", power_of_two=True)
    assert p[0].tolist() == [1.0, -2.0, 0.5]  # power-of-two scale keeps exact values exact
    # a given (delayed) scale is used as is, and saturation applies
    s = fake_quantize(torch.tensor([1000.0, 1.0]), "fp8_e4m3", scale=1.0)
    assert s.tolist() == [448.0, 1.0]
    g = fake_quantize(torch.tensor([1000.0, 1.0]), "fp8_e4m3", scale=1.0, flavour="gaudi2")
    assert g.tolist() == [240.0, 1.0]
    bf = torch.randn(4, 8).to(torch.bfloat16)
    assert fake_quantize(bf, "fp8_e5m2").dtype == torch.bfloat16


def test_user_errors_name_the_argument():
    x = torch.randn(4, 32)
    with pytest.raises(UserError, match="fmt: 'fp6'.*fp8_e4m3, fp8_e5m2, nvfp4, mxfp4, mxfp8"):
        fake_quantize(x, "fp6")
    with pytest.raises(UserError, match="rounding: 'up' is not one of nearest, stochastic"):
        fake_quantize(x, "nvfp4", rounding="up")
    with pytest.raises(UserError, match="flavour: 'amd'"):
        fake_quantize(x, "fp8_e4m3", flavour="amd")
    with pytest.raises(UserError, match="unknown option.*tile"):
        fake_quantize(x, "mxfp4", tile=True)
    with pytest.raises(UserError, match="scaling: 'block'"):
        fake_quantize(x, "fp8_e5m2", scaling="block")
    with pytest.raises(UserError, match="NaN or Inf"):
        fake_quantize(torch.tensor([1.0, float("inf")]), "fp8_e4m3")
    assert set(FORMATS) == {"fp8_e4m3", "fp8_e5m2", "nvfp4", "mxfp4", "mxfp8"}


def test_numerics_imports_nothing_above_it_and_names_no_device():
    root = Path(__file__).resolve().parents[1] / "megatron_lowp" / "numerics"
    for f in root.glob("*.py"):
        text = f.read_text()
        for banned in ('"cuda"', "'cuda'", "torch.cuda", '"hpu"', "'hpu'"):
            assert banned not in text, f"{f.name} mentions {banned}"
        for line in text.splitlines():
            if "megatron_lowp" in line and ("import" in line):  # numerics may only look down the house
                allowed = ("megatron_lowp.errors", "megatron_lowp.numerics", "megatron_lowp.device")
                assert any(a in line for a in allowed), f"{f.name}: {line}"


def test_tensor_amax_is_max_abs_bit_for_bit():
    """scaling.amax (one aminmax pass) equals |x|.amax() in float32: signed zeros, NaN, inf, bf16."""
    from megatron_lowp.numerics.scaling import amax

    cases = [torch.tensor([0.0, -0.0]), torch.tensor([-0.0]), torch.tensor([1.0, float("nan"), -3.0]),
             torch.tensor([-float("inf"), 2.0]), torch.tensor([-5.0, 2.0]).bfloat16(), torch.tensor(3.0),
             torch.randn(7, 33) * 1e-30]
    for x in cases:
        ref, got = x.abs().to(torch.float32).amax(), amax(x)
        assert got.dtype == torch.float32 and got.shape == ()
        assert torch.equal(ref.view(torch.int32), got.view(torch.int32)) or (ref.isnan() and got.isnan())
