"""How well a quantization fits its tensor: amax, overflow (saturation) and underflow rates.

- overflow:  elements whose magnitude exceeds the largest value their scale can represent, so they
  were clipped (saturated) to it. Scales from the tensor's own amax never overflow; delayed scales,
  fixed tensor scales (nGPT's amax = 1) and power-of-two rounding can.
- underflow: non-zero elements that quantized to zero (lost below the smallest subnormal of their scale).
The largest representable magnitude per element is found by dequantizing the format's largest code
under the same scales, so every format and scale layout is handled by its own dequantize.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from megatron_lowp.numerics.quantize import QuantizedTensor

_FP4_MAX_BYTE = 0x77  # two E2M1 codes 7 (= 6.0) in one byte


def _max_codes(qt: QuantizedTensor) -> QuantizedTensor:
    """qt with every element set to the format's largest positive code, scales unchanged."""
    if qt.fmt in ("nvfp4", "mxfp4"):
        data = torch.full_like(qt.data, _FP4_MAX_BYTE)
    else:  # fp8 and mxfp8: the float8 dtype's own max is the format's max (E4M3 Gaudi2 uses 240)
        fmax = 240.0 if qt.options.get("element") == "e4m3_gaudi2" else torch.finfo(qt.data.dtype).max
        data = torch.full_like(qt.data, fmax)
    return replace(qt, data=data)


def quantization_stats(x: torch.Tensor, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """amax of x, and counts of overflowed / underflowed / non-zero elements (0-d tensors, no host sync)."""
    x32 = x.detach().to(torch.float32)
    deq = qt.dequantize(torch.float32)
    limit = _max_codes(qt).dequantize(torch.float32)
    nonzero = x32 != 0
    return {
        "amax": x32.abs().amax() if x32.numel() else torch.zeros((), device=x32.device),
        "overflow": (x32.abs() > limit).sum(),
        "underflow": (nonzero & (deq == 0)).sum(),
        "nonzero": nonzero.sum(),
        "numel": torch.tensor(x32.numel(), device=x32.device),
    }
