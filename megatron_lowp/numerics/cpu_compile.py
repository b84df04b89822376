"""torch.compile for the element-wise numerics on the CPU, where they dominate an emulated step.

An emulated FP8/FP4 linear on the CPU spends most of its time in chains of element-wise torch ops
(the SR counter hash: ~30 int64 ops; rounding onto a grid: frexp, ldexp, clamp, copysign), each a
separate pass over memory. Inductor fuses a chain into one C++ loop: ~50x faster for the hash, ~3x
for rounding. The ops are integer or exact power-of-two float ops, so the compiled bits equal the
eager bits (tests/test_numerics_sr.py checks both paths).

Only calls on CPU tensors of at least COMPILE_MIN_NUMEL elements use it (small ones are not worth
a dispatch). MEGATRON_LOWP_CPU_COMPILE=0 turns it off; if compiling fails (no C++ toolchain), the
eager function runs instead, with one warning. GPUs use the Triton kernels (numerics/triton_kernels.py).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

COMPILE_MIN_NUMEL = 1 << 16
RECOMPILE_LIMIT = 64


def enabled() -> bool:
    return os.environ.get("MEGATRON_LOWP_CPU_COMPILE", "1") != "0"


def cpu_compiled(fn: Callable) -> Callable:
    """fn, compiled when its first tensor argument (or `device`) says CPU and the work is large.
    The wrapped function takes `numel` (the element count deciding the dispatch) as a keyword-only
    argument handled here."""
    state: dict[str, Callable | None] = {}

    def compiled() -> Callable | None:
        if "fn" not in state:
            # Each format and rounding mode is its own specialization (the format's constants are
            # baked in); dynamo's default of 8 per function would fall back to slow eager ops once a
            # process has used a few recipes, e.g. a benchmark of fp8 and fp4 side by side.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            state["fn"] = torch.compile(fn, dynamic=True) if enabled() else None
        return state["fn"]

    @functools.wraps(fn)
    def wrapper(*args, numel: int, on_cpu: bool, **kwargs):
        fast = compiled() if on_cpu and numel >= COMPILE_MIN_NUMEL else None
        if fast is not None:
            try:
                return fast(*args, **kwargs)
            except Exception as err:  # a missing compiler or an inductor limitation: eager gives the same bits
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                              "using eager torch ops", stacklevel=2)
                state["fn"] = None
        return fn(*args, **kwargs)

    wrapper.eager = fn
    return wrapper
