"""Stochastic rounding and its counter-based RNG: unbiased, two-valued, reproducible, resumable."""

import pytest
import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import E2M1, E4M3, E5M2, SRGenerator, fake_quantize, round_to_format
from megatron_lowp.numerics.sr_random import fmix32, uniform


def test_fmix32_known_values():
    # MurmurHash3 fmix32 reference values (computed with plain Python ints, masked to 32 bits)
    def ref(h):
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & 0xFFFFFFFF
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & 0xFFFFFFFF
        return h ^ (h >> 16)

    xs = [0, 1, 2, 0xDEADBEEF, 0xFFFFFFFF, 12345678]
    assert fmix32(torch.tensor(xs)).tolist() == [ref(x) for x in xs]
    assert ref(1) == 0x514E28B7  # the published fmix32(1)


def test_uniform_is_a_pure_function_of_seed_offset_index():
    big = uniform(7, 100, (1000,))
    parts = torch.cat([uniform(7, 100, (300,)), uniform(7, 400, (700,))])
    assert torch.equal(big, parts)
    g = SRGenerator(7, offset=100)
    chunks = torch.cat([g.uniform((10, 30)).flatten(), g.uniform((700,))])
    assert torch.equal(chunks, big) and g.offset == 1100
    assert (big >= 0).all() and (big < 1).all()
    assert not torch.equal(uniform(8, 100, (1000,)), big)  # another seed, another stream
    # offsets beyond 2^32 still give fresh numbers (the high counter word is hashed in)
    assert not torch.equal(uniform(7, 2**32 + 100, (1000,)), big)


def test_uniform_statistics():
    u = uniform(0, 0, (1_000_000,))
    assert abs(u.mean().item() - 0.5) < 5 * (1 / 12) ** 0.5 / 1000
    counts = torch.histc(u, bins=16, min=0, max=1)
    assert ((counts - 62_500).abs() < 5 * 62_500**0.5).all()
    assert (torch.unique(u).numel()) > 960_000  # 24-bit resolution, few collisions


def test_generator_state_dict_resumes_identical_stream():
    g = SRGenerator(seed=3)
    g.uniform((123,))
    state = g.state_dict()
    after = g.uniform((50,))
    h = SRGenerator(seed=99)
    h.load_state_dict(state)
    assert torch.equal(h.uniform((50,)), after)
    with pytest.raises(UserError, match="seed"):
        SRGenerator(seed=-1)
    with pytest.raises(UserError, match="keys"):
        h.load_state_dict({"seed": 1})


@pytest.mark.parametrize("fmt", [E2M1, E4M3, E5M2])
def test_sr_is_unbiased_and_only_returns_neighbours(fmt):
    # x values strictly between grid points across several binades, incl. subnormals
    base = torch.tensor(
        [fmt.min_subnormal * 0.3, fmt.min_normal * 0.77, 1.3, fmt.max_value * 0.61, fmt.max_value * 0.97]
    )
    x = torch.cat([base, -base])
    n = 20_000
    xs = x.repeat(n, 1)  # n independent draws per value (distinct counters)
    q = round_to_format(xs, fmt, "stochastic", uniform(11, 0, xs.shape))
    for j in range(x.numel()):
        vals = torch.unique(q[:, j])
        assert vals.numel() == 2, (fmt.name, x[j].item(), vals)
        a, b = vals.tolist()
        assert a < x[j].item() < b
        # neighbours are adjacent: rounding the midpoint region gives only these two values
        assert round_to_format(torch.tensor([a, b]), fmt).tolist() == [a, b]
        p = (abs(x[j].item()) - min(abs(a), abs(b))) / (b - a)
        se = (b - a) * (p * (1 - p) / n) ** 0.5
        assert abs(q[:, j].double().mean().item() - x[j].item()) < 5 * se


def test_sr_saturates_beyond_max_and_keeps_grid_points():
    u = uniform(0, 0, (4,))
    assert round_to_format(torch.tensor([7.0, -100.0, 3.0, 0.5]), E2M1, "stochastic", u).tolist() == [
        6.0,
        -6.0,
        3.0,
        0.5,
    ]


def test_fake_quantize_sr_reproducible_across_calls_and_axes():
    x = torch.randn(32, 64)
    a = fake_quantize(x, "nvfp4", rounding="stochastic", generator=SRGenerator(5))
    b = fake_quantize(x, "nvfp4", rounding="stochastic", generator=SRGenerator(5))
    c = fake_quantize(x, "nvfp4", rounding="stochastic", generator=SRGenerator(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = SRGenerator(9)
    r = fake_quantize(x, "mxfp4", rounding="stochastic", generator=g)
    assert g.offset == x.numel()
    r2 = fake_quantize(x, "mxfp4", rounding="stochastic", generator=SRGenerator(9, offset=0))
    assert torch.equal(r, r2)


def test_default_generator_advances():
    x = torch.full((64,), 0.3)
    a = fake_quantize(x, "fp8_e5m2", rounding="stochastic", scale=1.0)
    b = fake_quantize(x, "fp8_e5m2", rounding="stochastic", scale=1.0)
    assert not torch.equal(a, b)  # the process default (seed 0) moved on


@pytest.mark.filterwarnings("error:torch.compile of")  # a silent eager fallback would prove nothing
def test_cpu_compiled_hash_and_rounding_give_the_eager_bits():
    """numerics/cpu_compile.py: the inductor-fused CPU path must not change a single bit."""
    from megatron_lowp.numerics import cpu_compile, rounding, sr_random
    from megatron_lowp.numerics.formats import E4M3, E5M2

    n = cpu_compile.COMPILE_MIN_NUMEL * 2 + 5
    for seed, offset in ((3, 0), (2**40 + 17, 2**32 - 1000)):  # the counter crosses 2^32 in the second
        k0, k1 = sr_random._keys(seed)
        eager = sr_random._uniform_flat(k0, k1, offset, n, None)
        assert torch.equal(uniform(seed, offset, (n,)), eager)
    x = torch.randn(n) * torch.logspace(-12, 6, n)
    u = uniform(5, 0, (n,))
    for fmt in (E4M3, E5M2):
        for mode in ("nearest", "stochastic"):
            fast = rounding.round_to_format(x, fmt, mode, u)
            assert torch.equal(fast, rounding._round.eager(x, fmt, mode, u))
