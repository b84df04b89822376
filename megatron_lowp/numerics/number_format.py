"""What every number format object answers, and the QuantizedTensor they all return.

A format (one object per name in format_table.FORMATS) is a scaled low-precision encoding:

    x_hat = decode(q, scales),   q = round(x * encode scale) on an element grid (formats.py)

and the families differ only in where the scales live: one FP32 scale per tensor or channel (FP8),
one E4M3 scale per block of 16 under an FP32 tensor scale (NVFP4), one power-of-two E8M0 scale per
block of 32 (MX). A family's class knows its element format, block size, scale format and options;
how it quantizes and dequantizes (the torch reference, float32 math, every device); the largest
magnitude its stored scales can hold (``max_codes``) and the largest any scale of the recipe could
hold (``range_top``), which stats.py turns into clipping and overflow counts; whether it is
per-tensor FP8 (what ``torch._scaled_mm`` and delayed scaling need); whether quantizing along either
axis gives the same values (so one quantization can serve two GEMMs); and which fused backends
("triton": CUDA kernels; "inductor": torch.compile on the CPU) reproduce its bits.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics.formats import FloatFormat
from megatron_lowp.numerics.scaling import amax
from megatron_lowp.numerics.sr_random import SRGenerator, default_generator

COMMON_OPTIONS = ("check_finite",)
FUSED_BACKENDS = ("triton", "inductor")


@dataclass
class QuantizedTensor:
    """Low-precision storage of a tensor.

    data: fp8 -> torch.float8 tensor in x's shape; nvfp4/mxfp4 -> uint8, two E2M1 codes per byte, laid
      out (..., n / 2) with ``axis`` moved last; mxfp8 -> float8_e4m3fn (..., n) with axis moved last.
    scale: fp8 -> float32 multiplicative scale (scalar, or size 1 along axis for channel scaling);
      nvfp4 -> float8_e4m3fn per block (..., n / block_size) (decode scale d, or encode multiplier m);
      mx -> uint8 E8M0 biased exponents per block.
    tensor_scale: nvfp4 -> float32 scalar (S for scale_rounding="decode", t for "encode"); else None.
    """

    fmt: str
    data: torch.Tensor
    scale: torch.Tensor
    tensor_scale: torch.Tensor | None
    shape: torch.Size
    axis: int
    dtype: torch.dtype
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def format(self) -> NumberFormat:
        from megatron_lowp.numerics.format_table import format_named  # the table imports this module

        return format_named(self.fmt)

    def dequantize(self, dtype: torch.dtype = torch.float32, backend: str = "auto") -> torch.Tensor:
        """The values in `dtype`; backend "torch" (the reference), "inductor" (one compiled pass on the
        CPU, fused_cpu.py), or "auto": inductor where it covers this tensor and it is large enough."""
        from megatron_lowp.numerics import fused_dispatch  # it imports this module

        if fused_dispatch.dequantize_backend(self, backend, dtype) == "inductor":
            return fused_dispatch.dequantize(self, dtype)
        return self.format.dequantize(self, dtype)


class NumberFormat:
    """One named number format; subclasses implement a family (see the module docstring)."""

    def __init__(self, name: str, element: str, block_size: int | None, scale_format: str,
                 options: tuple[str, ...]) -> None:
        self.name = name
        self.element = element  # element format name (formats.py)
        self.block_size = block_size  # elements per scale; None = one scale per tensor or channel
        self.scale_format = scale_format  # how scales are stored: fp32, e4m3, e8m0
        self.options = (*options, *COMMON_OPTIONS)  # keyword options quantize() accepts

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, element={self.element!r}, block_size={self.block_size}, "
                f"scale_format={self.scale_format!r})")

    # ---- what it is ----

    def check_options(self, options: Mapping[str, Any]) -> None:
        """UserError naming the first unknown option or bad value (shape-independent checks only)."""
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            raise UserError(f"{self.name}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(self.options)}")
        self.check_values(options)

    def check_values(self, options: Mapping[str, Any]) -> None:
        """The family's option values (subclasses)."""

    def element_format(self, options: Mapping[str, Any]) -> FloatFormat:
        raise NotImplementedError

    def per_tensor_fp8(self, options: Mapping[str, Any]) -> bool:
        """One FP32 scale for the whole tensor and FP8 elements: torch._scaled_mm and delayed scaling apply."""
        return False

    def same_along_every_axis(self, options: Mapping[str, Any], rounding: str) -> bool:
        """Quantizing a 2-D tensor along axis 0 or axis -1 gives the same values (one quantization,
        transposed, serves both GEMMs that read it)."""
        return False

    def options_from_config(self, role: Mapping[str, Any], e4m3_max: float) -> dict[str, Any]:
        """The options a YAML role section (precision.<role>, as a mapping) sets for this format;
        e4m3_max is the device's E4M3 maximum (for an E4M3 flavour of "device")."""
        return {}

    # ---- how it quantizes (the torch reference: float32 math on x32, any device) ----

    def quantize(self, x32: torch.Tensor, rounding: str, axis: int, generator: SRGenerator | None,
                 options: Mapping[str, Any], dtype: torch.dtype) -> QuantizedTensor:
        """x32 is x in float32 (already checked); dtype is x's own, which dequantize restores by default."""
        raise NotImplementedError

    def fake_quantize(self, x32: torch.Tensor, rounding: str, axis: int, generator: SRGenerator | None,
                      options: Mapping[str, Any]) -> torch.Tensor:
        """quantize then dequantize, float32, x32's shape."""
        raise NotImplementedError

    def dequantize(self, qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    # ---- how well it fits (stats.py) ----

    def max_codes(self, qt: QuantizedTensor) -> QuantizedTensor:
        """qt with every element set to the largest positive code, scales unchanged."""
        raise NotImplementedError

    def range_top(self, qt: QuantizedTensor) -> torch.Tensor:
        """The largest magnitude any block scale could give under qt's tensor-level scale (broadcasts
        against x): beyond it an element overflows whatever its block scale; below it, saturation
        only means its block scale was rounded down (clipping)."""
        raise NotImplementedError

    # ---- fused backends ----

    def fused_reason(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                     options: Mapping[str, Any]) -> str | None:
        """Why `backend` (one of FUSED_BACKENDS) cannot run this call; None when it can."""
        return f"format {self.name!r} has no {backend} path"

    def quantize_fused(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                       generator: SRGenerator | None, options: Mapping[str, Any]) -> QuantizedTensor:
        raise NotImplementedError

    def fake_quantize_fused(self, backend: str, x: torch.Tensor, rounding: str, axis: int,
                            generator: SRGenerator | None, options: Mapping[str, Any]) -> torch.Tensor:
        """Fused quantize + dequantize in x's dtype; by default through the packed form."""
        return self.quantize_fused(backend, x, rounding, axis, generator, options).dequantize(x.dtype)


# ---- helpers the families share ----


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{name}: {value!r} must be true or false")


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{name}: {value!r} is not one of {', '.join(allowed)}")


def check_block_size(fmt: NumberFormat, options: Mapping[str, Any]) -> int:
    bs = options.get("block_size", fmt.block_size)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 2 or bs % 2:
        raise UserError(f"{fmt.name}: block_size={bs!r} must be an even integer >= 2 (default {fmt.block_size})")
    return bs


def check_input(x: torch.Tensor, fmt: str, check_finite: bool) -> torch.Tensor:
    """x as float32 (detached); UserError for non-float input, or NaN/Inf unless check_finite is False."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise UserError(f"{fmt}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    x32 = x.detach().to(torch.float32)
    if check_finite and not bool(torch.isfinite(amax(x32))):  # NaN/Inf anywhere makes the amax non-finite
        raise_not_finite(fmt)
    return x32


def raise_not_finite(fmt: str) -> None:
    raise UserError(f"{fmt}: x contains NaN or Inf; low-precision formats here have no encoding for them")


def uniforms(x: torch.Tensor, rounding: str, generator: SRGenerator | None) -> torch.Tensor | None:
    """One SR uniform per element of x (row-major), or None for round-to-nearest (draws nothing)."""
    if rounding != "stochastic":
        return None
    gen = default_generator() if generator is None else generator
    return gen.uniform(x.shape, device=x.device)


def stored_axis(x: torch.Tensor, axis: int) -> int:
    return axis % x.ndim if x.ndim else 0
