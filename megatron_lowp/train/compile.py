"""`train.compile: true`: torch.compile of every transformer block (the model contract's `model.layers`).

Each block's forward is compiled in place (same module, same parameter names, same FSDP unit).
Together with activation checkpointing it is refused at config time: measured, a compiled block
under full checkpointing trained on other losses than either the compiled or the checkpointed run,
and under selective checkpointing dynamo broke the graph at every recompute region (docs/compile.md).

A module that declares `compile_opaque = True` runs inside the compiled block as one opaque call
(torch.compiler.disable): the quantized linear does. Traced by dynamo it is a graph break at every
quantization's host sync (the NaN/Inf check, `.item()`), and every function after such a break is
recompiled per operand shape and dtype until dynamo's recompile limit: on the small test model, fp8
measured 72 graph breaks, 67 graphs and a 587 s first step (bf16: 0 breaks, 150 s). Opaque, it costs
one break per linear call; its quantizers are compiled on their own (numerics/cpu_compile.py) and
its GEMMs are single ops either way. What the compiler fuses is the rest of the block: norms, RoPE,
attention, the MLP gating, residual adds (docs/compile.md has the measurements).

`CompileWatch` counts what dynamo did from the moment the blocks were compiled: graphs, graph breaks
and their reasons, and the first step's time (the compile), for the progress display and events.jsonl.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


def _opaque(module: nn.Module) -> None:
    for sub in module.modules():
        if getattr(sub, "compile_opaque", False):
            sub.forward = torch.compiler.disable(sub.forward, recursive=True)


def compile_blocks(model: nn.Module) -> CompileWatch:
    """Compile each block's forward in place; returns the watch that reports on the first step."""
    watch = CompileWatch()
    for block in model.layers:
        _opaque(block)
        block.forward = torch.compile(block.forward)
    return watch


def _counters() -> tuple[Counter, int]:
    from torch._dynamo.utils import counters

    return Counter(counters["graph_break"]), int(counters["stats"]["unique_graphs"])


def _short(reason: str) -> str:
    return " ".join(reason.split("\n")[0].split())[:120]


class CompileWatch:
    def __init__(self) -> None:
        self._breaks, self._graphs = _counters()
        self.reported = False

    def first_step(self, step: int, seconds: float) -> tuple[str, dict]:
        """(a line for the user, an events.jsonl row) about the step that compiled the blocks."""
        breaks, graphs = _counters()
        new = breaks - self._breaks
        self.reported = True
        reasons: Counter = Counter()
        for r, n in new.items():  # reasons that differ only after their first line are one reason
            reasons[_short(r)] += n
        reasons = dict(reasons.most_common())
        note = (f"train.compile: step {step} took {seconds:.1f} s (compiling the blocks); "
                f"{graphs - self._graphs} graphs, {sum(new.values())} graph breaks"
                + (f" ({'; '.join(f'{n}x {r}' for r, n in list(reasons.items())[:3])})" if reasons else ""))
        event = {"step": step, "event": "compile", "first_step_s": seconds, "graphs": graphs - self._graphs,
                 "graph_breaks": sum(new.values()), "graph_break_reasons": reasons}
        return note, event
