"""Number formats as pure tensor functions: FP8 E4M3/E5M2, E2M1, E8M0, NVFP4, MXFP4/MXFP8.

Near the bottom of the house: imports only ``errors`` and ``device`` (to ask whether fused kernels
can run on a tensor), and names no device type itself.
Entry points: ``fake_quantize``, ``quantize`` / ``QuantizedTensor.dequantize``, ``FORMATS`` (name ->
format object, format_table.py; ``format_named``);
``SRGenerator`` for reproducible stochastic rounding; scales and ``AmaxHistory`` for FP8.
See docs/numerics.md for every formula.
"""

from megatron_lowp.numerics.format_table import FORMATS, format_named
from megatron_lowp.numerics.formats import E2M1, E4M3, E4M3_GAUDI2, E5M2, FloatFormat, e8m0_decode, e8m0_encode
from megatron_lowp.numerics.number_format import NumberFormat, QuantizedTensor
from megatron_lowp.numerics.quantize import FormatSpec, dequantize, fake_quantize, quantize
from megatron_lowp.numerics.rounding import ROUNDING_MODES, round_to_format
from megatron_lowp.numerics.scaling import AmaxHistory, amax, scale_from_amax
from megatron_lowp.numerics.sr_random import SRGenerator, default_generator

__all__ = [
    "E2M1",
    "E4M3",
    "E4M3_GAUDI2",
    "E5M2",
    "FORMATS",
    "ROUNDING_MODES",
    "AmaxHistory",
    "FloatFormat",
    "FormatSpec",
    "NumberFormat",
    "QuantizedTensor",
    "SRGenerator",
    "amax",
    "default_generator",
    "dequantize",
    "e8m0_decode",
    "e8m0_encode",
    "fake_quantize",
    "format_named",
    "quantize",
    "round_to_format",
    "scale_from_amax",
]
