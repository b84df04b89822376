"""Running a format on a fused backend: which devices each backend serves, the SR counters, the checks.

* "triton": the kernels of triton_kernels.py, on CUDA tensors (CPU tensors under TRITON_INTERPRET=1);
* "inductor": the torch.compile'd graphs of fused_cpu.py, on CPU tensors (off with
  MEGATRON_LOWP_CPU_COMPILE=0).

Both give the torch reference's bits and draw the same SR stream: the generator's (seed, offset) is
read here and advanced by numel after a successful call, as SRGenerator.uniform does. The inductor
graphs return amax(|x|), from which the NaN/Inf check is made without a pass of its own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from megatron_lowp.device.kernels import triton_kernels_usable
from megatron_lowp.errors import UserError
from megatron_lowp.numerics import blocks, cpu_compile, cpu_sr, fused_cpu, scaling
from megatron_lowp.numerics.formats import TORCH_DTYPES, FloatFormat
from megatron_lowp.numerics.number_format import (
    NumberFormat,
    QuantizedTensor,
    raise_not_finite,
    stored_axis,
)
from megatron_lowp.numerics.sr_random import SRGenerator, _keys, default_generator


def device_reason(backend: str, x: torch.Tensor) -> str | None:
    """Why `backend` cannot run on x's device at all; None when it can."""
    if backend == "triton" and not triton_kernels_usable(x):
        return "triton is not importable, or x is on a device it cannot run on (TRITON_INTERPRET=1 runs CPU tensors)"
    if backend == "inductor":
        if x.device.type != "cpu" or not cpu_compile.enabled():
            return "inductor fuses CPU tensors only (and MEGATRON_LOWP_CPU_COMPILE=0 turns it off)"
        if not 0 < x.numel() < 2**31:  # the SR counters run in int32
            return "x has no elements, or 2^31 or more"
    return None


def dequantize_backend(qt: QuantizedTensor, backend: str, dtype: torch.dtype = torch.float32) -> str:
    """The backend that dequantizes qt to dtype: "inductor" for a large enough CPU tensor that fused_cpu
    covers (per-tensor FP8, NVFP4 in the decode convention) under "auto"; else "torch" (the reference,
    also for E5M2 to any dtype but bfloat16, where torch's cast is faster; backend="inductor" still runs
    it fused)."""
    if backend not in ("auto", "torch", "inductor"):
        raise UserError(f"backend: {backend!r} is not one of auto, torch, inductor (dequantize)")
    if backend == "torch":
        return "torch"
    reason = None
    if qt.data.device.type != "cpu" or not cpu_compile.enabled():
        reason = "inductor fuses CPU tensors only (and MEGATRON_LOWP_CPU_COMPILE=0 turns it off)"
    elif not 0 < math.prod(qt.shape) < 2**31:
        reason = "the tensor has no elements, or 2^31 or more"
    elif qt.fmt in ("fp8_e4m3", "fp8_e5m2") and qt.scale.numel() != 1:
        reason = "only a per-tensor (single) scale has a fused dequantize"
    elif qt.fmt == "nvfp4" and qt.options.get("scale_rounding") != "decode":
        reason = "only scale_rounding='decode' has a fused dequantize"
    elif qt.fmt not in ("fp8_e4m3", "fp8_e5m2", "nvfp4"):
        reason = f"format {qt.fmt!r} has no fused dequantize"
    if backend == "inductor":
        if reason is not None:
            raise UserError(f"backend='inductor' cannot dequantize this {qt.fmt} tensor: {reason}; use 'auto' or 'torch'")
        return "inductor"
    # E5M2 is the top byte of an FP16: torch's cast is a shift and one conversion, faster than decoding
    # the fields to float32 (measured 1.4x at 4096 x 704); to bfloat16 the fused graph writes four
    # outputs per word and is the faster (4.2 against 8.0 ms)
    fast = reason is None and (qt.fmt != "fp8_e5m2" or dtype == torch.bfloat16)
    return "inductor" if fast and math.prod(qt.shape) >= cpu_compile.COMPILE_MIN_NUMEL else "torch"


def dequantize(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """qt dequantized by fused_cpu (dequantize_backend chose "inductor"): the reference's bits."""
    if qt.fmt == "nvfp4":
        return fused_cpu.nvfp4_dequantize(qt.data, qt.scale, qt.tensor_scale, qt.shape, qt.axis,
                                          qt.options["block_size"], dtype)
    return fused_cpu.fp8_dequantize(qt.data, qt.scale, dtype)


def _checked_amax(x: torch.Tensor, fmt: str, options: Mapping[str, Any], needed: bool) -> torch.Tensor | None:
    """amax(|x|) in one read of x (no float32 copy, unlike check_input), UserError if it is NaN/Inf
    and check_finite is on; None when neither the check nor the caller (needed) wants it."""
    check = options.get("check_finite", True)
    if not (check or needed):
        return None
    a = scaling.amax(x)
    if check and not bool(torch.isfinite(a)):  # the one host sync of a checked call
        raise_not_finite(fmt)
    return a


def _sr_tensor(rounding: str, generator: SRGenerator | None, device: torch.device) -> torch.Tensor | None:
    """The generator's offset and seed keys as int32 words (a tensor, so that a new offset is no recompile)."""
    if rounding != "stochastic":
        return None
    gen = default_generator() if generator is None else generator
    return torch.tensor(cpu_sr.sr_words(gen.offset, *_keys(gen.seed)), dtype=torch.int32, device=device)


def _advance(rounding: str, generator: SRGenerator | None, numel: int) -> None:
    if rounding == "stochastic":
        (default_generator() if generator is None else generator).offset += numel


def _finish(fmt: str, amax: torch.Tensor, options: Mapping[str, Any], rounding: str,
            generator: SRGenerator | None, numel: int) -> None:
    if options.get("check_finite", True) and not bool(torch.isfinite(amax)):
        raise_not_finite(fmt)
    _advance(rounding, generator, numel)


def fp8(backend: str, x: torch.Tensor, fmt: NumberFormat, elem: FloatFormat, rounding: str, axis: int,
        generator: SRGenerator | None, options: Mapping[str, Any], codes: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 on a fused backend: (float8 data, or x dequantized in x's dtype; the scale)."""
    if backend == "triton":
        from megatron_lowp.numerics import triton_kernels

        s = fmt.given_scale(options, x.device)
        a = _checked_amax(x, fmt.name, options, needed=s is None)
        if s is None:
            s = scaling.scale_from_amax(a, elem.max_value, options.get("power_of_two", False))
        return triton_kernels.fp8_quantize(x, s, elem, rounding, generator)[0], s  # bf16/fp16 read as is
    given = fmt.given_scale(options, x.device)  # one value (fused_reason checked)
    out, s, amax = fused_cpu.fp8(x.detach().contiguous(), None if given is None else given.reshape(()),
                                 _sr_tensor(rounding, generator, x.device), fmt=elem,
                                 power_of_two=options.get("power_of_two", False), codes=codes, out_dtype=x.dtype)
    _finish(fmt.name, amax, options, rounding, generator, x.numel())
    return (out.view(TORCH_DTYPES[elem.name]) if codes else out), (s if given is None else given)


def nvfp4(backend: str, x: torch.Tensor, fmt: NumberFormat, bs: int, rounding: str, axis: int,
          generator: SRGenerator | None, options: Mapping[str, Any], codes: bool) -> QuantizedTensor | torch.Tensor:
    """NVFP4 (decode convention) on a fused backend: the QuantizedTensor, or x dequantized in x's dtype."""
    mode, given_amax = options.get("tensor_scale", "amax"), options.get("tensor_amax")
    meta = {"block_size": bs, "scale_rounding": "decode"}
    if backend == "triton":
        from megatron_lowp.numerics import triton_kernels

        a = _checked_amax(x, fmt.name, options, needed=mode == "amax")
        ts = blocks.nvfp4_tensor_scale(x, mode, given_amax, "decode", x_amax=a)
        data, scale = triton_kernels.nvfp4_quantize(x, ts, rounding, generator, bs)
        qt = QuantizedTensor(fmt.name, data, scale, ts, x.shape, stored_axis(x, axis), x.dtype, meta)
        return qt if codes else qt.dequantize(x.dtype)
    ax = blocks.check_block_axis(x.shape, axis, bs, fmt.name)
    tile = options.get("tile", False)
    if tile:
        blocks.check_tile(x.shape, ax, bs, fmt.name)
    tensor_amax = None if mode != "fixed" else torch.tensor(float(given_amax), dtype=torch.float32, device=x.device)
    out, S, amax = fused_cpu.nvfp4(x.detach().contiguous(), tensor_amax, _sr_tensor(rounding, generator, x.device),
                                   axis=ax, block_size=bs, tile=tile, scale_off=mode == "off", codes=codes,
                                   out_dtype=x.dtype)
    _finish(fmt.name, amax, options, rounding, generator, x.numel())
    if not codes:
        return out
    lead = (*x.shape[:ax], *x.shape[ax + 1:])
    data = out[0].reshape(*lead, x.shape[ax] // 2)
    scale = out[1].reshape(*lead, x.shape[ax] // bs).view(torch.float8_e4m3fn)
    return QuantizedTensor(fmt.name, data, scale, S, x.shape, ax, x.dtype, meta)
