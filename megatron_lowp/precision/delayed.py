"""Delayed FP8 scaling for a quantized linear: the scale a role uses in a step comes from the amaxes
of earlier optimizer steps, as in the FP8 paper's reference (and TransformerEngine's DelayedScaling).

Per role with ``amax_history = N``:
- during a training step every quantization of that role *observes* its amax; the step's amax is
  the max over all its micro-batches (`observe`);
- after the optimizer step `commit` reduces that amax (e.g. max over data-parallel ranks, through
  the `reduce_max` the engine passes) and pushes it into an N-long history;
- the scale for the following steps is fmt_max / max(history) (power of two if the role asks).
Before the first commit there is no history and the role uses current scaling, rather than the
reference's unscaled first step (scale 1 overflows E4M3 as soon as |x| > 448).
Evaluation forwards do not observe, so they never move the scales; the histories are part of the
layer's state_dict, so a resumed run continues with the scales it had, not from scratch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_lowp.numerics import AmaxHistory, amax
from megatron_lowp.precision.spec import QuantSpec

ReduceMax = Callable[[torch.Tensor], torch.Tensor]


class DelayedScaling:
    def __init__(self, specs: dict[str, QuantSpec], fmt_max: dict[str, float]):
        self.specs = specs
        self.fmt_max = fmt_max
        self.histories = {role: AmaxHistory(spec.amax_history) for role, spec in specs.items()}
        self.pending: dict[str, torch.Tensor] = {}
        self.commits = 0  # optimizer steps whose amaxes reached the histories

    def scale(self, role: str) -> torch.Tensor | None:
        """The delayed scale for role, or None before the first commit (use current scaling)."""
        if self.commits == 0:
            return None
        power_of_two = self.specs[role].kwargs().get("power_of_two", False)
        return self.histories[role].scale(self.fmt_max[role], power_of_two)

    def observe(self, role: str, t: torch.Tensor) -> None:
        a = amax(t)
        self.pending[role] = a if role not in self.pending else torch.maximum(self.pending[role], a)

    def commit(self, reduce_max: ReduceMax | None = None) -> None:
        if not self.pending:
            return
        for role, a in self.pending.items():
            self.histories[role].update(reduce_max(a) if reduce_max is not None else a)
        self.pending = {}
        self.commits += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"commits": torch.tensor(self.commits, dtype=torch.int64)}
        for role, history in self.histories.items():
            state[f"{role}.history"] = history.history.clone()
            state[f"{role}.index"] = torch.tensor(history.index, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.commits = int(state["commits"])
        for role, history in self.histories.items():
            history.load_state_dict({"history": state[f"{role}.history"], "index": int(state[f"{role}.index"])})
        self.pending = {}
