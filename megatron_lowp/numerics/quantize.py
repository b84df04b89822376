"""The public entry points: quantize -> QuantizedTensor -> dequantize, and fake_quantize (both at once).

Formats are the objects of format_table.FORMATS (fp8_e4m3, fp8_e5m2, nvfp4, mxfp4, mxfp8); each
knows its options, its reference quantization (float32 torch ops, any device) and its fused paths.
``fake_quantize`` returns x's dtype and shape and equals ``quantize(...).dequantize(x.dtype)`` bit for
bit. Inputs with NaN or Inf raise UserError (``check_finite=False`` skips the check, which costs a
host sync on accelerators).

Stochastic rounding draws one uniform per element of x from ``generator`` (an SRGenerator; None = the
process default, seed 0), indexed by the element's row-major position in x, whatever the axis: the
same (seed, offset) gives the same bits on every device and backend.

``backend``: "torch" (the reference), "triton" (fused CUDA kernels, triton_kernels.py; CPU tensors
under TRITON_INTERPRET=1), "inductor" (one torch.compile'd pass per operand on the CPU, fused_cpu.py),
or "auto" (default): triton where usable and covering the call; else inductor for CPU tensors of at
least cpu_compile.COMPILE_MIN_NUMEL elements where it covers the call; else torch. All give the same bits.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import cpu_compile
from megatron_lowp.numerics.format_table import FORMATS, format_named
from megatron_lowp.numerics.number_format import NumberFormat, QuantizedTensor, check_input
from megatron_lowp.numerics.rounding import check_rounding
from megatron_lowp.numerics.sr_random import SRGenerator

FormatSpec = NumberFormat  # the name FORMATS' values had before formats were objects
BACKENDS = ("auto", "torch", "triton", "inductor")

__all__ = ["BACKENDS", "FORMATS", "FormatSpec", "QuantizedTensor", "dequantize", "fake_quantize", "quantize"]


def _prepare(x: torch.Tensor, fmt: str, rounding: str, axis: int, backend: str,
             options: dict[str, Any]) -> tuple[NumberFormat, str]:
    """The format object and the backend that will run this call (all arguments checked)."""
    f = format_named(fmt)
    f.check_options(options)
    check_rounding(rounding)
    if backend not in BACKENDS:
        raise UserError(f"backend: {backend!r} is not one of {', '.join(BACKENDS)}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise UserError(f"{fmt}: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if backend == "torch":
        return f, "torch"
    if backend != "auto":
        reason = f.fused_reason(backend, x, rounding, axis, options)
        if reason is not None:
            raise UserError(f"backend={backend!r} cannot run this {fmt} call: {reason}; use backend='auto' or 'torch'")
        return f, backend
    if f.fused_reason("triton", x, rounding, axis, options) is None:
        return f, "triton"
    if x.numel() >= cpu_compile.COMPILE_MIN_NUMEL and f.fused_reason("inductor", x, rounding, axis, options) is None:
        return f, "inductor"
    return f, "torch"


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
    """Quantize x into ``fmt`` (see FORMATS[fmt].options for the options each format takes)."""
    f, chosen = _prepare(x, fmt, rounding, axis, backend, options)
    if chosen != "torch":
        return f.quantize_fused(chosen, x, rounding, axis, generator, options)
    x32 = check_input(x, fmt, options.get("check_finite", True))
    return f.quantize(x32, rounding, axis, generator, options, x.dtype)


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
    f, chosen = _prepare(x, fmt, rounding, axis, backend, options)
    if chosen != "torch":
        return f.fake_quantize_fused(chosen, x, rounding, axis, generator, options)
    x32 = check_input(x, fmt, options.get("check_finite", True))
    return f.fake_quantize(x32, rounding, axis, generator, options).to(x.dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return qt.dequantize(dtype)
