"""The CPU's fused quantizers (backend="inductor", numerics/fused_cpu.py) give the torch reference's bits.

Every compiled graph is compared with backend="torch" on data that reaches the edges: float32 values
from 2^-24 to 2^24 (FP8 subnormals, saturation), zeros and -0, NVFP4 blocks that are all zero, hold
one outlier, or sit 2^-20 below the tensor amax (E4M3 subnormal and zero block scales), both roundings,
SR counters that cross 2^32, and the generator's position afterwards. Each configuration is its own
compiled graph (a few seconds of compiling each), so the cases are chosen to cover every static
switch of the graphs once rather than their product; the default run keeps one case per graph
family, `-m slow` runs them all.
"""

from __future__ import annotations

import pytest
import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import (
    SRGenerator,
    cpu_compile,
    cpu_sr,
    fake_quantize,
    fused_cpu,
    fused_dispatch,
    quantize,
    sr_random,
)
from megatron_lowp.numerics.formats import TORCH_DTYPES

pytestmark = pytest.mark.filterwarnings("error:torch.compile of")


def SLOW(*values):  # noqa: N802 (reads as a marker in the parameter lists)
    """A parameter set marked slow: every configuration compiles graphs of its own (seconds each on
    two cores), so the default suite keeps one case per graph family and `-m slow` runs the rest."""
    return pytest.param(*values, marks=pytest.mark.slow)


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def assert_same_qt(a, b) -> None:
    assert (a.fmt, a.shape, a.axis, a.dtype, a.options) == (b.fmt, b.shape, b.axis, b.dtype, b.options)
    assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
    assert torch.equal(bits(a.data), bits(b.data))
    assert a.scale.dtype == b.scale.dtype and a.scale.shape == b.scale.shape
    assert torch.equal(bits(a.scale), bits(b.scale))
    assert (a.tensor_scale is None) == (b.tensor_scale is None)
    if a.tensor_scale is not None:
        assert torch.equal(bits(a.tensor_scale), bits(b.tensor_scale))


def both(call, x, fmt, rounding, gen_state=(7, 2**32 - 300), **kwargs):
    """call(x, fmt, ...) on the reference and on inductor, from equal generators; returns both results."""
    g_ref, g_fused = SRGenerator(*gen_state), SRGenerator(*gen_state)
    ref = call(x, fmt, rounding=rounding, generator=g_ref, backend="torch", **kwargs)
    got = call(x, fmt, rounding=rounding, generator=g_fused, backend="inductor", **kwargs)
    assert g_fused.state_dict() == g_ref.state_dict()  # the same number of SR counters consumed
    return ref, got


def assert_both_paths_match(x, fmt, rounding, **kwargs) -> None:
    ref, got = both(quantize, x, fmt, rounding, **kwargs)
    assert_same_qt(got, ref)
    ref, got = both(fake_quantize, x, fmt, rounding, **kwargs)
    assert got.dtype == ref.dtype == x.dtype and torch.equal(bits(got), bits(ref))


def wide(shape, seed: int) -> torch.Tensor:
    """randn times 2^k, k uniform in [-24, 24]; every 17th value 0, the next-but-4 -0."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-24, 25, (n,), generator=g).float())
    x[::17] = 0.0
    x[5::17] = -0.0
    return x.reshape(shape)


# ---------------- FP8, per-tensor ----------------


@pytest.mark.parametrize("fmt,flavour", [("fp8_e4m3", "ocp"), SLOW("fp8_e4m3", "gaudi2"), SLOW("fp8_e5m2", None)])
def test_fp8_every_code_midpoint_and_neighbour(fmt, flavour):
    """The exhaustive table: every finite code, every midpoint (ties to even) and one float32 ulp either
    side of it, with scale 1; nearest and stochastic."""
    elem_dtype = torch.float8_e5m2 if fmt == "fp8_e5m2" else torch.float8_e4m3fn
    codes = torch.arange(256, dtype=torch.uint8).view(elem_dtype).float()
    top = 240.0 if flavour == "gaudi2" else torch.finfo(elem_dtype).max
    v = torch.unique(codes[torch.isfinite(codes) & (codes.abs() <= top)])
    mids = (v[1:] + v[:-1]) / 2
    x = torch.cat([v, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), v * 1.0001, -v * 3])
    opts = {"scale": 1.0} | ({} if flavour is None else {"flavour": flavour})
    for rounding in ("nearest", "stochastic"):
        ref, got = both(quantize, x, fmt, rounding, **opts)
        assert_same_qt(got, ref)
    assert (bits(ref.data) & 0x7F).unique().numel() > 100  # the table really covers the codes


def test_sr_rounds_up_only_when_the_uniform_is_below_the_fraction():
    """x = u * 2^-9 (E4M3's subnormal spacing) with u each element's own draw: the fraction equals the
    uniform exactly, so no element may round up (u < frac, strictly); a random table almost never
    has a tie. With scale 1, 65 elements (one flat row)."""
    seed, offset = 5, 2**32 - 20
    u = sr_random.uniform(seed, offset, (5, 13))
    x = u * 2.0**-9
    ref, got = both(quantize, x, "fp8_e4m3", "stochastic", gen_state=(seed, offset), scale=1.0)
    assert_same_qt(got, ref)
    assert (bits(got.data) == 0).all() and (u > 0).all()


@pytest.mark.parametrize("fmt,rounding,power_of_two,dtype", [
    SLOW("fp8_e4m3", "nearest", False, torch.float32),
    ("fp8_e4m3", "nearest", False, torch.bfloat16),  # 16-bit x: widened to float32 first, cast back
    ("fp8_e4m3", "stochastic", True, torch.float32),
    SLOW("fp8_e4m3", "stochastic", False, torch.bfloat16),
    SLOW("fp8_e5m2", "stochastic", False, torch.bfloat16),
    SLOW("fp8_e5m2", "nearest", True, torch.float32),
])
def test_fp8_current_scaling_on_wide_data(fmt, rounding, power_of_two, dtype):
    x = wide((61, 96), seed=1).to(dtype)
    assert_both_paths_match(x, fmt, rounding, power_of_two=power_of_two)
    assert_both_paths_match(wide((3, 5, 64), seed=2).to(dtype), fmt, rounding, power_of_two=power_of_two)


@pytest.mark.slow
def test_fp8_given_scale_saturates_like_the_reference():
    x = wide((40, 64), seed=3)  # up to ~2^26: far past 448 at scale 1.5
    assert_both_paths_match(x, "fp8_e4m3", "nearest", scale=torch.tensor(1.5))
    q = quantize(x, "fp8_e4m3", scale=1.5, backend="inductor")
    assert (bits(q.data) & 0x7F == 0x7E).any() and ((bits(q.data) & 0x7F).clamp(1, 8) < 8).any()


@pytest.mark.slow
def test_fp8_power_of_two_scale_from_tiny_and_huge_amaxes():
    """The power of two is read from float32 bits: amaxes at binade edges, subnormal, and 2^127-ish."""
    for a in (1.75, 1.7500001, 3e-39, 1e-30, 2.0**100, 448.0, 0.0):
        x = torch.zeros(2, 32)
        x[1, 7] = a
        x[0, 3] = -a / 3
        assert_both_paths_match(x, "fp8_e4m3", "stochastic", power_of_two=True)


# ---------------- NVFP4 ----------------


def nvfp4_data(shape, seed: int) -> torch.Tensor:
    """Blocks of 16 along the last axis at scales 2^-26 .. 2^0 of the outlier (E4M3 block scales down to
    subnormal and zero), one all-zero block, -0s and one outlier 64 that sets the tensor amax."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    flat = x.view(-1, 16)
    flat *= torch.exp2(torch.randint(-26, 1, (flat.shape[0], 1), generator=g).float())
    flat[1] = 0.0
    flat[2, 3] = 64.0
    flat[3, :8] = -0.0
    return x


@pytest.mark.parametrize("rounding,axis,dtype", [
    ("stochastic", 0, torch.float32),  # blocks across rows: neighbours in a byte are two rows
    ("nearest", -1, torch.bfloat16),  # along rows: neighbours read as one 32-bit word
    SLOW("stochastic", -1, torch.float32),  # ... one 64-bit word
    SLOW("nearest", 0, torch.float32),
    SLOW("stochastic", -1, torch.float16),  # converted to float32 words
    SLOW("stochastic", 0, torch.bfloat16),
])
def test_nvfp4_along_either_axis(rounding, axis, dtype):
    x = nvfp4_data((48, 64), seed=4).to(dtype)
    assert_both_paths_match(x, "nvfp4", rounding, axis=axis)


def e2m1_table() -> torch.Tensor:
    """Every E2M1 grid value, midpoint (ties to even) and one float32 ulp either side of it, values
    past 6 and -0, with both signs, in blocks of 16 that each hold a 6: with the outlier 2688 in the
    last block, S = 1 and every other block's d is 1, so the elements reach the rounding unscaled."""
    grid = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1),
                      torch.tensor([6.5, 7.0, 100.0, 0.1, 1e-30])])
    vals = torch.cat([vals, -vals, torch.tensor([-0.0])])
    vals = torch.cat([vals, torch.zeros(-len(vals) % 15)]).view(-1, 15)
    blocks = torch.cat([torch.full((len(vals), 1), 6.0), vals], dim=1)
    outlier = torch.zeros(1, 16)
    outlier[0, 5] = 2688.0
    return torch.cat([blocks, outlier]).reshape(-1, 32)


@pytest.mark.parametrize("rounding", ["nearest", SLOW("stochastic")])  # SR NVFP4 stays in the default run below
def test_nvfp4_every_e2m1_point_midpoint_and_neighbour(rounding):
    x = e2m1_table()
    assert_both_paths_match(x, "nvfp4", rounding)
    q = quantize(x, "nvfp4", rounding=rounding, backend="inductor")
    nibbles = torch.cat([q.data & 0xF, q.data >> 4]).unique()
    assert nibbles.numel() == 16 and float(q.tensor_scale) == 1.0  # every code, unscaled


def test_nvfp4_words_from_an_odd_storage_offset():
    """A contiguous view that starts between two words (it is copied first) gives the same bits."""
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.cat([torch.ones(1), nvfp4_data((16, 32), seed=8).reshape(-1)]).to(dtype)
        x = base[1:].view(16, 32)
        assert x.storage_offset() == 1
        ref, got = both(quantize, x, "nvfp4", "stochastic")
        assert_same_qt(got, ref)


@pytest.mark.parametrize("axis", [-1, SLOW(0)])
def test_nvfp4_tiles(axis):
    """16 x 16 tiles (one scale per tile, stored per block), whichever axis the blocks run along; the
    data's block maxima differ within each tile."""
    assert_both_paths_match(nvfp4_data((32, 48), seed=5), "nvfp4", "nearest", axis=axis, tile=True)


@pytest.mark.slow
def test_nvfp4_fixed_and_off_tensor_scales_and_other_blocks():
    x = nvfp4_data((32, 48), seed=5)
    assert_both_paths_match(x, "nvfp4", "stochastic", tensor_scale="fixed", tensor_amax=3.0)
    assert_both_paths_match(x / 64, "nvfp4", "nearest", tensor_scale="off")
    assert_both_paths_match(nvfp4_data((16, 64), seed=7).to(torch.bfloat16), "nvfp4", "nearest", block_size=32)
    assert_both_paths_match(nvfp4_data((2, 32, 3), seed=6), "nvfp4", "stochastic", axis=1)
    z = torch.zeros(16, 32)
    assert_both_paths_match(z, "nvfp4", "nearest")  # amax 0: S = 1, every block scale 0


@pytest.mark.slow
def test_nvfp4_block_scales_at_e4m3_midpoints():
    """Block maxima whose (blockmax / 6) * S lands within a few float32 ulps of an E4M3 midpoint, where
    another operation order would round the block scale the other way."""
    from megatron_lowp.numerics import E4M3, round_to_format

    v = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().abs()
    v = torch.unique(v[torch.isfinite(v) & (v <= 448)])
    S = torch.tensor(2688 / 3.0)
    b0 = (v[1:] + v[:-1]) / 2 * 6 / S
    cand = torch.cat([b0 * (1 + k * torch.finfo(torch.float32).eps) for k in range(-6, 7)])
    bmax = cand[round_to_format((cand / 6.0) * S, E4M3) != round_to_format(cand * (S / 6.0), E4M3)]
    assert bmax.numel() > 10
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(bmax.numel(), 16, generator=g) * 2 - 1) * bmax[:, None]
    x[torch.arange(bmax.numel()), torch.randint(0, 16, (bmax.numel(),), generator=g)] = bmax
    ref, got = both(quantize, x, "nvfp4", "nearest", tensor_scale="fixed", tensor_amax=3.0)
    assert_same_qt(got, ref)


# ---------------- the SR stream, dispatch, errors ----------------


def test_sr_stream_continues_across_calls_and_backends():
    x1, x2 = nvfp4_data((4, 32), seed=1), nvfp4_data((2, 48), seed=2)
    for fmt in ("fp8_e4m3", "nvfp4"):
        g_ref, g_mix = SRGenerator(2**40 + 3, 17), SRGenerator(2**40 + 3, 17)
        r1 = quantize(x1, fmt, rounding="stochastic", generator=g_ref, backend="torch")
        r2 = quantize(x2, fmt, rounding="stochastic", generator=g_ref, backend="torch")
        assert_same_qt(quantize(x1, fmt, rounding="stochastic", generator=g_mix, backend="inductor"), r1)
        assert_same_qt(quantize(x2, fmt, rounding="stochastic", generator=g_mix, backend="torch"), r2)
        assert g_mix.state_dict() == g_ref.state_dict() == {"seed": 2**40 + 3, "offset": 17 + x1.numel() + x2.numel()}


def test_int32_hash_draws_the_reference_uniforms():
    """cpu_sr's int32 hash, eager and compiled, gives sr_random's uniforms bit for bit, every one (a
    quantized result hides most single-draw errors): counters whose low word wraps inside the draw,
    a high word past 2^31 once k1 is added, rows of 16 and a flat layout."""
    seed = 2**40 + 9
    compiled = torch.compile(cpu_sr.uniform, dynamic=True)
    for offset in (0, 2**32 - 5, 2**32 - 64, 2**33 + 7, 2**62 + 3):
        sr = torch.tensor(cpu_sr.sr_words(offset, *sr_random._keys(seed)), dtype=torch.int32)
        for outer, inner in (((6,), (16,)), ((), (7, 13))):
            ref = sr_random.uniform(seed, offset, outer + inner)
            idx = cpu_sr.counters(outer, inner, torch.device("cpu"))
            for fn in (cpu_sr.uniform, compiled):
                assert torch.equal(bits(fn(sr, idx)), bits(ref)), (offset, outer, inner)


@pytest.mark.parametrize("offset", [0, 2**32 - 5, 2**33 + 7, 2**62 + 3])
def test_sr_counters_at_word_boundaries(offset):
    """The counter's low word wrapping inside a call, a high word past 2^31 after adding k1, and both
    FP8 layouts (rows of 16, and a size 16 does not divide: one flat row)."""
    for x, fmt in ((wide((8, 16), seed=12), "fp8_e5m2"), (wide((7, 13), seed=13), "fp8_e5m2"),
                   (nvfp4_data((4, 32), seed=14), "nvfp4")):
        ref, got = both(quantize, x, fmt, "stochastic", gen_state=(2**40 + 9, offset))
        assert_same_qt(got, ref)


def test_auto_uses_inductor_for_large_cpu_tensors_only(monkeypatch):
    calls = []
    real = fused_cpu._run
    monkeypatch.setattr(fused_cpu, "_run", lambda *a: calls.append(a[0].__name__) or real(*a))
    small = torch.randn(16, 32)
    large = torch.randn(cpu_compile.COMPILE_MIN_NUMEL // 64, 64)
    fake_quantize(small, "nvfp4")
    assert calls == []
    fake_quantize(large, "nvfp4")
    quantize(large, "fp8_e4m3")
    assert calls == ["_nvfp4_graph", "_fp8_graph"]
    for fmt, opts in [("fp8_e4m3", {"scaling": "channel"}), ("nvfp4", {"scale_rounding": "encode"}), ("mxfp4", {})]:
        quantize(large, fmt, **opts)  # not covered: the reference serves them
        with pytest.raises(UserError, match=f"backend='inductor' cannot run this {fmt} call"):
            quantize(large, fmt, backend="inductor", **opts)
    assert calls == ["_nvfp4_graph", "_fp8_graph"]
    monkeypatch.setenv("MEGATRON_LOWP_CPU_COMPILE", "0")
    fake_quantize(large, "nvfp4")
    assert calls == ["_nvfp4_graph", "_fp8_graph"]
    with pytest.raises(UserError, match="MEGATRON_LOWP_CPU_COMPILE=0"):
        fake_quantize(large, "nvfp4", backend="inductor")


def test_nan_and_inf_raise_without_consuming_the_stream():
    for bad in (float("nan"), float("inf")):
        x = torch.ones(4, 32)
        x[2, 5] = bad
        for fmt in ("fp8_e5m2", "nvfp4"):
            g = SRGenerator(1)
            with pytest.raises(UserError, match="NaN or Inf"):
                fake_quantize(x, fmt, rounding="stochastic", generator=g, backend="inductor")
            assert g.offset == 0
    with pytest.raises(UserError, match="block size 16 does not divide dimension 0"):
        quantize(torch.randn(24, 32), "nvfp4", axis=0, backend="inductor")
    with pytest.raises(UserError, match="tile=True needs the other dimension"):
        quantize(torch.randn(8, 32), "nvfp4", tile=True, backend="inductor")


def test_fp8_codes_are_torch_float8_bytes():
    x = wide((8, 64), seed=9)
    q = quantize(x, "fp8_e5m2", scale=2.0**-8, backend="inductor")
    assert q.data.dtype == TORCH_DTYPES["e5m2"]
    assert torch.equal(q.dequantize(), fake_quantize(x, "fp8_e5m2", scale=2.0**-8, backend="inductor"))


# ---------------- dequantize ----------------


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, NaNs anywhere in the same places (their payloads are not compared)."""
    nan = torch.isnan(a)
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(nan, torch.isnan(b)) and torch.equal(
        bits(a[~nan]), bits(b[~nan]))


# float32 scales whose reciprocals 1 + 2^-8 and 1 + 3 * 2^-8 put powers of two on bfloat16 ties (even, odd below)
BF16_TIE_SCALES = {0.9961089491844177: 1 + 2**-8, 0.9884169697761536: 1 + 3 * 2**-8}


@pytest.mark.parametrize("dtype,out", [(torch.float8_e4m3fn, torch.float32), (torch.float8_e4m3fn, torch.bfloat16),
                                       SLOW(torch.float8_e5m2, torch.float32), (torch.float8_e5m2, torch.bfloat16)])
def test_fp8_dequantize_every_code(dtype, out):
    """All 256 bytes (NaN, inf, subnormals and -0 included) under a power-of-two and an odd scale, and to
    bfloat16 (four outputs per word, rounded in bits) under scales that make ties, subnormals and inf."""
    from megatron_lowp.numerics import QuantizedTensor

    data = torch.arange(256, dtype=torch.uint8).view(dtype).reshape(16, 16)
    fmt = "fp8_e4m3" if dtype == torch.float8_e4m3fn else "fp8_e5m2"
    assert all((torch.tensor(1.0) / torch.tensor(t)).item() == w for t, w in BF16_TIE_SCALES.items())
    scales = (0.5, 3.7) + ((*BF16_TIE_SCALES, 1e-30, 1e30) if out == torch.bfloat16 else ())
    for scale in scales:
        qt = QuantizedTensor(fmt, data, torch.tensor(scale), None, data.shape, 1, torch.float32, {})
        ref, got = qt.dequantize(out, backend="torch"), qt.dequantize(out, backend="inductor")
        assert same_values(got, ref) and torch.isnan(ref).any(), scale


@pytest.mark.parametrize("fmt,axis", [SLOW("fp8_e5m2", 0), ("nvfp4", 0), SLOW("nvfp4", -1)])
def test_dequantize_of_quantized_data_in_bf16(fmt, axis):
    """What backward restores: packed x_t / w_t back in the compute dtype, blocks along either axis."""
    x = nvfp4_data((48, 64), seed=11) if fmt == "nvfp4" else wide((48, 64), seed=11)
    qt = quantize(x, fmt, axis=axis, backend="torch")
    ref, got = qt.dequantize(torch.bfloat16, backend="torch"), qt.dequantize(torch.bfloat16, backend="inductor")
    assert same_values(got, ref)
    x3 = nvfp4_data((2, 32, 3), seed=12)  # a middle block axis: pre and post both > 1
    qt = quantize(x3, "nvfp4", axis=1, backend="torch")
    assert same_values(qt.dequantize(torch.bfloat16, backend="inductor"), qt.dequantize(torch.bfloat16, backend="torch"))


@pytest.mark.parametrize("axis,dtype", [(-1, torch.float32), (-1, torch.bfloat16), (0, torch.float32),
                                         (0, torch.bfloat16), SLOW(-1, torch.float16)])
def test_nvfp4_dequantize_every_byte_and_scale(axis, dtype):
    """Every packed byte (two E2M1 codes) under every E4M3 block scale byte (NaN 0x7F included), with
    tensor scales that make the outputs subnormal, huge or overflow, or put powers of two exactly half
    way between two bfloat16 values (ties to even, down and up), through the pairs graph
    (blocks along the last axis: two outputs per word) and the transposing graph (axis 0)."""
    from megatron_lowp.numerics import QuantizedTensor

    data = torch.arange(256, dtype=torch.uint8).reshape(32, 8).repeat(128, 1)  # 32 blocks of 8 bytes per scale
    scale = torch.arange(128, dtype=torch.uint8).repeat_interleave(32).reshape(4096, 1).view(torch.float8_e4m3fn)
    shape = torch.Size((4096, 16)) if axis == -1 else torch.Size((16, 4096))
    for ts in (1.0, 2688 / 3.7, *BF16_TIE_SCALES, 1e30, 1e-30, 3.3e-38):
        qt = QuantizedTensor("nvfp4", data, scale, torch.tensor(ts), shape, axis % 2, torch.float32,
                             {"block_size": 16, "scale_rounding": "decode"})
        ref, got = qt.dequantize(dtype, backend="torch"), qt.dequantize(dtype, backend="inductor")
        assert same_values(got, ref) and torch.isnan(ref).any(), ts


def test_nvfp4_dequantize_of_fused_layout():
    """The fused quantize along axis 0 stores its codes as a transposed view (the layout the dequantize
    graph reads); dequantized, they equal the reference's, in both compute dtypes."""
    x = nvfp4_data((64, 48), seed=13)
    qt = quantize(x, "nvfp4", axis=0, backend="inductor")
    assert not qt.data.is_contiguous()
    for dtype in (torch.float32, torch.bfloat16):
        assert same_values(qt.dequantize(dtype, backend="inductor"), qt.dequantize(dtype, backend="torch"))


def test_dequantize_backend_choice():
    big = quantize(torch.randn(cpu_compile.COMPILE_MIN_NUMEL // 64, 64), "nvfp4")
    assert fused_dispatch.dequantize_backend(big, "auto") == "inductor"
    small = quantize(torch.randn(16, 32), "nvfp4")
    assert fused_dispatch.dequantize_backend(small, "auto") == "torch"
    e5m2 = quantize(torch.randn(cpu_compile.COMPILE_MIN_NUMEL // 64, 64), "fp8_e5m2")
    assert fused_dispatch.dequantize_backend(e5m2, "auto") == "torch"  # torch's E5M2 cast is the faster
    assert fused_dispatch.dequantize_backend(e5m2, "auto", torch.bfloat16) == "inductor"  # not to bfloat16
    assert fused_dispatch.dequantize_backend(e5m2, "inductor") == "inductor"
    channel = quantize(torch.randn(16, 32), "fp8_e4m3", scaling="channel")
    with pytest.raises(UserError, match="cannot dequantize this fp8_e4m3 tensor: only a per-tensor"):
        channel.dequantize(backend="inductor")
    with pytest.raises(UserError, match="backend: 'cuda' is not one of"):
        big.dequantize(backend="cuda")
