"""One-pass quantizers for the CPU: each operand's whole quantization as one torch.compile'd graph.

The torch reference (the format classes) runs a quantization as a dozen separate passes over memory
(finiteness check, amax, block maxima through a moved/reshaped copy, frexp/ldexp rounding in float64
scales, a LUT gather to pack). Here the same formulas are written so that inductor fuses them into one
C++ loop nest per operand: a reduction loop for the tensor amax, then one loop that reads x once and
writes the result (block maxima are reduced inside it, over each block's 16 or 32 elements):

* rounding onto a grid reads the binade from the float32 bits instead of frexp/ldexp (the same
  numbers: ulp = 2^(max(floor(log2 a), min_exp) - man_bits), a / ulp as an exact multiplication);
* stochastic rounding draws its uniforms in the loop from sr_random's counter hash (same counters:
  generator offset + row-major index), so the stream equals the torch and Triton paths bit for bit;
* codes (FP8 bytes, E2M1 nibbles, E4M3 block scales) come from the float32 bits of grid values;
* a non-last block axis is a view (pre, n_blocks, block, post) of x, not a moved copy.

Every graph returns the tensor amax of x as well, which is NaN/Inf when x holds one: callers raise
their UserError from it (no separate isfinite pass). Shapes are dynamic (one compiled graph serves
every layer). A format's constants (max, exponent range, mantissa bits, block size, rounding mode)
are Python numbers closed over by its own copy of the graph function, with a code object of its own:
dynamo then specializes on them, and no two formats share (or exhaust) one compile cache. The torch
reference stays the oracle: tests/test_numerics_fused.py checks every graph bit for bit against it.
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Callable

import torch

from megatron_lowp.numerics.blocks import NVFP4_GLOBAL
from megatron_lowp.numerics.formats import E2M1, E4M3, E5M2, FloatFormat

_F32_MAX = torch.finfo(torch.float32).max
_MASK32 = 0xFFFFFFFF
_SIGN32 = -(1 << 31)
_C1, _C2 = 0x85EBCA6B - (1 << 32), 0xC2B2AE35 - (1 << 32)  # fmix32's multipliers as int32


@functools.cache
def _consts(fmt: FloatFormat) -> tuple:
    """(max, min exponent, mantissa bits, bias, min normal, 1 / min subnormal): plain numbers to close over."""
    return fmt.max_value, fmt.min_exponent, fmt.man_bits, fmt.bias, fmt.min_normal, 1.0 / fmt.min_subnormal


def _grid_magnitude(a: torch.Tensor, c: tuple, u: torch.Tensor | None) -> torch.Tensor:
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
    return (low + (u < scaled - low).to(torch.float32)) * ulp


def _code(v: torch.Tensor, c: tuple) -> torch.Tensor:
    """The unsigned code (int32) of grid magnitudes v >= 0: for normals the float32 exponent and top
    mantissa bits, rebiased by one subtraction; subnormals are v / min subnormal."""
    man, bias, min_normal, inv_min_sub = c[2], c[3], c[4], c[5]
    normal = (v.view(torch.int32) >> (23 - man)) - ((127 - bias) << man)
    return torch.where(v >= min_normal, normal, (v * inv_min_sub).to(torch.int32))


def _with_sign(v: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """copysign(v, y) for v with a clear sign bit, as an OR of bits (inductor calls a library function
    for copysign, and the call spills every vector register on each iteration)."""
    return (v.view(torch.int32) | (y.view(torch.int32) & _SIGN32)).view(torch.float32)


def _to_uint8(code: torch.Tensor) -> torch.Tensor:
    """int32 values in [0, 255] as uint8, through float32 (exact): ATen's AVX2 vectors convert float
    to uint8 in a few instructions but int32 to uint8 one element at a time."""
    return code.to(torch.float32).to(torch.uint8)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """sr_random.fmix32 on int32 tensors holding the 32 bits (two's complement): multiplications wrap
    mod 2^32 like the reference's masked int64 ones, and the logical shifts mask off the sign fill."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _C2
    return h ^ ((h >> 16) & 0xFFFF)


def _uniform(sr: torch.Tensor, idx: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """sr_random's uniforms for counters offset + outer + inner (idx = (outer, inner), broadcastable
    int32 with sums in [0, 2^31)), in int32 arithmetic (AVX2 has no 64-bit multiply: 3x faster than
    the int64 form). sr = sr_words(...): the offset's low word, the idx from which offset + idx
    carries into the high word, and two precomputed keys. The outer term meets sr's words before
    the inner one, so inductor keeps it a per-row scalar and the inner one a constant vector."""
    outer, inner = idx
    carry = (inner >= (sr[1] - outer)).to(torch.int32)
    lo = (outer + sr[0]) + inner  # wraps mod 2^32, as the counter's low word does
    h = _fmix32(_fmix32(lo ^ sr[2]) + (sr[3] + carry))
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24


def sr_words(offset: int, k0: int, k1: int) -> tuple[int, int, int, int]:
    """The four int32 words _uniform reads for a generator at `offset` with keys (k0, k1): the offset's
    low word; the first idx whose counter carries into the high word (2^31 - 1, past every idx, when
    none does); k0; and high word + k1 mod 2^32."""
    lo, hi = offset & _MASK32, offset >> 32 & _MASK32
    words = (lo, min((1 << 32) - lo, (1 << 31) - 1), k0, (hi + k1) & _MASK32)
    return tuple(v - (1 << 32) if v >= (1 << 31) else v for v in words)


def _scale_from_amax(a: torch.Tensor, fmt_max: float, power_of_two: bool) -> torch.Tensor:
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
        s = torch.clamp(fmt_max / a, max=_F32_MAX)
    return torch.where(a > 0, s, torch.ones_like(s))


def _fp8_graph(fmt: FloatFormat, power_of_two: bool, codes: bool, out_dtype: torch.dtype, rows: bool) -> Callable:
    c = _consts(fmt)

    def fp8(x: torch.Tensor, scale: torch.Tensor | None, sr: torch.Tensor | None):
        """Per-tensor FP8 (with rows, x viewed as rows of 16): (x dequantized in out_dtype, or uint8
        codes) in x's shape, the scale, amax(|x|)."""
        if rows:
            torch._check(x.shape[1] == 16)  # a constant of the graph: SR counters row * 16 + a constant vector
        x32 = x.to(torch.float32)
        amax = x32.abs().amax()
        s = _scale_from_amax(amax, c[0], power_of_two) if scale is None else scale
        y = x32 * s
        cut = 1 if rows else 0
        u = None if sr is None else _uniform(sr, _counters(x32.shape[:cut], x32.shape[cut:], x32.device))
        v = _grid_magnitude(y.abs(), c, u)
        if codes:
            return _to_uint8(_code(v, c) | ((y.view(torch.int32) >> 24) & 0x80)), s, amax
        return (_with_sign(v, y) / s).to(out_dtype), s, amax

    return fp8


def _counters(outer: tuple, inner: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's row-major index (the SR counter offset) in a tensor of shape outer + inner, as
    the pair (outer index * inner size, inner index) of int32 tensors that broadcast to that shape."""
    n = math.prod(inner)
    o = torch.arange(math.prod(outer), dtype=torch.int32, device=device).view(*outer, *[1] * len(inner)) * n
    return o, torch.arange(n, dtype=torch.int32, device=device).view(*[1] * len(outer), *inner)


def _halves(xv: torch.Tensor, words: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The even and odd elements along the block dim (2) of a blocked view, as float32, each
    (pre, nb, bs / 2, post). With words, xv holds each pair in one 64-bit (float32 pairs) or 32-bit
    (bfloat16 pairs) word, little-endian, so both halves come from contiguous loads (inductor does
    not vectorize the stride-2 loads of xv[:, :, 0::2] along the last dim)."""
    if words is None:
        return xv[:, :, 0::2].to(torch.float32), xv[:, :, 1::2].to(torch.float32)
    if words == torch.float64:
        w = xv.view(torch.int64)
        lo, hi = w.to(torch.int32), (w >> 32).to(torch.int32)  # int64 -> int32 keeps the low word
    else:
        lo, hi = xv << 16, xv & -65536  # a bfloat16 is the top half of a float32
    return lo.view(torch.float32).unsqueeze(-1), hi.view(torch.float32).unsqueeze(-1)


def _tile_max(bmax: torch.Tensor, bs: int) -> torch.Tensor:
    """Block maxima (pre, nb, 1, post) of a 2-D x, maximized over bs x bs tiles and repeated per block:
    over bs consecutive rows (pre) when the blocks run along rows (post == 1), else bs columns (post)."""
    pre, nb, _, post = bmax.shape
    if post == 1:
        torch._check(pre % bs == 0)
        t = bmax.reshape(pre // bs, bs, nb).amax(1, keepdim=True).expand(pre // bs, bs, nb)
    else:
        torch._check(post % bs == 0)
        t = bmax.reshape(nb, post // bs, bs).amax(2, keepdim=True).expand(nb, post // bs, bs)
    return t.reshape(bmax.shape)


def _nvfp4_graph(bs: int, tile: bool, scale_off: bool, codes: bool, words: torch.dtype | None,
                 out_dtype: torch.dtype) -> Callable:
    e2m1, e4m3 = _consts(E2M1), _consts(E4M3)

    def nvfp4(xv: torch.Tensor, xw: torch.Tensor | None, tensor_amax: torch.Tensor | None, sr: torch.Tensor | None):
        """NVFP4 (decode convention) of x's blocked view xv = (pre, nb, bs, post); with words, xw is x
        again as (pre, nb, bs / 2) words of two elements (see _halves). Returns x dequantized in xv's
        shape and out_dtype, or (packed E2M1 codes (pre, post, nb * bs / 2), E4M3 scale codes (pre, post,
        nb)), then S, amax(|x|), e and d."""
        torch._check(xv.shape[2] == bs)  # a constant of the graph
        if codes:  # E2M1 codes go two to a byte: the even and odd elements are quantized side by side
            if words is not None:
                torch._check(xw.shape[2] == bs // 2)
            parts = _halves(xv if words is None else xw, words)
            post = parts[0].shape[3]
            outer, inner = _counters(parts[0].shape[:2], (bs // 2, 2, post), xv.device)
            idx = outer[:, :, :, 0], inner[:, :, :, 0]
        else:
            parts = (xv.to(torch.float32),)
            post = xv.shape[3]
            idx = _counters(xv.shape[:2], (bs, post), xv.device)
        bmax = xv.abs().amax(dim=2, keepdim=True).to(torch.float32)  # from contiguous loads, whatever the parts
        if tile:
            bmax = _tile_max(bmax, bs)
        amax = bmax.amax()
        if scale_off:
            S = torch.ones((), dtype=torch.float32, device=xv.device)
        else:
            top = amax if tensor_amax is None else tensor_amax
            S = torch.clamp(NVFP4_GLOBAL / top, max=_F32_MAX)
            S = torch.where((top > 0) & (S > 0), S, torch.ones_like(S))
        d = _grid_magnitude((bmax / e2m1[0]) * S, e4m3, None)
        e = torch.where(d > 0, S / d, torch.zeros_like(d))
        # e and d are returned as well, only so that inductor stores them in a loop over blocks: inlined,
        # their scalar chain (two divisions, an E4M3 rounding) ran for every vector of 8 elements
        out = []
        for k, part in enumerate(parts):  # the odd elements' counters are post past the even ones'
            y = part * e
            v = _grid_magnitude(y.abs(), e2m1, None if sr is None else _uniform(sr, (idx[0], idx[1] + k * post)))
            if not codes:
                return ((_with_sign(v, y) * d) / S).to(out_dtype), S, amax, e, d
            out.append(_code(v, e2m1) | ((y.view(torch.int32) >> 28) & 0x8))
        packed = _to_uint8(out[0] | (out[1] << 4)).permute(0, 3, 1, 2)  # the stored layout: block axis last
        scales = _to_uint8(_code(d, e4m3)).permute(0, 3, 1, 2)
        pre = packed.shape[0]
        return (packed.reshape(pre, post, -1), scales.reshape(pre, post, -1)), S, amax, e, d

    return nvfp4


# Inductor stores an intermediate that several expressions read once its expression exceeds 50 ops
# on the CPU; the SR hash alone has ~45, so without this the rounding's bool mask went through a
# scalar byte store per element (NVFP4 stochastic fake-quantize ran 4x slower than with this).
_INDUCTOR_OPTIONS = {"realize_cpu_opcount_threshold": 1 << 16}


@functools.cache
def _compiled(factory: Callable, *static) -> Callable:
    """factory(*static)'s graph function, compiled; its code object is renamed per configuration so
    that each has a dynamo cache of its own."""
    fn = factory(*static)
    name = f"{fn.__name__}_{abs(hash(static)):x}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    fn = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS)


def _run(factory: Callable, static: tuple, *args):
    # The closed-over numbers must be constants of the graph: left symbolic (dynamo's default for
    # floats), graphs of two formats looked alike and one format's constants served the other
    # (measured: E5M2 calls saturating at E4M3's 448). Tensor sizes stay dynamic.
    with torch._dynamo.config.patch(specialize_float=True, specialize_int=True):
        return _compiled(factory, *static)(*args)


def fp8(x: torch.Tensor, scale: torch.Tensor | None, sr: torch.Tensor | None, *, fmt: FloatFormat,
        power_of_two: bool, codes: bool, out_dtype: torch.dtype):
    """Per-tensor FP8 of x: given scale (0-d float32) or None for current scaling; sr = sr_words(offset,
    k0, k1) as int32, or None for round-to-nearest. Returns (x dequantized, or uint8 codes in x's shape), s, amax."""
    rows = sr is not None and x.numel() % 16 == 0
    out, s, amax = _run(_fp8_graph, (fmt, power_of_two, codes, out_dtype, rows), x.view(-1, 16) if rows else x, scale, sr)
    return out.view(x.shape), s, amax


def nvfp4(x: torch.Tensor, tensor_amax: torch.Tensor | None, sr: torch.Tensor | None, *, axis: int, block_size: int,
          tile: bool, scale_off: bool, codes: bool, out_dtype: torch.dtype):
    """NVFP4 of contiguous x with blocks along axis (>= 0, block_size dividing it; with tile, 2-D x in
    block_size squares); tensor_amax (0-d) for a fixed tensor scale, None for the current amax (or
    scale_off). Returns (x dequantized | (packed codes (pre, post, n/2), E4M3 scale codes (pre, post,
    n_blocks)) with pre/post the sizes before/after axis), S, amax."""
    pre, post = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    # views, not copies: the graph then has no reshape to prove free (it copied x's worth when it had)
    xv = x.view(pre, x.shape[axis] // block_size, block_size, post)
    words = xw = None
    if codes and post == 1:  # neighbours share a byte: read them as one word (see _halves)
        if x.dtype not in (torch.float32, torch.bfloat16) or x.storage_offset() % 2:
            x = x.float() if x.dtype == torch.float16 else x.clone()  # words must start at a pair
            xv = x.view(xv.shape)
        words = torch.float64 if x.dtype == torch.float32 else torch.int32
        xw = x.reshape(-1).view(words).view(pre, -1, block_size // 2)
    out, S, amax, *_ = _run(_nvfp4_graph, (block_size, tile, scale_off, codes, words, out_dtype), xv, xw, tensor_amax, sr)
    return (out if codes else out.view(x.shape)), S, amax


def _decode(code: torch.Tensor, c: tuple, mag_mask: int, special: int | None) -> torch.Tensor:
    """Float32 values of sign-magnitude codes (int32, sign bit just above mag_mask): the exponent and
    mantissa fields placed in float32 bits (normals) or m * min subnormal (subnormals), both exact.
    Magnitude codes >= special (E4M3FN's 0x7F, E5M2's exponent 31) decode as torch's float8 casts
    do: NaN, or inf for E5M2's zero mantissa; None: the format has none."""
    man, bias, inv_min_sub = c[2], c[3], c[5]
    mag = code & mag_mask
    e, m = mag >> man, mag & ((1 << man) - 1)
    normal = (((e - bias + 127) << 23) | (m << (23 - man))).view(torch.float32)
    v = torch.where(e > 0, normal, m.to(torch.float32) * (1.0 / inv_min_sub))
    if special is not None:
        odd = torch.where(m == 0, torch.full_like(v, math.inf), torch.full_like(v, math.nan))
        v = torch.where(mag >= special, odd, v)
    return torch.where((code & (mag_mask + 1)) != 0, -v, v)


def _fp8_dequant_graph(fmt: FloatFormat, special: int, out_dtype: torch.dtype) -> Callable:
    c = _consts(fmt)

    def fp8_dequant(data: torch.Tensor, scale: torch.Tensor):
        """(float8 bytes as uint8 -> float32) / scale, in out_dtype: TensorScaledFP8.dequantize."""
        return (_decode(data.to(torch.int32), c, 0x7F, special) / scale).to(out_dtype)

    return fp8_dequant


def _nvfp4_dequant_graph(bs: int, out_dtype: torch.dtype) -> Callable:
    e2m1, e4m3 = _consts(E2M1), _consts(E4M3)

    def nvfp4_dequant(data: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor):
        """NVFP4.dequantize (decode convention) of packed codes (pre, post, n / 2) and E4M3 block scale
        bytes (pre, post, n / bs): unpack, decode both, (q * d) / S, returned as (pre, n, post)."""
        pre, post, nb = scale.shape
        d = data.to(torch.int32)
        codes = torch.stack([d & 0xF, d >> 4], dim=-1).reshape(pre, post, nb, bs)
        q = _decode(codes, e2m1, 0x7, None)
        s = _decode(scale.to(torch.int32), e4m3, 0x7F, 0x7F).unsqueeze(-1)
        out = (q * s) / tensor_scale
        return out.reshape(pre, post, nb * bs).permute(0, 2, 1).contiguous().to(out_dtype)

    return nvfp4_dequant


# the uncompiled graphs, for tests that compare a compiled graph with its own source
def eager_fp8(x, scale, sr, *, fmt, power_of_two, codes, out_dtype):
    return _fp8_graph(fmt, power_of_two, codes, out_dtype, False)(x, scale, sr)


_FP8_SPECIAL = {torch.float8_e4m3fn: (E4M3, 0x7F), torch.float8_e5m2: (E5M2, 0x7C)}


def fp8_dequantize(data: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(data.to(float32) / scale).to(out_dtype) for float8 data (e4m3fn or e5m2) and a 0-d scale."""
    fmt, special = _FP8_SPECIAL[data.dtype]
    return _run(_fp8_dequant_graph, (fmt, special, out_dtype), data.contiguous().view(torch.uint8), scale.reshape(()))


def nvfp4_dequantize(data: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor, shape: torch.Size,
                     axis: int, block_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """NVFP4 (decode convention) from packed codes (..., n / 2) and E4M3 block scales (..., n / bs), the
    block axis (>= 0) moved last, to `shape` in out_dtype."""
    pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    out = _run(_nvfp4_dequant_graph, (block_size, out_dtype), data.contiguous().reshape(pre, post, -1),
               scale.contiguous().view(torch.uint8).reshape(pre, post, -1), tensor_scale.reshape(()))
    return out.reshape(shape)
