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
from typing import Any

import torch

COMPILE_MIN_NUMEL = 1 << 16
RECOMPILE_LIMIT = 64

# What compiling costs in host memory, for the memory ledger: the resident-set growth around the first
# call of each compiled function (inductor's modules and caches, the generated kernels' code, the
# graphs), less the bytes of that call's outputs. No tensor category holds it.
COMPILED = {"graphs": 0, "rss_bytes": 0}
_CALLED: set = set()


def resident_bytes() -> int | None:
    """This process's resident set now (Linux /proc), None where it cannot be read."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _tensor_bytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.untyped_storage().nbytes()
    if isinstance(out, (tuple, list)):
        return sum(_tensor_bytes(o) for o in out)
    return 0


def first_call_measured(key, call: Callable[[], Any]) -> Any:
    """call(); the first time `key` (a compiled function's identity) is seen in this process, its
    resident-set growth, outputs excluded, is added to COMPILED: creating the compiled function, tracing,
    compiling and loading the kernel all fall inside."""
    if key in _CALLED:
        return call()
    before = resident_bytes()
    out = call()
    _CALLED.add(key)
    after = resident_bytes()
    COMPILED["graphs"] += 1
    if before is not None and after is not None:
        COMPILED["rss_bytes"] += max(0, after - before - _tensor_bytes(out))
    return out


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
                return first_call_measured(fn, lambda: fast(*args, **kwargs))
            except Exception as err:  # a missing compiler or an inductor limitation: eager gives the same bits
                warnings.warn(f"torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                              "using eager torch ops", stacklevel=2)
                state["fn"] = None
        return fn(*args, **kwargs)

    wrapper.eager = fn
    return wrapper
