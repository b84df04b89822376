"""Element formats: small binary floats described by (exp_bits, man_bits, bias, max_value).

A value is (-1)^s * 2^(e - bias) * (1 + m / 2^man_bits) for a biased exponent e >= 1, and
(-1)^s * 2^(1 - bias) * (m / 2^man_bits) for e == 0 (subnormals). ``max_value`` is the largest
finite magnitude; codes above it (inf/NaN, or unused) are never produced: our rounding saturates.

| name        | bits  | bias | max    | min normal | min subnormal | specials          |
|-------------|-------|------|--------|------------|---------------|-------------------|
| e4m3 (OCP)  | 1-4-3 | 7    | 448    | 2^-6       | 2^-9          | NaN only (e4m3fn) |
| e4m3_gaudi2 | 1-4-3 | 7    | 240    | 2^-6       | 2^-9          | IEEE-like inf/NaN |
| e5m2        | 1-5-2 | 15   | 57344  | 2^-14      | 2^-16         | inf/NaN           |
| e2m1 (FP4)  | 1-2-1 | 1    | 6      | 1          | 0.5           | none              |

E2M1's grid is +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}. E8M0 is a scale-only format: 8 exponent bits,
no sign, no mantissa; code c means 2^(c - 127) for c in 0..254 (255 is NaN and never produced).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatron_lowp.errors import UserError


@dataclass(frozen=True)
class FloatFormat:
    """A sign-magnitude binary float with subnormals and a saturating max."""

    name: str
    exp_bits: int
    man_bits: int
    bias: int
    max_value: float

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal; subnormals share its spacing."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest binade (floor(log2(max_value)))."""
        return math.floor(math.log2(self.max_value))

    @property
    def min_normal(self) -> float:
        return 2.0**self.min_exponent

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.man_bits)


E4M3 = FloatFormat("e4m3", exp_bits=4, man_bits=3, bias=7, max_value=448.0)
E4M3_GAUDI2 = FloatFormat("e4m3_gaudi2", exp_bits=4, man_bits=3, bias=7, max_value=240.0)
E5M2 = FloatFormat("e5m2", exp_bits=5, man_bits=2, bias=15, max_value=57344.0)
E2M1 = FloatFormat("e2m1", exp_bits=2, man_bits=1, bias=1, max_value=6.0)

# E4M3 flavours a user can pick; Gaudi2's E4M3 stops at 240 (docs/papers.md §1.2).
E4M3_FLAVOURS: dict[str, FloatFormat] = {"ocp": E4M3, "gaudi2": E4M3_GAUDI2}

# Where a format's values are stored losslessly in torch (the Gaudi2 grid is a subset of e4m3fn's).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "e4m3": torch.float8_e4m3fn,
    "e4m3_gaudi2": torch.float8_e4m3fn,
    "e5m2": torch.float8_e5m2,
}

E8M0_BIAS = 127
E8M0_MIN_EXP = -127
E8M0_MAX_EXP = 127


def e4m3_flavour(flavour: str) -> FloatFormat:
    if flavour not in E4M3_FLAVOURS:
        raise UserError(f"flavour: {flavour!r} is not one of {', '.join(E4M3_FLAVOURS)}")
    return E4M3_FLAVOURS[flavour]


def e8m0_encode(exponent: torch.Tensor) -> torch.Tensor:
    """Integer exponents in [-127, 127] -> uint8 E8M0 codes (biased by 127)."""
    return (exponent.to(torch.int32) + E8M0_BIAS).to(torch.uint8)


def e8m0_decode(code: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> float32 powers of two (2^-127 is a float32 subnormal, still exact)."""
    # exp2 in float64 is exact for integers; the cast to float32 is exact down to 2^-149.
    return torch.exp2(code.to(torch.float64) - E8M0_BIAS).to(torch.float32)
