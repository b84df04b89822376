"""QuantSpec: how one GEMM operand is quantized; GemmSpecs: one spec per role of a linear layer.

Every linear runs three GEMMs, and each operand has a role (DESIGN.md, "GEMM roles"):

    fprop  Y  = X W^T     roles x, w        contraction over in_features  (axis -1 of X and of W)
    dgrad  dX = dY W      roles dy, w_t     contraction over out_features (axis -1 of dY, axis 0 of W)
    wgrad  dW = dY^T X    roles dy_t, x_t   contraction over tokens       (axis 0 of dY and of X)

Block scales run along the contraction dimension of the GEMM that consumes the operand, so `x` and
`x_t` are quantized along different axes. A role whose spec is None stays in high precision.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from megatron_lowp.numerics import FORMATS, NumberFormat, QuantizedTensor, SRGenerator, fake_quantize, quantize

ROLES = ("x", "w", "dy", "w_t", "dy_t", "x_t")

# The axis of the 2-D operand (tokens x features, or out x in for weights) that each role blocks along.
ROLE_AXIS = {"x": -1, "w": -1, "dy": -1, "w_t": 0, "dy_t": 0, "x_t": 0}


@dataclass(frozen=True)
class QuantSpec:
    fmt: str  # a numerics format name: fp8_e4m3, fp8_e5m2, nvfp4, mxfp4, mxfp8
    rounding: str = "nearest"  # nearest | stochastic
    options: tuple[tuple[str, Any], ...] = ()  # format options (numerics.FORMATS[fmt].options)
    # FP8 per-tensor only: > 0 scales from the max amax of the last N optimizer steps (delayed
    # scaling, precision/delayed.py); 0 scales from the tensor's own amax (current scaling).
    amax_history: int = 0

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"unknown format {self.fmt!r}; allowed: {', '.join(FORMATS)}")
        if self.amax_history and not self.format.per_tensor_fp8(self.kwargs()):
            raise ValueError(f"delayed scaling (amax_history) needs per-tensor FP8, not {self.fmt} {self.kwargs()}")

    @property
    def format(self) -> NumberFormat:
        return FORMATS[self.fmt]

    def kwargs(self) -> dict[str, Any]:
        return dict(self.options)

    def fake_quantize(self, t: torch.Tensor, axis: int, generator: SRGenerator, **extra: Any) -> torch.Tensor:
        return fake_quantize(t, self.fmt, rounding=self.rounding, axis=axis, generator=generator,
                             **self.kwargs(), **extra)

    def quantize(self, t: torch.Tensor, axis: int, generator: SRGenerator, **extra: Any) -> QuantizedTensor:
        return quantize(t, self.fmt, rounding=self.rounding, axis=axis, generator=generator, **self.kwargs(), **extra)


@dataclass(frozen=True)
class GemmSpecs:
    """One QuantSpec (or None: high precision) per role."""

    x: QuantSpec | None = None
    w: QuantSpec | None = None
    dy: QuantSpec | None = None
    w_t: QuantSpec | None = None
    dy_t: QuantSpec | None = None
    x_t: QuantSpec | None = None

    def forward_only(self) -> GemmSpecs:
        """These specs with every backward role (dgrad and wgrad operands) in high precision."""
        return GemmSpecs(x=self.x, w=self.w)

    @property
    def quantizes_anything(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))


__all__ = ["ROLES", "ROLE_AXIS", "GemmSpecs", "QuantSpec"]
