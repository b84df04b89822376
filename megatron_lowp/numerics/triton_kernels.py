"""Fused Triton quantizers that reproduce the PyTorch reference (rounding.py, blocks.py) bit for bit.

Two kernels, each reading its input once:

* ``fp8_quantize``: q = round_to_format(x * scale, fmt) for E4M3 (either flavour) and E5M2 with a given
  per-tensor float32 scale, nearest or stochastic; writes the float8 bits and, optionally, per-program
  partial maxima of |x| (reduced on the host side of the call) for delayed scaling.
* ``nvfp4_quantize``: NVFP4 along the last axis, decode-scale convention, given the tensor scale S:
  d = E4M3_RN((blockmax / 6) * S), e = S / d (0 if d == 0), q = E2M1(x * e); writes the packed E2M1
  codes (element 2i in the low nibble) and the E4M3 block scales, the layout ``quantize()`` stores.

The element rounding follows rounding.py step by step: |x| clamped to max (NaN propagates like
torch.clamp), the binade exponent read from the float32 bits and clamped to the format's smallest
normal exponent (what frexp + clamp give), ulp an exact power of two, |x| / ulp done as an exact
multiplication by 1 / ulp, ties to even (floor + fraction test, no reliance on rint) or floor +
(u < fraction), sign taken from the rounded operand like copysign. Divisions use ``tl.div_rn`` (IEEE
round-to-nearest), never the approximate default. Stochastic rounding computes the uniforms in-kernel
with the counter-based hash of sr_random.py: counter = generator offset + row-major element index,
and the generator advances by numel exactly as the torch path does.

triton is imported lazily; kernels are built on first use, separately for compiled and interpreted
(``TRITON_INTERPRET=1``) mode. Which calls they cover is each format's ``fused_reason`` (fp8_format.py,
nvfp4_format.py); fused_dispatch.py runs them.
"""

from __future__ import annotations

import functools
import os
import types
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import torch

from megatron_lowp.numerics.formats import E2M1, E4M3, TORCH_DTYPES, FloatFormat
from megatron_lowp.numerics.sr_random import SRGenerator, _keys, default_generator

if TYPE_CHECKING:
    import triton.language as tl

FP8_BLOCK = 1024  # elements per program (fp8 kernel)
NVFP4_GROUPS = 64  # blocks per program (nvfp4 kernel)
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The kernel bodies below are plain functions; ``_kernels`` re-creates them over a private globals
# dict and applies triton.jit there, once per mode (triton.jit picks interpreter or compiler when it
# decorates, and the interpreter resolves helper names through __globals__, not closures). They use
# only triton builtins and each other, never triton.language.standard's jit functions (tl.max etc.):
# those were decorated when triton was imported, so under an interpreter switched on after that import
# they would be compiled-mode functions the interpreter cannot call.


def _fmix32(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


def _max_combine(a, b):
    return tl.maximum(a, b)


def _uniform(counter, k0, k1):
    # counter: int64 >= 0; k0, k1: the seed keys of sr_random._keys. All uint32 math wraps mod 2^32.
    lo = counter.to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    h = _fmix32(lo ^ k0.to(tl.uint32))
    h = _fmix32(h + hi + k1.to(tl.uint32))
    return (h >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24, exact


def _round_mag(y, u, MAXV: tl.constexpr, MIN_EXP: tl.constexpr, MAN: tl.constexpr, STOCHASTIC: tl.constexpr):
    """|round_to_format(y)| as float32 (the sign is y's; attach it when encoding)."""
    a = tl.minimum(tl.abs(y), MAXV, propagate_nan=tl.PropagateNan.ALL)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 a) for normal a
    e = tl.maximum(e, MIN_EXP)  # float32 subnormals / zero land below MIN_EXP as well
    ulp = ((e - MAN + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((MAN - e + 127) << 23).to(tl.float32, bitcast=True)
    scaled = a * inv_ulp  # exact, = a / ulp
    low = tl.floor(scaled)
    frac = scaled - low  # exact
    if STOCHASTIC:
        q = low + (u < frac).to(tl.float32)
    else:
        odd = (low.to(tl.int32) & 1) == 1
        up = (frac > 0.5) | ((frac == 0.5) & odd)
        q = low + up.to(tl.float32)
    return q * ulp


def _encode(
    v,
    y,
    BIAS: tl.constexpr,
    MAN: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    INV_MIN_SUB: tl.constexpr,
    SIGN_SHIFT: tl.constexpr,
):
    """Code of the grid magnitude v with y's sign bit: (s, biased exponent, mantissa) or subnormal."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((((bits >> 23) & 0xFF) - 127 + BIAS) << MAN) | ((bits >> (23 - MAN)) & ((1 << MAN) - 1))
    sub = (tl.minimum(v, MIN_NORMAL) * INV_MIN_SUB).to(tl.int32)  # v / min_subnormal where v < min normal
    code = tl.where(v >= MIN_NORMAL, normal, sub)
    sign = (y.to(tl.int32, bitcast=True) >> 31) & 1
    return code | (sign << SIGN_SHIFT)


def _fp8_kernel(
    x_ptr,
    scale_ptr,
    out_ptr,
    amax_ptr,
    n,
    offset,
    k0,
    k1,
    MAXV: tl.constexpr,
    MIN_EXP: tl.constexpr,
    MAN: tl.constexpr,
    BIAS: tl.constexpr,
    MIN_NORMAL: tl.constexpr,
    INV_MIN_SUB: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    AMAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(scale_ptr)
    if STOCHASTIC:
        u = _uniform(offset.to(tl.int64) + idx, k0, k1)
    else:
        u = y
    v = _round_mag(y, u, MAXV, MIN_EXP, MAN, STOCHASTIC)
    code = _encode(v, y, BIAS, MAN, MIN_NORMAL, INV_MIN_SUB, 7)
    tl.store(out_ptr + idx, code.to(tl.uint8), mask=mask)
    if AMAX:
        tl.store(amax_ptr + pid, tl.reduce(tl.abs(x), 0, _max_combine))


def _nvfp4_kernel(
    x_ptr,
    ts_ptr,
    data_ptr,
    scale_ptr,
    n_blocks,
    offset,
    k0,
    k1,
    STOCHASTIC: tl.constexpr,
    BS: tl.constexpr,
    GROUPS: tl.constexpr,
):
    HALF: tl.constexpr = BS // 2
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * GROUPS + tl.arange(0, GROUPS)  # block index
    j = tl.arange(0, HALF)  # byte index within the block
    gmask = g < n_blocks
    mask = gmask[:, None] & (j[None, :] < HALF)
    even = g[:, None] * BS + 2 * j[None, :]  # row-major element index of element 2j
    xe = tl.load(x_ptr + even, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_ptr + even + 1, mask=mask, other=0.0).to(tl.float32)
    S = tl.load(ts_ptr)
    bmax = tl.maximum(tl.reduce(tl.abs(xe), 1, _max_combine), tl.reduce(tl.abs(xo), 1, _max_combine))
    # d = E4M3_RN((blockmax / 6) * S): E4M3 = max 448, min exponent -6, 3 mantissa bits, bias 7
    t = tl.div_rn(bmax, tl.full(bmax.shape, 6.0, tl.float32)) * S
    d = _round_mag(t, t, 448.0, -6, 3, False)
    e = tl.where(d > 0, tl.div_rn(tl.full(d.shape, 0.0, tl.float32) + S, tl.where(d > 0, d, 1.0)), 0.0)
    ye = xe * e[:, None]
    yo = xo * e[:, None]
    if STOCHASTIC:
        ue = _uniform(offset.to(tl.int64) + even, k0, k1)
        uo = _uniform(offset.to(tl.int64) + even + 1, k0, k1)
    else:
        ue = ye
        uo = yo
    # E2M1: max 6, min exponent 0, 1 mantissa bit, bias 1; min normal 1, min subnormal 0.5
    ce = _encode(_round_mag(ye, ue, 6.0, 0, 1, STOCHASTIC), ye, 1, 1, 1.0, 2.0, 3)
    co = _encode(_round_mag(yo, uo, 6.0, 0, 1, STOCHASTIC), yo, 1, 1, 1.0, 2.0, 3)
    tl.store(data_ptr + g[:, None] * HALF + j[None, :], (ce | (co << 4)).to(tl.uint8), mask=mask)
    dcode = _encode(d, d, 7, 3, 0.015625, 512.0, 7)
    tl.store(scale_ptr + g, dcode.to(tl.uint8), mask=gmask)


_JIT = {
    "_fmix32": {},
    "_max_combine": {},
    "_uniform": {},
    "_round_mag": {},
    "_encode": {},
    "_fp8_kernel": {"do_not_specialize": ["n", "offset", "k0", "k1"]},
    "_nvfp4_kernel": {"do_not_specialize": ["n_blocks", "offset", "k0", "k1"]},
}


@functools.cache
def _kernels(interpret: bool) -> SimpleNamespace:
    """The jit functions, built on first use per mode (``interpret`` is the cache key)."""
    del interpret  # triton reads TRITON_INTERPRET itself when it decorates
    import triton
    import triton.language as tl

    ns: dict[str, Any] = {"tl": tl, "triton": triton, "__name__": __name__}
    for name, kwargs in _JIT.items():
        fn = globals()[name]
        plain = types.FunctionType(fn.__code__, ns, name, fn.__defaults__, fn.__closure__)
        plain.__module__ = __name__
        plain.__qualname__ = name
        ns[name] = triton.jit(**kwargs)(plain)
    return SimpleNamespace(fp8=ns["_fp8_kernel"], nvfp4=ns["_nvfp4_kernel"])


def kernels() -> SimpleNamespace:
    """The jit functions for the current mode (compiled, or interpreted under TRITON_INTERPRET=1)."""
    return _kernels(_interpreting())


def _sr_state(rounding: str, generator: SRGenerator | None, numel: int) -> tuple[int, int, int]:
    """(offset, k0, k1) for this call; advances the generator by numel like SRGenerator.uniform."""
    if rounding != "stochastic":
        return 0, 0, 0
    gen = default_generator() if generator is None else generator
    k0, k1 = _keys(gen.seed)
    offset = gen.offset
    gen.offset += numel
    return offset, k0, k1


def _flat_input(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    if x.dtype not in _INPUT_DTYPES:
        x = x.to(torch.float32)
    return x.contiguous().reshape(-1)


def fp8_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    fmt: FloatFormat,
    rounding: str = "nearest",
    generator: SRGenerator | None = None,
    return_amax: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float8 tensor (x's shape) holding round_to_format(x * scale, fmt); plus amax(|x|) if asked.

    ``scale`` is a float32 tensor with one element (on x's device); fmt is E4M3, E4M3_GAUDI2 or E5M2.
    """
    if fmt.name not in TORCH_DTYPES:
        raise ValueError(f"fp8_quantize: {fmt.name} is not an FP8 format")
    xf = _flat_input(x)
    n = xf.numel()
    s = torch.as_tensor(scale, dtype=torch.float32, device=xf.device).reshape(-1)
    if s.numel() != 1:
        raise ValueError("fp8_quantize: scale must hold exactly one value")
    out = torch.empty(n, dtype=torch.uint8, device=xf.device)
    offset, k0, k1 = _sr_state(rounding, generator, n)
    grid = (triton_cdiv(n, FP8_BLOCK),)
    partial = torch.zeros(max(grid[0], 1), dtype=torch.float32, device=xf.device)
    if n:
        kernels().fp8[grid](
            xf, s, out, partial, n, offset, k0, k1,
            MAXV=fmt.max_value, MIN_EXP=fmt.min_exponent, MAN=fmt.man_bits, BIAS=fmt.bias,
            MIN_NORMAL=fmt.min_normal, INV_MIN_SUB=1.0 / fmt.min_subnormal,
            STOCHASTIC=rounding == "stochastic", AMAX=return_amax, BLOCK=FP8_BLOCK,
        )  # fmt: skip
    data = out.view(TORCH_DTYPES[fmt.name]).reshape(x.shape)
    return data, (partial.amax() if return_amax else None)


def nvfp4_quantize(
    x: torch.Tensor,
    tensor_scale: torch.Tensor,
    rounding: str = "nearest",
    generator: SRGenerator | None = None,
    block_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 (decode convention) along the last axis: packed uint8 (..., n/2), float8_e4m3fn scales (..., n/bs)."""
    if x.ndim == 0 or x.shape[-1] % block_size or block_size < 2 or block_size & (block_size - 1):
        raise ValueError("nvfp4_quantize: block_size must be a power of two dividing the last dimension")
    xf = _flat_input(x)
    n = xf.numel()
    n_blocks = n // block_size
    ts = torch.as_tensor(tensor_scale, dtype=torch.float32, device=xf.device).reshape(-1)
    data = torch.empty(n // 2, dtype=torch.uint8, device=xf.device)
    scale = torch.empty(n_blocks, dtype=torch.uint8, device=xf.device)
    offset, k0, k1 = _sr_state(rounding, generator, n)
    if n:
        grid = (triton_cdiv(n_blocks, NVFP4_GROUPS),)
        kernels().nvfp4[grid](
            xf, ts, data, scale, n_blocks, offset, k0, k1,
            STOCHASTIC=rounding == "stochastic", BS=block_size, GROUPS=NVFP4_GROUPS,
        )  # fmt: skip
    lead = tuple(x.shape[:-1])
    return data.reshape(*lead, x.shape[-1] // 2), scale.view(torch.float8_e4m3fn).reshape(
        *lead, x.shape[-1] // block_size
    )


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# E4M3 and E2M1 constants are hard-coded inside _nvfp4_kernel; keep them tied to formats.py.
assert (E4M3.max_value, E4M3.min_exponent, E4M3.man_bits, E4M3.bias) == (448.0, -6, 3, 7)
assert (E2M1.max_value, E2M1.min_exponent, E2M1.man_bits, E2M1.bias) == (6.0, 0, 1, 1)
