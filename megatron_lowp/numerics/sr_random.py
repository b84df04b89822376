"""Counter-based random numbers for stochastic rounding, reproducible on every backend.

SR must give the same bits on CPU, GPU and in a later Triton kernel, so it cannot use torch.rand.
Element i of a call draws from a pure function of (seed, counter = offset + i):

    lo, hi = counter mod 2^32, counter >> 32
    k0 = fmix32(seed_lo ^ 0x9E3779B9);  k1 = fmix32(seed_hi ^ k0 ^ 0x7F4A7C15)
    h  = fmix32(fmix32(lo ^ k0) + hi + k1  mod 2^32)
    u  = (h >> 8) / 2^24                  # uniform on {0, 1, ..., 2^24 - 1} / 2^24, float32-exact

fmix32 is MurmurHash3's 32-bit finalizer (a bijection with full avalanche). All arithmetic is done in
int64 on values below 2^49 (the 32x32 multiply is split in 16-bit halves), so nothing overflows and
any integer backend computes the same bits. An ``SRGenerator`` holds (seed, offset) and advances the
offset by the numel of each draw, so consecutive calls never reuse a counter; its state_dict goes in
checkpoints so a resumed run continues the identical stream.
"""

from __future__ import annotations

import functools

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics.cpu_compile import cpu_compiled

_MASK32 = 0xFFFFFFFF
_C1 = 0x85EBCA6B
_C2 = 0xC2B2AE35
_TWO_POW_64 = 1 << 64


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2^32 for int64 h in [0, 2^32), split so no intermediate exceeds 2^49."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 finalizer on int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def _fmix32_int(h: int) -> int:
    return int(fmix32(torch.tensor([h], dtype=torch.int64)).item())


def _check_seed(seed: int) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < _TWO_POW_64:
        raise UserError(f"seed: {seed!r} must be an integer in [0, 2^64)")
    return seed


@functools.lru_cache(maxsize=64)  # a pure function of the seed, ~0.2 ms of small torch ops per call
def _keys(seed: int) -> tuple[int, int]:
    k0 = _fmix32_int((seed & _MASK32) ^ 0x9E3779B9)
    k1 = _fmix32_int(((seed >> 32) & _MASK32) ^ k0 ^ 0x7F4A7C15)
    return k0, k1


def hash32(seed: int, counter: torch.Tensor) -> torch.Tensor:
    """32-bit hash of (seed, counter) for an int64 tensor of non-negative counters."""
    k0, k1 = _keys(_check_seed(seed))
    lo, hi = counter & _MASK32, counter >> 32
    h = fmix32(lo ^ k0)
    return fmix32((h + hi + k1) & _MASK32)


def _uniform_flat(k0: int, k1: int, offset: int, n: int, device: torch.device | None) -> torch.Tensor:
    counter = torch.arange(n, dtype=torch.int64, device=device) + offset
    lo, hi = counter & _MASK32, counter >> 32
    h = fmix32(fmix32(lo ^ k0) + hi + k1 & _MASK32)
    return (h >> 8).to(torch.float32) * 2.0**-24


_uniform_flat_fast = cpu_compiled(_uniform_flat)


def uniform(
    seed: int, offset: int, shape: torch.Size | tuple[int, ...], device: torch.device | None = None
) -> torch.Tensor:
    """float32 uniforms in [0, 1) for counters offset .. offset + numel - 1, laid out row-major in shape."""
    n = 1
    for s in shape:
        n *= int(s)
    k0, k1 = _keys(_check_seed(seed))
    on_cpu = device is None or torch.device(device).type == "cpu"
    return _uniform_flat_fast(k0, k1, offset, n, device, numel=n, on_cpu=on_cpu).reshape(shape)


class SRGenerator:
    """A (seed, offset) stream of uniforms; each draw consumes numel counters."""

    def __init__(self, seed: int = 0, offset: int = 0) -> None:
        self.seed = _check_seed(seed)
        if not isinstance(offset, int) or offset < 0:
            raise UserError(f"offset: {offset!r} must be a non-negative integer")
        self.offset = offset

    def uniform(self, shape: torch.Size | tuple[int, ...], device: torch.device | None = None) -> torch.Tensor:
        u = uniform(self.seed, self.offset, shape, device)
        self.offset += u.numel()
        return u

    def uniform_block(self, global_shape: tuple[int, int], rows: torch.Tensor | None, cols: torch.Tensor | None,
                      device: torch.device | None = None) -> torch.Tensor:
        """The uniforms a draw over a 2-D tensor of `global_shape` gives the sub-block at row indices
        `rows` and column indices `cols` (None: all), as if the whole tensor had been drawn; the offset
        advances by the global numel. Tensor-parallel shards draw this way, so every rank holds the
        bits the unsharded tensor would get."""
        n_rows, n_cols = global_shape
        r = torch.arange(n_rows, device=device) if rows is None else rows.to(device=device, dtype=torch.int64)
        c = torch.arange(n_cols, device=device) if cols is None else cols.to(device=device, dtype=torch.int64)
        counter = self.offset + r[:, None] * n_cols + c[None, :]
        self.offset += n_rows * n_cols
        return (hash32(self.seed, counter) >> 8).to(torch.float32) * 2.0**-24

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if set(state) != {"seed", "offset"}:
            raise UserError(f"SRGenerator state: keys {sorted(state)} must be exactly ['offset', 'seed']")
        self.seed = _check_seed(int(state["seed"]))
        self.offset = int(state["offset"])

    def __repr__(self) -> str:
        return f"SRGenerator(seed={self.seed}, offset={self.offset})"


# Used when a caller passes generator=None: one process-wide stream with seed 0. Training code should
# pass its own (checkpointed) generator; this one only keeps ad-hoc calls reproducible per process.
_DEFAULT = SRGenerator(seed=0)


def default_generator() -> SRGenerator:
    return _DEFAULT
