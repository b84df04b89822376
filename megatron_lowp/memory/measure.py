"""The trainer's memory measurement, in the ledger's categories (memory/ledger.py), on any device:

- activations and weight copies: what the first micro-batch of the run's first step saves for
  backward (saved-tensor hooks, memory/saved.py), per layer and role;
- gradients: the .grad tensors after that step's backward; optimizer state: the optimizer's state
  tensors after its update; parameters: the parameters (local shards under FSDP);
- largest transient: where the device's allocator reports a peak (`Device.memory_stats`), that peak
  minus everything above; on the CPU there is no such statistic (its peak RSS is reported instead,
  with a note of what compiling the numerics graphs added to it: memory that is no tensor's).

Written to RUN_DIR/memory.json after the first step, then again at the end with the run's peak.
`megatron-lowp memory RECIPE --measured RUN_DIR` sets it beside the prediction; `compare` shows the
runs' measurements side by side. Measuring changes no number of the run: the hooks return every
saved tensor as it is.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from megatron_lowp.memory.ledger import Ledger
from megatron_lowp.memory.saved import SavedTensors
from megatron_lowp.numerics.cpu_compile import COMPILED

MEMORY_JSON = "memory.json"


def _local(t: torch.Tensor) -> torch.Tensor:
    return getattr(t, "_local_tensor", t)  # a DTensor's shard on this rank


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        local = _local(t)
        key = local.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += local.untyped_storage().nbytes()
    return total


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor))


class MemoryWatch:
    """Measures the first step of a run (the loop calls the three hooks on every step)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device, run_dir: Path,
                 enabled: bool, meta: dict):
        self.model, self.optimizer, self.device = model, optimizer, device
        self.path = Path(run_dir) / MEMORY_JSON
        self.meta = meta
        self.measuring_step: int | None = None  # the step being measured (the first this process runs)
        self.saved: SavedTensors | None = None
        self.stats_before: dict = {}
        self.gradients = 0
        self.record: dict | None = None if enabled else {}  # {}: nothing to measure (logging.memory off, or not rank 0)
        self.enabled = enabled

    def saved_tensors(self, step: int, micro_index: int):
        """Context for one micro-batch's forward and loss: records what it saves on the measured step."""
        if self.record is not None or micro_index != 0:
            return contextlib.nullcontext()
        self.measuring_step = step
        self.stats_before = self.device.memory_stats()  # on the CPU: the peak RSS of start-up, model and data
        self.saved = SavedTensors(self.model)
        return self.saved

    def after_backward(self, step: int) -> None:
        if step == self.measuring_step and self.record is None:
            self.gradients = tensor_bytes(p.grad for p in self.model.parameters() if p.grad is not None)

    def after_step(self, step: int) -> None:
        if step != self.measuring_step or self.record is not None:
            return
        stats = self.device.memory_stats()
        ledger = Ledger.from_saved(
            self.saved.rows, parameters=tensor_bytes(self.model.parameters()), master_weights=0,
            gradients=self.gradients, optimizer_state=optimizer_state_bytes(self.optimizer), largest_transient=None)
        if "peak_allocated" in stats:
            ledger.categories["largest_transient"] = max(0, stats["peak_allocated"] - ledger.total)
        else:
            ledger.notes.append("largest_transient: not measured (the CPU allocator keeps no peak; see peak_rss)")
            if COMPILED["graphs"]:  # host memory that no tensor category holds, and that bf16 does not pay
                ledger.notes.append(
                    f"outside every category: {COMPILED['rss_bytes'] / 2**20:,.1f} MiB of resident memory went to "
                    f"compiling {COMPILED['graphs']} numerics graph(s) (inductor's modules, caches and kernel "
                    "code, measured around their first calls); it is part of peak_rss, once per process")
        self.record = {**self.meta, "step": step, "measured": ledger.as_dict(),
                       "memory_stats_before_first_step": self.stats_before, "memory_stats_first_step": stats,
                       "compiled_numerics": dict(COMPILED)}
        self.saved = None
        self._write()

    def finish(self) -> None:
        if self.enabled and self.record is not None:
            self.record["memory_stats_end"] = self.device.memory_stats()
            self._write()

    def _write(self) -> None:
        if self.enabled:
            from megatron_lowp.run.atomic import write_json_atomic

            write_json_atomic(self.path, self.record)


def read_measured(run_dir: Path) -> dict | None:
    """A run's memory.json, None where absent or unreadable."""
    import json

    try:
        record = json.loads((Path(run_dir) / MEMORY_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("measured"), dict) else None
