"""Element formats as float32 bit arithmetic, in plain torch ops that inductor fuses into one loop.

A float32 is sign (bit 31) | biased exponent E (bits 30..23, bias 127) | mantissa (bits 22..0): a
normal value is 2^(E - 127) * (1 + mantissa / 2^23). A small element format with m mantissa bits and
bias b (formats.py) is the same layout shrunk, so its grid and codes are read from float32 bits
without frexp, ldexp, logarithms or a lookup table:

* grid: a magnitude a in the binade of E has the format's spacing ulp = 2^(max(E - 127, min_exp) - m)
  (below the smallest normal the spacing stays that of min_exp: subnormals); ulp and 1 / ulp are
  powers of two built by writing an exponent field, so a / ulp = a * (1 / ulp) is exact, and rounding
  a / ulp to an integer (nearest-even, or up with probability frac for stochastic rounding) and
  multiplying back gives round_to_format's bits;
* code of a normal grid value: E - 127 + b in the exponent field and the top m mantissa bits, which is
  float32 bits >> (23 - m) minus (127 - b) << m; a subnormal's code is value / min subnormal; for
  round-to-nearest the code is also read without the grid value, rounding the bits as integers;
* decode: the same fields written back into float32 bits (normals) or code * min subnormal.

Sign bits are copied as bits (copysign would call a library function per vector). The torch
reference (rounding.py, packing.py, the format classes) is the oracle; tests/test_numerics_fused.py
compares the compiled graphs built from these with it bit for bit.
"""

from __future__ import annotations

import functools
import math

import torch

from megatron_lowp.numerics.formats import FloatFormat

F32_MAX = torch.finfo(torch.float32).max
SIGN32 = -(1 << 31)  # the float32 sign bit as an int32


@functools.cache
def consts(fmt: FloatFormat) -> tuple:
    """(max, min exponent, mantissa bits, bias, min normal, 1 / min subnormal): plain numbers to close over."""
    return fmt.max_value, fmt.min_exponent, fmt.man_bits, fmt.bias, fmt.min_normal, 1.0 / fmt.min_subnormal


def grid_magnitude(a: torch.Tensor, c: tuple, u: torch.Tensor | None) -> torch.Tensor:
    """round_to_format(a) for float32 a >= 0 (sign bit clear, NaN included) under format constants c
    (saturating; nearest-even, or stochastic with uniforms u)."""
    maxv, min_exp, man = c[0], c[1], c[2]
    a = torch.clamp(a, max=maxv)
    eb = torch.clamp(a.view(torch.int32) >> 23, min=min_exp + 127)  # biased exponent, the format's at least
    ulp = ((eb - man) << 23).view(torch.float32)
    scaled = a * ((254 + man - eb) << 23).view(torch.float32)  # exact: a / ulp
    if u is None:
        return torch.round(scaled) * ulp
    low = torch.floor(scaled)
    return torch.where(u < scaled - low, low + 1, low) * ulp


def code(v: torch.Tensor, c: tuple) -> torch.Tensor:
    """The unsigned code (int32) of grid magnitudes v >= 0: for normals the float32 exponent and top
    mantissa bits, rebiased by one subtraction; subnormals are v / min subnormal."""
    man, bias, min_normal, inv_min_sub = c[2], c[3], c[4], c[5]
    normal = (v.view(torch.int32) >> (23 - man)) - ((127 - bias) << man)
    return torch.where(v >= min_normal, normal, (v * inv_min_sub).to(torch.int32))


def code_nearest(a: torch.Tensor, c: tuple) -> torch.Tensor:
    """code(grid_magnitude(a, c, None)) for float32 a >= 0, rounded in the integer domain: for normals,
    adding half an ulp less one, plus the lowest kept bit (ties to even), to the float32 bits and
    shifting the cut bits out (a carry moves into the exponent, as it should); subnormals round
    a / min subnormal. About half the instructions of rounding on the grid, then coding."""
    maxv, man, bias, min_normal, inv_min_sub = c[0], c[2], c[3], c[4], c[5]
    a = torch.clamp(a, max=maxv)  # max is on the grid: nothing rounds past it
    bits, cut = a.view(torch.int32), 23 - man
    normal = ((bits + ((1 << (cut - 1)) - 1) + ((bits >> cut) & 1)) >> cut) - ((127 - bias) << man)
    return torch.where(a >= min_normal, normal, torch.round(a * inv_min_sub).to(torch.int32))


def decode(codes: torch.Tensor, c: tuple, mag_mask: int, special: int | None) -> torch.Tensor:
    """Float32 values of sign-magnitude codes (int32, sign bit just above mag_mask): the exponent and
    mantissa fields placed in float32 bits (normals) or m * min subnormal (subnormals), both exact.
    Magnitude codes >= special (E4M3FN's 0x7F, E5M2's exponent 31) decode as torch's float8 casts
    do: NaN, or inf for E5M2's zero mantissa; None: the format has none."""
    man, bias, inv_min_sub = c[2], c[3], c[5]
    mag = codes & mag_mask
    e, m = mag >> man, mag & ((1 << man) - 1)
    normal = (((e - bias + 127) << 23) | (m << (23 - man))).view(torch.float32)
    v = torch.where(e > 0, normal, m.to(torch.float32) * (1.0 / inv_min_sub))
    if special is not None:
        odd = torch.where(m == 0, torch.full_like(v, math.inf), torch.full_like(v, math.nan))
        v = torch.where(mag >= special, odd, v)
    return torch.where((codes & (mag_mask + 1)) != 0, -v, v)


def with_sign(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """copysign(v, y) for v with a clear sign bit, as an OR of bits (inductor calls a library function
    for copysign, and the call spills every vector register on each iteration)."""
    return (v.view(torch.int32) | (y.view(torch.int32) & SIGN32)).view(torch.float32)


def bfloat16_bits(v: torch.Tensor) -> torch.Tensor:
    """float32 v rounded to bfloat16 (nearest-even, as torch's cast), the result in the top 16 bits of an
    int32 (the low 16 are garbage): a carry out of the kept bits moves into the exponent, up to inf.
    NaN becomes torch's scalar quiet NaN 0x7FC0. Converting inside a graph and viewing the bfloat16 as
    int16 compiles to a scalar loop (measured 6x slower than this at 4096 x 704)."""
    bits = v.view(torch.int32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return torch.where(v != v, torch.full_like(bits, 0x7FC00000), rounded)


def to_uint8(values: torch.Tensor) -> torch.Tensor:
    """int32 values in [0, 255] as uint8, through float32 (exact): ATen's AVX2 vectors convert float
    to uint8 in a few instructions but int32 to uint8 one element at a time."""
    return values.to(torch.float32).to(torch.uint8)


def scale_from_amax(a: torch.Tensor, fmt_max: float, power_of_two: bool) -> torch.Tensor:
    """scaling.scale_from_amax for a 0-d float32 amax, the power of two read from the float32 bits."""
    if power_of_two:
        # the reference: k = e_max - e_a - (m_a > m_max) with frexp exponents and mantissas; for a normal
        # float32, frexp's exponent is its biased field - 126 and mantissas compare as their 23 bits
        m_max, e_max = math.frexp(fmt_max)
        max_mantissa = int((2 * m_max - 1) * 2**23)
        bits = a.view(torch.int32)
        field = (bits >> 23) & 0xFF
        k = e_max - (field - 126) - ((bits & 0x7FFFFF) > max_mantissa).to(torch.int32)
        s = ((torch.clamp(k, -126, 127) + 127) << 23).view(torch.float32)
        s = torch.where(field > 0, s, torch.full_like(s, 2.0**127))  # a subnormal amax: k > 127, clamped
    else:
        s = torch.clamp(fmt_max / a, max=F32_MAX)
    return torch.where(a > 0, s, torch.ones_like(s))
