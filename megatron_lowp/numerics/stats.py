"""How well a quantization fits its tensor: amax, clipping, overflow and underflow counts.

An element *saturates* when its magnitude exceeds the largest value its stored scales can represent
(the format's largest code dequantized under the same scales), so it was clipped to that value. A
block whose scale rounded to zero is not saturation: its elements are counted as underflow. Saturated
elements are split in two:

- clipped:  within what the recipe's scales could represent, had the block scale not been rounded.
  A block format rounds its scale to E4M3 (NVFP4) or down to a power of two (MX), and where that
  scale comes out below blockmax / element max, the block's largest elements land a little above the
  element max and are clipped: a bounded, expected error (~3% of NVFP4's and ~2% of MXFP4's elements
  on Gaussian data). Current per-tensor FP8 scales only clip by float32 rounding of max / amax.
- overflow: beyond ``range_top``, the largest magnitude any block scale of the format could give under
  the tensor-level scale (FP8: max / s; NVFP4: 6 * 448 / S; MX: none within float32). Delayed scales,
  fixed tensor scales (nGPT's amax = 1), given scales and power-of-two scales from other data can;
  scales from the tensor's own amax cannot. ``TOP_TOLERANCE`` absorbs the float32 rounding of the
  scale arithmetic (2688 / (2688 / amax) may land an ulp below amax).
- underflow: non-zero elements that quantized to zero (lost below the smallest subnormal of their scale).
"""

from __future__ import annotations

import torch

from megatron_lowp.numerics.number_format import QuantizedTensor

TOP_TOLERANCE = 2.0**-20  # relative; float32 scale arithmetic errs by a few 2^-24, any format's step is >= 2^-3


def quantization_stats(x: torch.Tensor, qt: QuantizedTensor) -> dict[str, torch.Tensor]:
    """amax of x, and counts of clipped / overflowed / underflowed / non-zero elements (0-d tensors,
    no host sync)."""
    fmt = qt.format
    x32 = x.detach().to(torch.float32)
    magnitude = x32.abs()
    deq = qt.dequantize(torch.float32)
    limit = fmt.max_codes(qt).dequantize(torch.float32)
    saturated = (magnitude > limit) & (limit > 0)
    beyond = magnitude > fmt.range_top(qt) * (1 + TOP_TOLERANCE)
    nonzero = x32 != 0
    return {
        "amax": magnitude.amax() if x32.numel() else torch.zeros((), device=x32.device),
        "clipped": (saturated & ~beyond).sum(),
        "overflow": (saturated & beyond).sum(),
        "underflow": (nonzero & (deq == 0)).sum(),
        "nonzero": nonzero.sum(),
        "numel": torch.tensor(x32.numel(), device=x32.device),
    }
