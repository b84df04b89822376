"""The public entry points: quantize -> QuantizedTensor -> dequantize, and fake_quantize (both at once).

Formats: fp8_e4m3, fp8_e5m2 (per-tensor or per-channel fp32 scale), nvfp4, mxfp4, mxfp8 (block
scales along ``axis``). All math runs in float32; ``fake_quantize`` returns x's dtype and shape and
equals ``quantize(...).dequantize(x.dtype)`` bit for bit. Inputs with NaN or Inf raise UserError
(``check_finite=False`` skips the check, which costs a host sync on accelerators).

Stochastic rounding draws one uniform per element of x from ``generator`` (an SRGenerator; None = the
process default, seed 0), indexed by the element's row-major position in x, whatever the axis: the
same (seed, offset) gives the same bits on every device.

``backend``: "torch" (this file), "triton" (fused kernels in triton_kernels.py, same bits; fp8 with a
per-tensor scale and nvfp4 decode along the last axis), or "auto" (default): triton where it is usable
on x's device and covers the call, else torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import blocks
from megatron_lowp.numerics.formats import E5M2, TORCH_DTYPES, FloatFormat, e4m3_flavour, e8m0_decode, e8m0_encode
from megatron_lowp.numerics.packing import codes_to_e2m1, e2m1_to_codes, pack_fp4, unpack_fp4
from megatron_lowp.numerics.rounding import check_rounding, round_to_format
from megatron_lowp.numerics.scaling import amax, scale_from_amax
from megatron_lowp.numerics.sr_random import SRGenerator, default_generator


@dataclass(frozen=True)
class FormatSpec:
    """What a format name means: element format, block size (None = tensor/channel scale), scale format."""

    name: str
    element: str
    block_size: int | None
    scale_format: str
    options: tuple[str, ...]


_COMMON = ("check_finite",)
FORMATS: dict[str, FormatSpec] = {
    "fp8_e4m3": FormatSpec("fp8_e4m3", "e4m3", None, "fp32", ("scaling", "power_of_two", "scale", "flavour", *_COMMON)),
    "fp8_e5m2": FormatSpec("fp8_e5m2", "e5m2", None, "fp32", ("scaling", "power_of_two", "scale", *_COMMON)),
    "nvfp4": FormatSpec(
        "nvfp4", "e2m1", 16, "e4m3", ("tensor_scale", "tensor_amax", "scale_rounding", "tile", "block_size", *_COMMON)
    ),
    "mxfp4": FormatSpec("mxfp4", "e2m1", 32, "e8m0", ("block_size", *_COMMON)),
    "mxfp8": FormatSpec("mxfp8", "e4m3", 32, "e8m0", ("block_size", *_COMMON)),
}
FP8_SCALINGS = ("tensor", "channel")
BACKENDS = ("auto", "torch", "triton")


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

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.fmt in ("fp8_e4m3", "fp8_e5m2"):
            return (self.data.to(torch.float32) / self.scale).to(dtype)
        if self.fmt == "mxfp8":
            q = self.data.to(torch.float32)
        else:
            q = codes_to_e2m1(unpack_fp4(self.data))
        q = q.reshape(*q.shape[:-1], -1, self.options["block_size"])
        if self.fmt == "nvfp4":
            s = self.scale.to(torch.float32).unsqueeze(-1)
            out = blocks.nvfp4_dequant(q, s, self.tensor_scale, self.options["scale_rounding"])
        else:
            out = blocks.mx_dequant(q, e8m0_decode(self.scale).unsqueeze(-1))
        return blocks.from_blocks(out, self.axis, self.shape).to(dtype)


def _check_fmt_and_options(fmt: str, options: dict[str, Any]) -> FormatSpec:
    if fmt not in FORMATS:
        raise UserError(f"fmt: {fmt!r} is not one of {', '.join(FORMATS)}")
    spec = FORMATS[fmt]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise UserError(f"{fmt}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(spec.options)}")
    return spec


def _check_input(x: torch.Tensor, fmt: str, check_finite: bool) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise UserError(f"{fmt}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    x32 = x.detach().to(torch.float32)
    if check_finite and not bool(torch.isfinite(x32).all()):
        raise UserError(f"{fmt}: x contains NaN or Inf; low-precision formats here have no encoding for them")
    return x32


def _block_size(spec: FormatSpec, options: dict[str, Any]) -> int:
    bs = options.get("block_size", spec.block_size)
    if not isinstance(bs, int) or isinstance(bs, bool) or bs < 2 or bs % 2:
        raise UserError(f"{spec.name}: block_size={bs!r} must be an even integer >= 2 (default {spec.block_size})")
    return bs


def _uniforms(x: torch.Tensor, rounding: str, generator: SRGenerator | None) -> torch.Tensor | None:
    if rounding != "stochastic":
        return None
    gen = default_generator() if generator is None else generator
    return gen.uniform(x.shape, device=x.device)


def _fp8_scale(x32: torch.Tensor, elem: FloatFormat, axis: int, options: dict[str, Any]) -> torch.Tensor:
    scale = options.get("scale")
    if scale is not None:
        s = torch.as_tensor(scale, dtype=torch.float32, device=x32.device)
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            raise UserError("scale: must be positive and finite")
        try:
            torch.broadcast_shapes(s.shape, x32.shape)
        except RuntimeError:
            raise UserError(
                f"scale: shape {tuple(s.shape)} does not broadcast to x's shape {tuple(x32.shape)}"
            ) from None
        return s
    scaling = options.get("scaling", "tensor")
    if scaling not in FP8_SCALINGS:
        raise UserError(f"scaling: {scaling!r} is not one of {', '.join(FP8_SCALINGS)}")
    power_of_two = options.get("power_of_two", False)
    if not isinstance(power_of_two, bool):
        raise UserError(f"power_of_two: {power_of_two!r} must be true or false")
    if scaling == "channel":
        ax = blocks.normalize_axis(axis, x32.ndim, "channel scaling") if x32.ndim else None
        a = amax(x32, ax)
    else:
        a = amax(x32)
    return scale_from_amax(a, elem.max_value, power_of_two)


def _fp8_element(fmt: str, options: dict[str, Any]) -> FloatFormat:
    return e4m3_flavour(options.get("flavour", "ocp")) if fmt == "fp8_e4m3" else E5M2


def _quantize_values(
    x: torch.Tensor, fmt: str, rounding: str, axis: int, generator: SRGenerator | None, options: dict[str, Any]
) -> tuple[FormatSpec, torch.Tensor, Any, dict[str, Any]]:
    """Shared by quantize and fake_quantize: float32 grid values plus what dequantization needs."""
    spec = _check_fmt_and_options(fmt, options)
    check_rounding(rounding)
    x32 = _check_input(x, fmt, options.get("check_finite", True))
    if spec.block_size is None:
        elem = _fp8_element(fmt, options)
        s = _fp8_scale(x32, elem, axis, options)
        q = round_to_format(x32 * s, elem, rounding, _uniforms(x32, rounding, generator))
        return spec, q, s, {"element": elem.name}
    bs = _block_size(spec, options)
    u = _uniforms(x32, rounding, generator)
    xb = blocks.to_blocks(x32, axis, bs, fmt)
    ub = None if u is None else blocks.to_blocks(u, axis, bs, fmt)
    if fmt == "nvfp4":
        scale_rounding = options.get("scale_rounding", "decode")
        tile = options.get("tile", False)
        if not isinstance(tile, bool):
            raise UserError(f"tile: {tile!r} must be true or false")
        ts = blocks.nvfp4_tensor_scale(
            x32, options.get("tensor_scale", "amax"), options.get("tensor_amax"), scale_rounding
        )
        b = blocks.nvfp4_blocks(xb, ts, scale_rounding, rounding, ub, tile)
        return spec, b.q, b, {"block_size": bs, "scale_rounding": scale_rounding}
    b, exp = blocks.mx_blocks(xb, blocks.MX_ELEMENTS[fmt], rounding, ub)
    return spec, b.q, (b, exp), {"block_size": bs}


def _use_triton(x: torch.Tensor, fmt: str, rounding: str, axis: int, backend: str, options: dict[str, Any]) -> bool:
    if backend not in BACKENDS:
        raise UserError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return False
    _check_fmt_and_options(fmt, options)
    check_rounding(rounding)
    from megatron_lowp.numerics import triton_kernels

    reason = triton_kernels.unsupported_reason(x, fmt, rounding, axis, options)
    if reason is not None and backend == "triton":
        raise UserError(f"backend='triton' cannot run this {fmt} call: {reason}; use backend='auto' or 'torch'")
    return reason is None


def _quantize_triton(
    x: torch.Tensor, fmt: str, rounding: str, axis: int, generator: SRGenerator | None, options: dict[str, Any]
) -> QuantizedTensor:
    """The fused-kernel path of quantize (only for calls unsupported_reason accepted); same bits as torch."""
    from megatron_lowp.numerics import triton_kernels

    spec = FORMATS[fmt]
    x32 = _check_input(x, fmt, options.get("check_finite", True))
    ax = axis % x.ndim if x.ndim else 0
    if spec.block_size is None:
        elem = _fp8_element(fmt, options)
        s = _fp8_scale(x32, elem, axis, options)
        data, _ = triton_kernels.fp8_quantize(x32, s, elem, rounding, generator)
        return QuantizedTensor(fmt, data, s, None, x.shape, ax, x.dtype, {"element": elem.name})
    bs = _block_size(spec, options)
    ts = blocks.nvfp4_tensor_scale(x32, options.get("tensor_scale", "amax"), options.get("tensor_amax"), "decode")
    data, scale = triton_kernels.nvfp4_quantize(x32, ts, rounding, generator, bs)
    return QuantizedTensor(fmt, data, scale, ts, x.shape, ax, x.dtype, {"block_size": bs, "scale_rounding": "decode"})


def quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    rounding: str = "nearest",
    axis: int = -1,
    generator: SRGenerator | None = None,
    backend: str = "auto",
    **options: Any,
) -> QuantizedTensor:
    """Quantize x into ``fmt`` (see FORMATS for the options each format takes)."""
    if _use_triton(x, fmt, rounding, axis, backend, options):
        return _quantize_triton(x, fmt, rounding, axis, generator, options)
    spec, q, aux, meta = _quantize_values(x, fmt, rounding, axis, generator, options)
    ax = axis % x.ndim if x.ndim else 0
    if spec.block_size is None:
        data = q.to(TORCH_DTYPES[meta["element"]])
        return QuantizedTensor(fmt, data, aux, None, x.shape, ax, x.dtype, meta)
    if fmt == "nvfp4":
        data = pack_fp4(e2m1_to_codes(q.flatten(-2)))
        scale = aux.scale.squeeze(-1).to(torch.float8_e4m3fn)
        return QuantizedTensor(fmt, data, scale, aux.tensor_scale, x.shape, ax, x.dtype, meta)
    _, exp = aux
    flat = q.flatten(-2)
    data = flat.to(torch.float8_e4m3fn) if fmt == "mxfp8" else pack_fp4(e2m1_to_codes(flat))
    return QuantizedTensor(fmt, data, e8m0_encode(exp.squeeze(-1)), None, x.shape, ax, x.dtype, meta)


def fake_quantize(
    x: torch.Tensor,
    fmt: str,
    *,
    rounding: str = "nearest",
    axis: int = -1,
    generator: SRGenerator | None = None,
    backend: str = "auto",
    **options: Any,
) -> torch.Tensor:
    """Quantize then dequantize: x's shape and dtype, values on fmt's (scaled) grid."""
    if _use_triton(x, fmt, rounding, axis, backend, options):
        return _quantize_triton(x, fmt, rounding, axis, generator, options).dequantize(x.dtype)
    spec, q, aux, meta = _quantize_values(x, fmt, rounding, axis, generator, options)
    if spec.block_size is None:
        return (q / aux).to(x.dtype)
    if fmt == "nvfp4":
        out = blocks.nvfp4_dequant(q, aux.scale, aux.tensor_scale, meta["scale_rounding"])
    else:
        out = blocks.mx_dequant(q, aux[0].scale)
    return blocks.from_blocks(out, axis, x.shape).to(x.dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)
