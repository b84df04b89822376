"""Faults a run survives: non-finite steps, loss spikes, hung or dead ranks, and a scheduler's SIGTERM.

- Non-finite steps (`NonFiniteSteps`): a step whose gradient norm is NaN/Inf is handled by
  `train.nan_policy`: skip its update (counted), roll back to the last checkpoint and skip that
  global batch's data from then on (every bad batch found so far stays skipped, across rollbacks and
  in checkpoints), or stop. More than `train.max_nonfinite_steps` in a row stops.
- Loss spikes (`LossSpikes`): a loss above `train.loss_spike_factor` x its running mean (after 20
  steps) is an event in events.jsonl.
- Hung ranks (`Heartbeats`): each rank notes the step it starts, so a collective timeout can name
  the rank that fell behind.
- SIGTERM (`StopSignals`): what Slurm (before a time limit or preemption), Kubernetes and torchrun
  (when it stops its workers) send some seconds before they kill a job. It becomes a request: the
  current step finishes, the loop writes a checkpoint and stops with `Preempted` (exit status 143
  and one line), and the same command resumes bit-exactly. Ranks agree on the request with one tiny
  MAX all-reduce per step, so every rank stops after the same step and the checkpoint is collective.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from megatron_lowp.errors import UserError

HEARTBEATS = ".heartbeats"  # in the run directory: one small file per rank, the step it last started
STOP_SIGNALS = (signal.SIGTERM,)


class NonFiniteSteps:
    """train.nan_policy's bookkeeping: counters and the skip list (both saved in checkpoints)."""

    def __init__(self, policy: str, max_in_a_row: int):
        self.policy, self.max_in_a_row = policy, max_in_a_row
        self.skipped_steps = 0  # updates skipped for a non-finite gradient
        self.skip_batches: set[int] = set()  # sample positions of global batches a rollback marked bad
        self.in_a_row = 0

    def finite(self) -> None:
        self.in_a_row = 0

    def action(self, step: int, loss: float, norm: float, latest: Path | None) -> tuple[str, dict]:
        """What to do with non-finite step `step`: ("skip" | "rollback", event); raises UserError to stop."""
        self.skipped_steps += 1
        self.in_a_row += 1
        event = {"step": step, "event": "nonfinite", "loss": loss, "grad_norm": norm, "action": self.policy}
        where = f"the last checkpoint is {latest}" if latest else "no checkpoint has been written yet"
        if self.policy == "stop" or self.in_a_row > self.max_in_a_row:
            reason = ("train.nan_policy is stop" if self.policy == "stop"
                      else f"{self.in_a_row} non-finite steps in a row > train.max_nonfinite_steps")
            raise StopForNonFinite({**event, "action": "stop"},
                                   f"step {step}: non-finite gradient norm ({norm}), loss {loss}; stopping ({reason}); "
                                   f"{where}")
        if self.policy == "rollback" and latest is None:
            raise StopForNonFinite({**event, "action": "stop"},
                                   f"step {step}: non-finite gradient norm ({norm}); train.nan_policy is rollback but "
                                   "no checkpoint has been written yet")
        return self.policy, event

    def state(self) -> dict:
        return {"skipped_steps": self.skipped_steps, "skip_batches": sorted(self.skip_batches)}


class StopForNonFinite(UserError):
    """The run stops on a non-finite step; `event` goes to events.jsonl first."""

    def __init__(self, event: dict, message: str):
        super().__init__(message)
        self.event = event


class LossSpikes:
    """A loss above factor x the running mean of the losses before it (after 20 steps) is a spike."""

    def __init__(self, factor: float):
        self.factor = factor
        self.mean: float | None = None
        self.count = 0

    def observe(self, step: int, loss: float) -> dict | None:
        event = None
        if self.mean is not None and self.count >= 20 and loss > self.factor * self.mean:
            event = {"step": step, "event": "loss_spike", "loss": loss, "running_mean": self.mean}
        self.count += 1
        weight = 0.05 if self.count > 20 else 1 / self.count
        self.mean = loss if self.mean is None else (1 - weight) * self.mean + weight * loss
        return event


class Heartbeats:
    def __init__(self, run_dir: Path, rank: int, world_size: int):
        self.dir, self.rank, self.world_size = Path(run_dir) / HEARTBEATS, rank, world_size

    def beat(self, step: int) -> None:
        """This rank starts `step`."""
        self.dir.mkdir(exist_ok=True)
        (self.dir / f"rank{self.rank}").write_text(f"{step} {time.time():.0f}\n")

    def behind(self) -> str:
        """From the ranks' heartbeats (their last started step): which ranks fell behind."""
        beats = {}
        for r in range(self.world_size):
            try:
                beats[r] = int((self.dir / f"rank{r}").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                beats[r] = -1
        late = [r for r, step in beats.items() if step < max(beats.values())]
        if not late:
            return "every rank started the same step, so one is stuck inside it"
        return ", ".join(f"rank {r} (last started step {beats[r]})" for r in late)


def is_collective_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or "timed out" in text or "timeout" in text


class StopSignals:
    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def requested(self, reduce_max: Callable[[torch.Tensor], torch.Tensor] | None, device: torch.device) -> bool:
        """True on every rank if any rank received a stop signal (a collective when reduce_max is given)."""
        flag = torch.tensor(0.0 if self.received is None else float(self.received), device=device)
        if reduce_max is not None:
            flag = reduce_max(flag)
        value = int(flag.item())
        if value and self.received is None:
            self.received = value
        return bool(value)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "signal"
