"""Per-tensor / per-channel scales for FP8, from the current amax or from a delayed amax history.

A scale s maps x into the format's range before rounding: q = Q(x * s), x_hat = q / s.
* current scaling: s = fmt_max / amax (amax == 0 -> s = 1; capped at the float32 max).
* power of two (FP8 paper): s = 2^floor(log2(fmt_max / amax)), computed exactly from the binary
  exponents so amax * s <= fmt_max always holds; the exponent is clamped to [-126, 127].
  Multiplying by a power of two is exact, so the only error left is the element rounding.
* delayed scaling: ``AmaxHistory`` keeps the last ``length`` amaxes; the scale for the next steps is
  computed from their max (the FP8 seed: length = one global batch of micro-batches, no margin).
"""

from __future__ import annotations

import torch

from megatron_lowp.errors import UserError

_F32_MAX = torch.finfo(torch.float32).max


def amax(x: torch.Tensor, axis: int | None = None) -> torch.Tensor:
    """max |x| as float32: a scalar for axis=None, else reduced over axis (kept as size 1)."""
    if axis is None:
        # one read of x and no copy (abs().amax() wrote |x| first: 3-7x slower, measured in docs/LOG.md);
        # max(max x, -min x) is max |x| exactly, NaN where x has one; abs() makes an all-zero x's amax +0
        lo, hi = torch.aminmax(x.detach())
        return torch.maximum(hi, -lo).abs().to(torch.float32)
    return x.detach().abs().to(torch.float32).amax(dim=axis, keepdim=True)


def scale_from_amax(amax_: torch.Tensor, fmt_max: float, power_of_two: bool = False) -> torch.Tensor:
    """float32 scale(s) that map amax onto fmt_max; 1 where amax is 0."""
    a = torch.as_tensor(amax_, dtype=torch.float32)
    if power_of_two:
        # amax * 2^k <= fmt_max  <=>  k = e_max - e_a, minus 1 when amax's mantissa is larger.
        m_max, e_max = torch.frexp(torch.tensor(fmt_max, dtype=torch.float32, device=a.device))
        m_a, e_a = torch.frexp(a)
        k = e_max - e_a - (m_a > m_max).to(e_a.dtype)
        s = torch.ldexp(torch.ones_like(a), torch.clamp(k, -126, 127))
    else:
        s = torch.clamp(fmt_max / a, max=_F32_MAX)
    return torch.where(a > 0, s, torch.ones_like(s))


class AmaxHistory:
    """A rolling window of amaxes (delayed scaling); ``scale`` uses the max over the window."""

    def __init__(self, length: int) -> None:
        if not isinstance(length, int) or length < 1:
            raise UserError(f"amax history length: {length!r} must be a positive integer")
        self.history = torch.zeros(length, dtype=torch.float32)
        self.index = 0  # slot the next update writes (wraps around)

    @property
    def length(self) -> int:
        return self.history.numel()

    def update(self, value: torch.Tensor | float) -> None:
        v = torch.as_tensor(value, dtype=torch.float32).reshape(())
        self.history = self.history.to(v.device)
        self.history[self.index % self.length] = v
        self.index = (self.index + 1) % self.length

    def amax(self) -> torch.Tensor:
        """Max over the window (0 before any update, which gives scale 1)."""
        return self.history.amax()

    def scale(self, fmt_max: float, power_of_two: bool = False) -> torch.Tensor:
        return scale_from_amax(self.amax(), fmt_max, power_of_two)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        return {"history": self.history.clone(), "index": self.index}

    def load_state_dict(self, state: dict[str, torch.Tensor | int]) -> None:
        history = state.get("history")
        if not isinstance(history, torch.Tensor) or history.shape != self.history.shape:
            got = tuple(history.shape) if isinstance(history, torch.Tensor) else type(history).__name__
            raise UserError(f"amax history: checkpoint holds {got}, expected a tensor of shape ({self.length},)")
        self.history = history.to(torch.float32).clone()
        self.index = int(state["index"]) % self.length
