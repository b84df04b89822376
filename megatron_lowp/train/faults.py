"""Faults a run survives: a scheduler's SIGTERM (preemption).

SIGTERM is what Slurm (before a time limit or preemption), Kubernetes and torchrun (when it stops
its workers) send some seconds before they kill a job. `StopSignals` turns it into a request: the
current step finishes, the loop writes a checkpoint and stops with `Preempted` (exit status 143 and
one line), and the same command resumes bit-exactly. Ranks agree on the request with one tiny MAX
all-reduce per step, so every rank stops after the same step and the checkpoint is collective.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable

import torch

STOP_SIGNALS = (signal.SIGTERM,)


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
