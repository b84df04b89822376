"""NVFP4 and MX block scaling on hand-made blocks, tiles, axes, errors, and a torchao cross-check."""

import pytest
import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import E4M3, E5M2, SRGenerator, fake_quantize, quantize, round_to_format
from megatron_lowp.numerics.sr_random import uniform


def bits(t):
    return t.float().view(torch.int32)


def row(values, n=16):
    v = torch.zeros(n)
    v[: len(values)] = torch.tensor(values, dtype=torch.float32)
    return v.reshape(1, n)


# ---------------- NVFP4 (decode convention: TE / hardware) ----------------


def test_nvfp4_all_zero_block_and_zero_tensor():
    x = torch.zeros(2, 32)
    q = quantize(x, "nvfp4")
    assert q.tensor_scale.item() == 1.0  # amax 0 -> S = 1
    assert q.scale.float().abs().sum().item() == 0.0  # d = 0, e guarded to 0
    assert fake_quantize(x, "nvfp4").abs().sum().item() == 0.0
    # a zero block next to a non-zero one
    y = torch.cat([torch.zeros(1, 16), torch.full((1, 16), 3.0)], dim=1)
    qy = quantize(y, "nvfp4")
    assert qy.scale.float().tolist() == [[0.0, 448.0]]
    assert fake_quantize(y, "nvfp4").tolist() == y.tolist()


def test_nvfp4_scales_by_hand():
    # tensor amax 6 -> S = 2688 / 6 = 448; block max 6 -> d = E4M3(1 * 448) = 448; e = 1
    x = row([6.0, 1.0, 0.25, -2.5, 5.0])
    q = quantize(x, "nvfp4")
    assert q.tensor_scale.item() == 448.0 and q.scale.float().item() == 448.0
    assert fake_quantize(x, "nvfp4")[0, :5].tolist() == [6.0, 1.0, 0.0, -2.0, 4.0]  # RNE ties: 0.25->0, 2.5->2, 5->4
    # outlier: one big value sets the block scale, the small ones flush to zero
    o = row([1000.0, 1.0, -2.0, 30.0])
    fo = fake_quantize(o, "nvfp4")
    assert (
        fo[0, 0].item() == pytest.approx(1000.0, rel=1e-6)
        and fo[0, 1:3].tolist() == [0.0, -0.0]
        and fo[0, 3].item() == 0.0
    )
    # second block with a smaller max gets its own scale; exactly representable values survive
    x2 = torch.cat([row([6.0]), row([0.75, 0.5, 0.125, 0.1875])], dim=1)
    q2 = quantize(x2, "nvfp4")
    assert q2.scale.float().tolist() == [[448.0, 56.0]]  # (0.75 / 6) * 448 = 56
    assert fake_quantize(x2, "nvfp4")[0, 16:20].tolist() == [0.75, 0.5, 0.125, 0.1875]


def test_nvfp4_fixed_and_off_tensor_scale():
    x = row([0.5, -0.25, 0.125, 0.0625])
    f = quantize(x, "nvfp4", tensor_scale="fixed", tensor_amax=1.0)
    assert f.tensor_scale.item() == 2688.0 and f.scale.float().item() == 224.0  # (0.5/6)*2688 = 224
    # e = 2688 / 224 = 12: 0.0625 * 12 = 0.75 is an E2M1 tie -> 1.0 (even code), i.e. 1 * 224 / 2688 = 1/12
    fx = fake_quantize(x, "nvfp4", tensor_scale="fixed", tensor_amax=1.0)[0, :4]
    assert fx[:3].tolist() == [0.5, -0.25, 0.125] and fx[3].item() == pytest.approx(1 / 12, rel=1e-6)
    off = quantize(x, "nvfp4", tensor_scale="off")
    assert off.tensor_scale.item() == 1.0
    # 0.5 / 6 = 0.0833 -> E4M3 RN (spacing 2^-7 in [2^-4, 2^-3)) = 11 * 2^-7 = 0.0859375
    assert off.scale.float().item() == 0.0859375
    # values beyond a too-small fixed amax saturate: block scale at 448, elements at 6
    big = row([10.0, 1.0])
    s = quantize(big, "nvfp4", tensor_scale="fixed", tensor_amax=1.0)
    assert s.scale.float().item() == 448.0
    assert fake_quantize(big, "nvfp4", tensor_scale="fixed", tensor_amax=1.0)[0, 0].item() == 1.0  # 6*448/2688
    with pytest.raises(UserError, match="tensor_amax"):
        fake_quantize(x, "nvfp4", tensor_scale="fixed")
    with pytest.raises(UserError, match="tensor_scale: 'max' is not one of amax, fixed, off"):
        fake_quantize(x, "nvfp4", tensor_scale="max")


def test_nvfp4_subnormal_range_values():
    # a tensor whose values are tiny: the tensor scale lifts them, nothing flushes to zero
    x = row([3e-30, 1e-30, -2e-30])
    y = fake_quantize(x, "nvfp4")
    assert (y[0, :3] != 0).all()
    assert torch.allclose(y[0, :3], x[0, :3], rtol=0.25)


def test_nvfp4_encode_convention_paper():
    # t = amax / 2688; x' = |x| / t; m = E4M3(6 / blockmax(x')); q = E2M1(x' * m); x_hat = sign * q / m * t
    x = torch.cat([row([6.0, 1.0, -2.5]), row([0.3, 0.1])], dim=1)
    q = quantize(x, "nvfp4", scale_rounding="encode")
    t = 6.0 / 2688
    assert q.tensor_scale.item() == pytest.approx(t)
    xs = x.abs() / q.tensor_scale
    m1 = round_to_format(torch.tensor([6.0]) / xs[0, :16].max(), E4M3)
    assert q.scale.float()[0, 0].item() == m1.item()
    # the max block's multiplier 6 / 2688 = 1/448 is below E4M3's normals and rounds to 2^-9, so its top
    # element becomes E2M1(2688 * 2^-9 = 5.25) = 6 -> 6 / 2^-9 * t = 6.857: a real cost of this convention
    assert m1.item() == 2.0**-9
    y = fake_quantize(x, "nvfp4", scale_rounding="encode")
    assert y[0, 0].item() == pytest.approx(6.0 / 2.0**-9 * t, rel=1e-6)
    # the second block (blockmax 0.3) gets a normal-range multiplier and is accurate
    assert y[0, 16:18].tolist() == pytest.approx([0.3, 0.1], rel=0.1)
    z = quantize(torch.zeros(1, 16), "nvfp4", scale_rounding="encode")
    assert z.scale.float().item() == 1.0  # non-finite multiplier replaced by 1
    assert torch.equal(fake_quantize(x, "nvfp4", scale_rounding="encode"), q.dequantize())


def test_nvfp4_tiles_share_one_scale():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g)
    w[3, 20] = 40.0  # outlier in tile (0, 1)
    q = quantize(w, "nvfp4", tile=True)
    s = q.scale.float()  # (32, 3): one per 1x16 block, repeated down each 16-row tile
    assert s.shape == (32, 3)
    for ti in range(2):
        tile_rows = s[16 * ti : 16 * ti + 16]
        assert (tile_rows == tile_rows[0]).all()
    assert s[0, 1] > s[0, 0] and s[0, 1] > s[16, 1]
    assert not (quantize(w, "nvfp4").scale.float()[0:16, 1] == s[0, 1]).all()  # 1-D blocks differ
    with pytest.raises(UserError, match="tile=True needs a 2-D tensor"):
        fake_quantize(torch.randn(2, 16, 16), "nvfp4", tile=True)
    with pytest.raises(UserError, match="other dimension \\(size 8\\)"):
        fake_quantize(torch.randn(8, 16), "nvfp4", tile=True)


# ---------------- MX ----------------


def test_mx_scales_by_hand():
    # blockmax 6 -> floor(log2 6) = 2 -> X = 2^(2-2) = 1 for mxfp4; 2^(2-8) for mxfp8
    x = row([6.0, 1.0, -0.75], n=32)
    q4 = quantize(x, "mxfp4")
    assert q4.scale.tolist() == [[127]]
    assert fake_quantize(x, "mxfp4")[0, :3].tolist() == [6.0, 1.0, -1.0]  # 0.75 is a tie -> 1 (even)
    q8 = quantize(x, "mxfp8")
    assert q8.scale.tolist() == [[127 - 6]]
    assert fake_quantize(x, "mxfp8")[0, :3].tolist() == [6.0, 1.0, -0.75]
    # blockmax 7.9 -> X = 1 and 7.9 saturates to 6 (the OCP scale rule clips the block top)
    assert fake_quantize(row([7.9, 0.5], n=32), "mxfp4")[0, :2].tolist() == [6.0, 0.5]
    # mxfp8: 511 / 2^0 saturates at 448
    assert fake_quantize(row([511.0], n=32), "mxfp8")[0, 0].item() == 448.0


def test_mx_zero_block_and_extreme_exponents():
    x = torch.zeros(1, 64)
    x[0, 40] = 2.0**-140  # float32 subnormal block max: exponent clamps at -127
    q = quantize(x, "mxfp4")
    assert q.scale.tolist() == [[0, 0]]  # zero block -> 2^-127 (code 0); -142 clamps to -127
    assert fake_quantize(x, "mxfp4").abs().sum().item() == 0.0  # 2^-140 / 2^-127 = 2^-13 -> 0
    big = row([2.0**120], n=32)
    assert quantize(big, "mxfp8").scale.item() == 127 + 112
    assert fake_quantize(big, "mxfp8")[0, 0].item() == 2.0**120


def test_axis_handling_equals_transpose():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 48, generator=g)
    for fmt in ["nvfp4", "mxfp4", "mxfp8"]:
        a = fake_quantize(x, fmt, axis=0)
        b = fake_quantize(x.T.contiguous(), fmt, axis=-1).T
        assert torch.equal(bits(a), bits(b)), fmt
        qa = quantize(x, fmt, axis=0)
        assert qa.axis == 0 and torch.equal(qa.dequantize(), a)
    x3 = torch.randn(2, 32, 3, generator=g)
    assert torch.equal(fake_quantize(x3, "mxfp8", axis=1), fake_quantize(x3.movedim(1, -1), "mxfp8").movedim(-1, 1))


def test_sr_noise_indexed_by_position_in_x():
    x = torch.randn(8, 32)
    y = fake_quantize(x, "fp8_e5m2", rounding="stochastic", scale=1.0, generator=SRGenerator(4))
    assert torch.equal(y, round_to_format(x, E5M2, "stochastic", uniform(4, 0, x.shape)))


def test_block_errors():
    with pytest.raises(UserError, match="block size 16 does not divide dimension 1 \\(size 24\\).*axis=-1"):
        fake_quantize(torch.randn(4, 24), "nvfp4")
    with pytest.raises(UserError, match="block size 32 does not divide dimension 0 \\(size 16\\).*axis=0"):
        quantize(torch.randn(16, 64), "mxfp8", axis=0)
    with pytest.raises(UserError, match="axis=2 is out of range"):
        fake_quantize(torch.randn(4, 32), "mxfp4", axis=2)
    for bad in [float("nan"), float("inf"), float("-inf")]:
        x = torch.ones(2, 32)
        x[1, 3] = bad
        for fmt in ["nvfp4", "mxfp4", "mxfp8"]:
            with pytest.raises(UserError, match="NaN or Inf"):
                quantize(x, fmt)
    with pytest.raises(UserError, match="block_size=3"):
        fake_quantize(torch.randn(2, 48), "nvfp4", block_size=3)
    assert fake_quantize(torch.randn(2, 48), "nvfp4", block_size=8).shape == (2, 48)


def test_quantized_storage_layout():
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    q = quantize(x, "nvfp4")
    assert q.data.dtype == torch.uint8 and q.data.shape == (4, 32)
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (4, 4)
    m = quantize(x, "mxfp4")
    assert m.data.shape == (4, 32) and m.scale.dtype == torch.uint8 and m.scale.shape == (4, 2)
    m8 = quantize(x, "mxfp8")
    assert m8.data.dtype == torch.float8_e4m3fn and m8.data.shape == (4, 64)
    for fmt in ["nvfp4", "mxfp4", "mxfp8", "fp8_e4m3"]:
        for r in ["nearest", "stochastic"]:
            f = fake_quantize(x, fmt, rounding=r, generator=SRGenerator(2))
            d = quantize(x, fmt, rounding=r, generator=SRGenerator(2)).dequantize(torch.bfloat16)
            assert f.dtype == torch.bfloat16 and torch.equal(f.view(torch.int16), d.view(torch.int16))


# ---------------- independent implementation: torchao ----------------


def _torchao():
    pytest.importorskip("torchao")
    return pytest.importorskip("torchao.prototype.mx_formats.mx_tensor")


@pytest.mark.parametrize("fmt,elem", [("mxfp8", "fp8"), ("mxfp4", "fp4")])
def test_mx_matches_torchao(fmt, elem):
    mx = _torchao()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-8, 8, (64, 1), generator=g).float())
    elem_dtype = torch.float8_e4m3fn if elem == "fp8" else torch.float4_e2m1fn_x2
    scale, data = mx.to_mx(x, elem_dtype, 32)
    q = quantize(x, fmt)
    assert torch.equal(scale.view(torch.uint8).reshape(q.scale.shape), q.scale)
    if fmt == "mxfp8":
        assert torch.equal(data.view(torch.uint8), q.data.view(torch.uint8))
    else:
        assert torch.equal(data.view(torch.uint8).reshape(q.data.shape), q.data)


def test_nvfp4_matches_torchao():
    _torchao()
    nv = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-6, 6, (64, 1), generator=g).float())
    amax = x.abs().amax()
    pts = nv.per_tensor_amax_to_scale(amax)  # torchao's decode-side tensor scale amax / 2688
    scale, data = nv.nvfp4_quantize(x, 16, pts)
    q = quantize(x, "nvfp4")
    # torchao computes blockmax/6/t and x*(1/t)/d; we compute (blockmax/6)*S and x*(S/d): equal except
    # when a product lands within one float32 ulp of a rounding tie, which random data essentially never does
    same_scale = (scale.view(torch.uint8).reshape(q.scale.shape) == q.scale.view(torch.uint8)).float().mean()
    same_data = (data.view(torch.uint8).reshape(q.data.shape) == q.data).float().mean()
    assert same_scale.item() >= 0.999 and same_data.item() >= 0.999
