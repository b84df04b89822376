"""sr_random's counter hash in int32 lanes, for inductor-fused graphs: the same uniforms, fast on AVX2.

Element i of a stochastic-rounding call draws from counter = offset + i (64 bits, sr_random):

    lo, hi = counter mod 2^32, counter >> 32
    h = fmix32(fmix32(lo ^ k0) + hi + k1 mod 2^32);   u = (h >> 8) / 2^24

The reference computes this in int64 on 32-bit values; AVX2 has no 64-bit multiply, so here every
32-bit value lives in an int32 (two's complement, the same bits): + and * wrap mod 2^32 as the
reference's masked arithmetic does, and fmix32's logical right shifts are arithmetic shifts with the
sign fill masked off. The 64-bit counter never exists: the host splits the generator's offset into
words (sr_words) and the graph adds an int32 element index i < 2^31 to the low word, carrying one
into the high word from the first i at which the low word wraps. The index reaches the graph as a
pair (outer, inner) whose sum is i (counters): a per-row scalar and a constant vector, which inductor
keeps apart when the outer one meets the offset first.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_C1, _C2 = 0x85EBCA6B - (1 << 32), 0xC2B2AE35 - (1 << 32)  # fmix32's multipliers as int32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """sr_random.fmix32 on int32 tensors holding the 32 bits (two's complement): multiplications wrap
    mod 2^32 like the reference's masked int64 ones, and the logical shifts mask off the sign fill."""
    h = h ^ ((h >> 16) & 0xFFFF)
    h = h * _C1
    h = h ^ ((h >> 13) & 0x7FFFF)
    h = h * _C2
    return h ^ ((h >> 16) & 0xFFFF)


def uniform(sr: torch.Tensor, idx: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """sr_random's uniforms (float32) for counters offset + outer + inner, idx = (outer, inner) from
    counters(); sr = sr_words(...) as an int32 tensor (a tensor, so a new offset is no recompile)."""
    outer, inner = idx
    lo = (outer + sr[0]) + inner  # wraps mod 2^32, as the counter's low word does
    wrapped = ((sr[1] - 1 - outer) - inner) >> 31  # -1 from the first idx whose low word wrapped, else 0
    h = _fmix32(_fmix32(lo ^ sr[2]) + (sr[3] - wrapped))
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24


def sr_words(offset: int, k0: int, k1: int) -> tuple[int, int, int, int]:
    """The four int32 words uniform reads for a generator at `offset` with keys (k0, k1): the offset's
    low word; the first idx whose counter carries into the high word (2^31 - 1, past every idx, when
    none does); k0; and high word + k1 mod 2^32."""
    lo, hi = offset & _MASK32, offset >> 32 & _MASK32
    words = (lo, min((1 << 32) - lo, (1 << 31) - 1), k0, (hi + k1) & _MASK32)
    return tuple(v - (1 << 32) if v >= (1 << 31) else v for v in words)


def counters(outer: tuple, inner: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's row-major index (the SR counter offset) in a tensor of shape outer + inner, as
    the pair (outer index * inner size, inner index) of int32 tensors that broadcast to that shape."""
    n = math.prod(inner)
    o = torch.arange(math.prod(outer), dtype=torch.int32, device=device).view(*outer, *[1] * len(inner)) * n
    return o, torch.arange(n, dtype=torch.int32, device=device).view(*[1] * len(outer), *inner)
