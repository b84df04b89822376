"""Whether the fused Triton kernels (megatron_lowp.numerics.triton_kernels) can run on a tensor.

They run on CUDA tensors when triton imports, and on CPU tensors through triton's interpreter when
``TRITON_INTERPRET=1`` is set (slow; meant for tests and debugging). Everything else uses torch.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_kernels_usable(t: torch.Tensor) -> bool:
    """True when triton imports and t is on a CUDA device, or TRITON_INTERPRET=1 and t is on the CPU."""
    if not _triton_importable():
        return False
    if t.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and t.device.type == "cpu"
