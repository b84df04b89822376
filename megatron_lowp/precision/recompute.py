"""Recompute-safe layer state: what a checkpointed forward used, recorded, and replayed when
activation checkpointing (model/checkpointing.py) runs that forward again in backward.

A quantized linear's forward is not a pure function of its input: it advances its stochastic-rounding
stream, feeds delayed-scaling amaxes and counts telemetry. A recompute that simply ran it again would
draw other SR bits (and shift every later draw, the backward's dY noise included), observe every
amax twice and count telemetry twice: the failures TransformerEngine had (issues #415, #1190).

So each checkpointed region gets a `Region`. Its first forward runs under `recording`: every
stateful layer appends, in call order, a `Call` holding what it used (its SR stream position before
and after, the delayed scales it quantized with). The recompute runs under `replaying`: the layer
takes its next Call, rewinds its SR stream to where the first forward drew, quantizes with the
recorded scales, observes and counts nothing, and puts its stream back where backward had it. The
recomputed saved tensors are then the first forward's, bit for bit. `region_contexts` is the
`context_fn` for torch.utils.checkpoint.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field

import torch


@dataclass
class Call:
    """What one forward of one layer used."""

    sr_start: int
    sr_end: int
    scales: dict[str, torch.Tensor | None] = field(default_factory=dict)
    specs: object = None  # the GemmSpecs the forward ran with (QAF and the monitor change them between steps)


class Region:
    """The calls of one checkpointed region's first forward, per layer in call order."""

    def __init__(self) -> None:
        self._calls: dict[int, deque[Call]] = defaultdict(deque)

    def record(self, layer: object, call: Call) -> None:
        self._calls[id(layer)].append(call)

    def replay(self, layer: object) -> Call:
        calls = self._calls.get(id(layer))
        if not calls:
            raise RuntimeError(f"activation checkpointing: the recompute called {type(layer).__name__} more often "
                               "than the forward did; the region's forward must be deterministic in what it calls")
        return calls.popleft()


_local = threading.local()  # the autograd engine may run a recompute on another thread: state per thread


def _stack() -> list[tuple[Region, str]]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


@contextlib.contextmanager
def _active(region: Region, mode: str):
    stack = _stack()
    stack.append((region, mode))
    try:
        yield
    finally:
        stack.pop()


def region_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """(forward context, recompute context) of a new region: torch.utils.checkpoint's context_fn."""
    region = Region()
    return _active(region, "record"), _active(region, "replay")


def current() -> tuple[Region, str] | None:
    """The innermost region this thread runs in and its mode ("record" or "replay"), or None."""
    stack = _stack()
    return stack[-1] if stack else None
