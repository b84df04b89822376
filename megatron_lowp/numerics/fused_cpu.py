"""One-pass quantizers for the CPU: each operand's whole quantization as one torch.compile'd graph.

The torch reference (the format classes) runs a quantization as a dozen separate passes over memory
(finiteness check, amax, block maxima through a moved/reshaped copy, frexp/ldexp rounding in float64
scales, a LUT gather to pack). Here the same formulas (cpu_bits.py, cpu_sr.py) are written so that
inductor fuses them into one C++ kernel per operand that reads x twice: once for the amax (per tensor
for FP8; per block for NVFP4, the tensor amax being their max), then once to write the result. NVFP4's
block scales d and e = S / d are stored by a small loop over blocks in between (computed inside the
element loop, their scalar chain of two divisions and an E4M3 rounding ran for every vector of 8).

What makes the loops vectorize (each measured; docs/LOG.md, issue 17):
* x reaches a graph already viewed as NVFP4 blocks (pre, n_blocks, block, post): a reshape inside
  the graph that inductor cannot prove free costs a copy of x;
* E2M1 codes go two to a byte, element 2i in the low nibble: along a last block axis each pair is
  read as one 64-bit word (float32 x) or 32-bit word (bfloat16 x) and split in registers, because
  inductor does not vectorize the stride-2 loads of x[..., 0::2];
* uint8 results are converted from float32, and signs are ORed in as bits (cpu_bits.py);
* the SR counters reach the hash as a per-row scalar plus a constant vector (cpu_sr.py);
* inductor's realize_cpu_opcount_threshold is raised: by default it stores an intermediate read by
  several expressions once its expression passes 50 ops, and the SR hash alone has ~45; the stored
  bool mask went through a scalar byte store per element (NVFP4 SR fake-quantize 4x slower).

Dequantizing NVFP4 writes x's layout straight from the packed bytes: along the last axis two outputs
at a time, as one int64 (float32) or int32 (bfloat16, rounded in bits) word per byte; along an earlier
axis in rows contiguous along the later dims, a byte's two nibbles being two output rows. Unpacking
the codes to int32 first (the earlier graph) cost a scalar loop and twice x's bytes.

Every quantize graph returns the tensor amax of x as well, which is NaN/Inf when x holds one: callers raise
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

from megatron_lowp.numerics import cpu_compile
from megatron_lowp.numerics.blocks import NVFP4_GLOBAL
from megatron_lowp.numerics.cpu_bits import (
    F32_MAX,
    bfloat16_bits,
    code,
    code_nearest,
    consts,
    decode,
    grid_magnitude,
    scale_from_amax,
    to_uint8,
    with_sign,
)
from megatron_lowp.numerics.cpu_sr import counters, uniform
from megatron_lowp.numerics.formats import E2M1, E4M3, E5M2, FloatFormat

__all__ = ["fp8", "fp8_dequantize", "nvfp4", "nvfp4_dequantize"]

_INDUCTOR_OPTIONS = {"realize_cpu_opcount_threshold": 1 << 16}  # see the module docstring
SR_ROW = 16  # FP8 with SR views x as rows of this many elements when they divide it (cpu_sr.counters)


def _fp8_graph(fmt: FloatFormat, power_of_two: bool, codes: bool, out_dtype: torch.dtype, rows: bool) -> Callable:
    c = consts(fmt)

    def fp8(x: torch.Tensor, scale: torch.Tensor | None, sr: torch.Tensor | None):
        """Per-tensor FP8 (with rows, x viewed as rows of SR_ROW): (x dequantized in out_dtype, or
        uint8 codes) in x's shape, the scale, amax(|x|)."""
        if rows:
            torch._check(x.shape[1] == SR_ROW)  # a constant of the graph
        x32 = x.to(torch.float32)
        amax = x32.abs().amax()
        s = scale_from_amax(amax, c[0], power_of_two) if scale is None else scale
        y = x32 * s
        sign = (y.view(torch.int32) >> 24) & 0x80
        if codes and sr is None:
            return to_uint8(code_nearest(y.abs(), c) | sign), s, amax
        cut = 1 if rows else 0
        u = None if sr is None else uniform(sr, counters(x32.shape[:cut], x32.shape[cut:], x32.device))
        v = grid_magnitude(y.abs(), c, u)
        if codes:
            return to_uint8(code(v, c) | sign), s, amax
        return (with_sign(v, y) / s).to(out_dtype), s, amax

    return fp8


def _halves(xv: torch.Tensor, words: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The even and odd elements along the block dim (2) of a blocked view, as float32, each
    (pre, nb, bs / 2, post). With words, xv holds each pair in one 64-bit (float32 pairs) or 32-bit
    (bfloat16 pairs) word, little-endian: element 2i is the low half."""
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
    e2m1, e4m3 = consts(E2M1), consts(E4M3)

    def nvfp4(xv: torch.Tensor, xw: torch.Tensor | None, tensor_amax: torch.Tensor | None, sr: torch.Tensor | None):
        """NVFP4 (decode convention) of x's blocked view xv = (pre, nb, bs, post); with words, xw is x
        again as (pre, nb, bs / 2) words of two elements (see _halves). Returns x dequantized in xv's
        shape and out_dtype, or (packed E2M1 codes (pre, post, nb * bs / 2), E4M3 scale codes (pre, post,
        nb)); then S, amax(|x|), and e and d (returned only so that inductor stores them per block)."""
        torch._check(xv.shape[2] == bs)  # a constant of the graph
        if codes:  # E2M1 codes go two to a byte: the even and odd elements are quantized side by side
            if words is not None:
                torch._check(xw.shape[2] == bs // 2)
            parts = _halves(xv if words is None else xw, words)
            post = parts[0].shape[3]
            outer, inner = counters(parts[0].shape[:2], (bs // 2, 2, post), xv.device)
            idx = outer[:, :, :, 0], inner[:, :, :, 0]
        else:
            parts = (xv.to(torch.float32),)
            post = xv.shape[3]
            idx = counters(xv.shape[:2], (bs, post), xv.device)
        bmax = xv.abs().amax(dim=2, keepdim=True).to(torch.float32)  # contiguous loads, whatever the parts
        if tile:
            bmax = _tile_max(bmax, bs)
        amax = bmax.amax()
        if scale_off:
            S = torch.ones((), dtype=torch.float32, device=xv.device)
        else:
            top = amax if tensor_amax is None else tensor_amax
            S = torch.clamp(NVFP4_GLOBAL / top, max=F32_MAX)
            S = torch.where((top > 0) & (S > 0), S, torch.ones_like(S))
        d = grid_magnitude((bmax / e2m1[0]) * S, e4m3, None)
        e = torch.where(d > 0, S / d, torch.zeros_like(d))
        out = []
        for k, part in enumerate(parts):  # the odd elements' counters are post past the even ones'
            y = part * e
            sign = (y.view(torch.int32) >> 28) & 0x8
            if codes and sr is None:
                out.append(code_nearest(y.abs(), e2m1) | sign)
                continue
            v = grid_magnitude(y.abs(), e2m1, None if sr is None else uniform(sr, (idx[0], idx[1] + k * post)))
            if not codes:
                return ((with_sign(v, y) * d) / S).to(out_dtype), S, amax, e, d
            out.append(code(v, e2m1) | sign)
        packed = to_uint8(out[0] | (out[1] << 4)).permute(0, 3, 1, 2)  # the stored layout: block axis last
        scales = to_uint8(code(d, e4m3)).permute(0, 3, 1, 2)
        pre = packed.shape[0]
        return (packed.reshape(pre, post, -1), scales.reshape(pre, post, -1)), S, amax, e, d

    return nvfp4


def _fp8_dequant_graph(fmt: FloatFormat, special: int, out_dtype: torch.dtype) -> Callable:
    c = consts(fmt)

    def fp8_dequant(data: torch.Tensor, scale: torch.Tensor):
        """(float8 bytes as uint8 -> float32) / scale, in out_dtype: TensorScaledFP8.dequantize."""
        return (decode(data.to(torch.int32), c, 0x7F, special) / scale).to(out_dtype)

    return fp8_dequant


def _fp8_dequant_quads_graph(fmt: FloatFormat, special: int) -> Callable:
    c = consts(fmt)

    def fp8_dequant_quads(words: torch.Tensor, scale: torch.Tensor):
        """_fp8_dequant_graph to bfloat16, four at a time: float8 bytes read as int32 words (byte k is
        element 4i + k, little-endian) give int64 words of four bfloat16 (rounded in bits), x's layout
        once viewed as bfloat16. Byte loads and 16-bit stores ran through stack buffers (see
        bfloat16_bits)."""
        out = None
        for k in range(4):
            v = decode((words >> (8 * k)) & 0xFF, c, 0x7F, special) / scale
            term = ((bfloat16_bits(v) >> 16) & 0xFFFF).to(torch.int64) << (16 * k)
            out = term if out is None else out | term
        return out

    return fp8_dequant_quads


_E2M1_CONSTS = consts(E2M1)  # read inside graphs: a plain tuple (dynamo warns on a cached call)


def _nibble_values(data: torch.Tensor, d: torch.Tensor, tensor_scale: torch.Tensor):
    """The float32 values (q * d) / S of the low and high E2M1 codes of packed bytes, d broadcasting."""
    codes = data.to(torch.int32)
    return tuple((decode(q, _E2M1_CONSTS, 0x7, None) * d) / tensor_scale for q in (codes & 0xF, codes >> 4))


def _nvfp4_dequant_graph(bs: int, out_dtype: torch.dtype) -> Callable:
    e4m3 = consts(E4M3)

    def nvfp4_dequant(data_t: torch.Tensor, scale_t: torch.Tensor, tensor_scale: torch.Tensor):
        """NVFP4.dequantize (decode convention) of packed codes and E4M3 block scale bytes given with the
        block axis in the middle, contiguous: (pre, n / 2, post) and (pre, n / bs, post); unpack, decode
        both, (q * d) / S, returned as (pre, n, post). The loop runs in the output's order, contiguous
        along post: the low and high nibbles of a byte row are two output rows."""
        pre, nb, post = scale_t.shape
        half = nb * (bs // 2)
        torch._check(data_t.shape[1] == half)
        s = decode(scale_t.to(torch.int32), e4m3, 0x7F, 0x7F)
        s = s.unsqueeze(2).expand(pre, nb, bs // 2, post).reshape(pre, half, post)  # a scale per bs / 2 rows
        lo, hi = _nibble_values(data_t, s, tensor_scale)
        return torch.stack([lo, hi], dim=2).reshape(pre, 2 * half, post).to(out_dtype)

    return nvfp4_dequant


def _nvfp4_dequant_pairs_graph(bs: int, out_dtype: torch.dtype) -> Callable:
    e4m3 = consts(E4M3)
    wide = out_dtype == torch.float32  # else bfloat16

    def nvfp4_dequant_pairs(data: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor):
        """nvfp4_dequant for blocks along the last axis (post == 1), written as words of two outputs:
        codes (rows, nb, bs / 2) and scales (rows, nb) give int64 (float32 out) or int32 (bfloat16 out)
        words (rows, nb, bs / 2) holding element 2i in the low half, x's layout once viewed as out_dtype.
        The unpacked codes never reach memory (the stacked form wrote them as int32, twice x's bytes,
        in a scalar loop)."""
        torch._check(data.shape[2] == bs // 2)  # a constant of the graph
        s = decode(scale.to(torch.int32), e4m3, 0x7F, 0x7F).unsqueeze(-1)
        lo, hi = _nibble_values(data, s, tensor_scale)
        if wide:
            return (hi.view(torch.int32).to(torch.int64) << 32) | (lo.view(torch.int32).to(torch.int64) & 0xFFFFFFFF)
        return (bfloat16_bits(hi) & -65536) | ((bfloat16_bits(lo) >> 16) & 0xFFFF)

    return nvfp4_dequant_pairs


@functools.cache
def _compiled(factory: Callable, *static) -> Callable:
    """factory(*static)'s graph function, compiled; its code object is renamed per configuration so
    that each has a dynamo cache of its own."""
    fn = factory(*static)
    name = f"{fn.__name__}_{abs(hash(static)):x}"
    code_obj = fn.__code__.replace(co_name=name, co_qualname=name)
    fn = types.FunctionType(code_obj, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    return torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS)


def _run(factory: Callable, static: tuple, *args):
    # The closed-over numbers must be constants of the graph: left symbolic (dynamo's default for
    # floats), graphs of two formats looked alike and one format's constants served the other
    # (measured: E5M2 calls saturating at E4M3's 448). Tensor sizes stay dynamic.
    def call():
        with torch._dynamo.config.patch(specialize_float=True, specialize_int=True):
            return _compiled(factory, *static)(*args)

    return cpu_compile.first_call_measured((factory, static), call)


# 16-bit x is read by the graphs as float32, converted before and the result cast back after: a graph
# that reads or writes 16-bit floats runs on pairs of 8-lane vectors, which inductor moves through
# stack buffers at every bit cast (measured at 4096 x 704 bfloat16, one thread: FP8 fake-quantize 15 ms
# as is, 8.8 ms widened; packed codes 14 -> 4.8 ms). NVFP4 codes along the last axis read bfloat16
# pairs as int32 words instead (_halves), which is faster still.
_HALF = (torch.bfloat16, torch.float16)


def fp8(x: torch.Tensor, scale: torch.Tensor | None, sr: torch.Tensor | None, *, fmt: FloatFormat,
        power_of_two: bool, codes: bool, out_dtype: torch.dtype):
    """Per-tensor FP8 of contiguous x: given scale (0-d float32) or None for current scaling; sr =
    sr_words(offset, k0, k1) as int32, or None for round-to-nearest. Returns (x dequantized, or uint8
    codes in x's shape), s, amax."""
    shape, widen = x.shape, x.dtype in _HALF
    x = x.float() if widen else x
    rows = sr is not None and x.numel() % SR_ROW == 0
    out, s, amax = _run(_fp8_graph, (fmt, power_of_two, codes, torch.float32 if widen else out_dtype, rows),
                        x.view(-1, SR_ROW) if rows else x, scale, sr)
    return (out.to(out_dtype) if widen and not codes else out).view(shape), s, amax


def nvfp4(x: torch.Tensor, tensor_amax: torch.Tensor | None, sr: torch.Tensor | None, *, axis: int, block_size: int,
          tile: bool, scale_off: bool, codes: bool, out_dtype: torch.dtype):
    """NVFP4 of contiguous x with blocks along axis (>= 0, block_size dividing it; with tile, 2-D x in
    block_size squares); tensor_amax (0-d) for a fixed tensor scale, None for the current amax (or
    scale_off). Returns (x dequantized | (packed codes (pre, post, n/2), E4M3 scale codes (pre, post,
    n_blocks)) with pre/post the sizes before/after axis), S, amax."""
    pre, post = math.prod(x.shape[:axis]), math.prod(x.shape[axis + 1:])
    shape, widen = x.shape, x.dtype in _HALF and not (codes and post == 1 and x.dtype == torch.bfloat16)
    x = x.float() if widen else x
    xv = x.view(pre, x.shape[axis] // block_size, block_size, post)
    words = xw = None
    if codes and post == 1:  # neighbours share a byte: read them as one word (see _halves)
        if x.storage_offset() % 2:  # words must start at a pair (x is float32 or bfloat16 here)
            x = x.clone()
            xv = x.view(xv.shape)
        words = torch.float64 if x.dtype == torch.float32 else torch.int32
        xw = x.reshape(-1).view(words).view(pre, -1, block_size // 2)
    out, S, amax, _, _ = _run(_nvfp4_graph, (block_size, tile, scale_off, codes, words,
                                             torch.float32 if widen else out_dtype), xv, xw, tensor_amax, sr)
    return (out if codes else out.view(shape).to(out_dtype)), S, amax


_PAIR_WORDS = (torch.float32, torch.bfloat16)  # dtypes whose pairs fill an int64 / int32 word
_FP8_SPECIAL = {torch.float8_e4m3fn: (E4M3, 0x7F), torch.float8_e5m2: (E5M2, 0x7C)}


def fp8_dequantize(data: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """(data.to(float32) / scale).to(out_dtype) for float8 data (e4m3fn or e5m2) and a 0-d scale."""
    fmt, special = _FP8_SPECIAL[data.dtype]
    data = data.contiguous().view(torch.uint8)
    if out_dtype == torch.bfloat16 and data.numel() % 4 == 0 and data.storage_offset() % 4 == 0:
        words = _run(_fp8_dequant_quads_graph, (fmt, special), data.reshape(-1).view(torch.int32), scale.reshape(()))
        return words.view(torch.bfloat16).view(data.shape)
    return _run(_fp8_dequant_graph, (fmt, special, out_dtype), data, scale.reshape(()))


def nvfp4_dequantize(data: torch.Tensor, scale: torch.Tensor, tensor_scale: torch.Tensor, shape: torch.Size,
                     axis: int, block_size: int, out_dtype: torch.dtype) -> torch.Tensor:
    """NVFP4 (decode convention) from packed codes (..., n / 2) and E4M3 block scales (..., n / bs), the
    block axis (>= 0) moved last, to `shape` in out_dtype."""
    pre, post = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
    if post == 1 and out_dtype in _PAIR_WORDS:  # blocks along the last axis: the outputs in pairs
        n = shape[axis]
        words = _run(_nvfp4_dequant_pairs_graph, (block_size, out_dtype),
                     data.contiguous().reshape(pre, n // block_size, block_size // 2),
                     scale.contiguous().view(torch.uint8).reshape(pre, n // block_size), tensor_scale.reshape(()))
        return words.view(out_dtype).reshape(shape)
    # a block axis before the last: the graph writes x's layout from the bytes moved to that layout
    # first (an eighth of x's bytes). Measured at 4096 x 704, axis 0: 2.5x faster than unpacking in
    # the stored order and transposing inside the graph (inductor's 8 x 8 tiles), 3.7x faster than
    # the pairs graph followed by torch's transposed copy of the output.
    # (The fused quantize stores them in that layout already, as a transposed view: no copy then.)
    out = _run(_nvfp4_dequant_graph, (block_size, out_dtype),
               data.reshape(pre, post, -1).transpose(1, 2).contiguous(),
               scale.view(torch.uint8).reshape(pre, post, -1).transpose(1, 2).contiguous(),
               tensor_scale.reshape(()))
    return out.reshape(shape)
