"""Rounding float32 values onto the grid of a FloatFormat: nearest-even or stochastic, saturating.

Within a binade [2^e, 2^(e+1)) the grid spacing is ulp = 2^(e - man_bits); below the smallest normal
2^(1 - bias) the spacing stays 2^(1 - bias - man_bits) (subnormals), so one formula covers both and
subnormals are exact. Magnitudes are first clamped to max_value, so both modes SATURATE to +-max.
torch's own float8 casts do not promise that: ``x.to(torch.float8_e5m2)`` overflows to inf, and the
e4m3fn cast's overflow result (NaN or 448) depends on the backend; these functions always saturate.

* nearest: ``torch.round`` of |x|/ulp, i.e. ties to even (the IEEE default, what torch casts do).
* stochastic: with lo, hi the grid neighbours around |x|, return hi with probability (|x| - lo)/ulp,
  else lo; so E[q] = x for |x| <= max. The uniforms come from the caller (see sr_random) so the draw
  is reproducible; u in [0, 1) with 24-bit resolution, and we round up when u < frac.
The sign is reattached with copysign, so -0.0 and small negatives that round to zero give -0.0, like torch.
"""

from __future__ import annotations

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics.cpu_compile import cpu_compiled
from megatron_lowp.numerics.formats import FloatFormat

ROUNDING_MODES = ("nearest", "stochastic")


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDING_MODES:
        raise UserError(f"rounding: {rounding!r} is not one of {', '.join(ROUNDING_MODES)}")
    return rounding


def grid_ulp(a: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """Grid spacing of fmt at non-negative float32 magnitudes a (exact powers of two)."""
    _, e = torch.frexp(a)  # a = m * 2^e with m in [0.5, 1), so floor(log2 a) = e - 1
    e = torch.clamp(e.to(torch.int32) - 1, min=fmt.min_exponent)
    return torch.ldexp(torch.ones_like(a), e - fmt.man_bits)


def round_to_format(
    x: torch.Tensor, fmt: FloatFormat, rounding: str = "nearest", u: torch.Tensor | None = None
) -> torch.Tensor:
    """Round float32 x onto fmt's grid (saturating); stochastic rounding needs uniforms u shaped like x."""
    check_rounding(rounding)
    if x.dtype != torch.float32:
        raise TypeError(f"round_to_format expects float32, got {x.dtype}")
    if rounding == "stochastic" and (u is None or u.shape != x.shape):
        raise ValueError("stochastic rounding needs uniforms u with the shape of x")
    return _round(x, fmt, rounding, u, numel=x.numel(), on_cpu=x.device.type == "cpu")


@cpu_compiled
def _round(x: torch.Tensor, fmt: FloatFormat, rounding: str, u: torch.Tensor | None) -> torch.Tensor:
    a = torch.clamp(x.abs(), max=fmt.max_value)
    ulp = grid_ulp(a, fmt)
    scaled = a / ulp  # exact: division by a power of two, result < 2^(man_bits + 1)
    if rounding == "nearest":
        q = torch.round(scaled)
    else:
        low = torch.floor(scaled)
        q = low + (u < (scaled - low)).to(torch.float32)
    return torch.copysign(q * ulp, x)
