"""How many bytes an operand occupies in its stored format: what the quantized linear keeps for
backward (numerics.QuantizedTensor: packed elements plus scales), from the format's description alone.

    FP8 (per tensor / channel)   1 byte per value + one FP32 scale per tensor (per channel)
    NVFP4                        4 bits per value + one E4M3 byte per block of 16 + one FP32 tensor scale
    MXFP4 / MXFP8                4 / 8 bits per value + one E8M0 byte per block of 32
    high precision (spec None)   the tensor itself, in its own dtype

tests/test_memory.py checks these numbers against the QuantizedTensors the formats really return.
"""

from __future__ import annotations

import math

import torch

from megatron_lowp.precision.spec import QuantSpec

ELEMENT_BITS = {"e2m1": 4, "e4m3": 8, "e5m2": 8}
SCALE_BYTES = {"fp32": 4, "e4m3": 1, "e8m0": 1}


def stored_bytes(spec: QuantSpec | None, shape: tuple[int, ...], axis: int, dtype: torch.dtype) -> int:
    """Bytes of a tensor of `shape` quantized by `spec` along `axis` (dtype: the tensor's own, for a
    high-precision role)."""
    numel = math.prod(shape)
    if spec is None:
        return numel * dtype.itemsize
    fmt, options = spec.format, spec.kwargs()
    data = numel * ELEMENT_BITS[fmt.element] // 8
    if fmt.block_size is None:  # FP8: FP32 scales per tensor or per slice along the axis
        scales = 1 if options.get("scaling", "tensor") == "tensor" else numel // shape[axis]
        return data + SCALE_BYTES["fp32"] * scales
    block = options.get("block_size", fmt.block_size)
    tensor_scale = SCALE_BYTES["fp32"] if fmt.scale_format == "e4m3" else 0  # NVFP4's second level
    return data + numel // block * SCALE_BYTES[fmt.scale_format] + tensor_scale


def format_name(spec: QuantSpec | None, dtype: torch.dtype) -> str:
    """What a table calls the stored format: the spec's format, or the dtype of a high-precision tensor."""
    return spec.fmt if spec is not None else str(dtype).replace("torch.", "")
