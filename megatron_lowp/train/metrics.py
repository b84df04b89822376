"""Where training numbers go: metrics.jsonl (always), wandb and TensorBoard (optional).

metrics.jsonl holds one JSON object per logged step. On resume the lines after the resumed step are
dropped first (they belong to work the checkpoint does not hold and that is about to be redone), so
the file never has duplicated or missing steps. The rewrite is atomic.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

from megatron_lowp.config.schema import LoggingConfig
from megatron_lowp.errors import UserError
from megatron_lowp.train.checkpoint import write_text_atomic


def read_metrics(path: Path) -> list[dict]:
    """Every complete JSON line of a metrics file (a torn last line from a crash is skipped)."""
    rows = []
    if not Path(path).is_file():
        return rows
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


class JsonlLog:
    """An append-only JSON-lines file of step rows. Opening it for a run resumed at `resumed_step`
    first drops (atomically) the rows of later steps: work the checkpoint does not hold, about to be
    redone, so no step is ever duplicated or missing."""

    def __init__(self, path: Path, resumed_step: int):
        self.path = Path(path)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resumed_step]
        self.earlier_rows = kept  # what the run logged before this resume
        if self.path.exists():
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def truncate(self, step: int) -> None:
        """Drop the rows after `step` (a rollback redoes them)."""
        self._file.close()
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, rows: list[dict[str, Any]]) -> None:
        self._file.write("".join(json.dumps(r) + "\n" for r in rows))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullLog:
    """The logs of ranks other than 0: they train but do not write."""

    earlier_rows: list[dict] = []

    def log(self, row: dict[str, Any]) -> None:
        pass

    def write(self, rows: list[dict[str, Any]]) -> None:
        pass

    def truncate(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsLog:
    def __init__(self, run_dir: Path, resumed_step: int, cfg: LoggingConfig, run_name: str, config: dict):
        self._jsonl = JsonlLog(Path(run_dir) / "metrics.jsonl", resumed_step)
        self.path, self.earlier_rows = self._jsonl.path, self._jsonl.earlier_rows
        self._wandb = _start_wandb(cfg, Path(run_dir), run_name, config) if cfg.wandb.enabled else None
        self._tb = _start_tensorboard(Path(run_dir)) if cfg.tensorboard else None

    def truncate(self, step: int) -> None:
        self._jsonl.truncate(step)

    def log(self, row: dict[str, Any]) -> None:
        self._jsonl.write([row])
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._wandb is not None:
            self._wandb.log(scalars, step=row["step"])
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _start_wandb(cfg: LoggingConfig, run_dir: Path, run_name: str, config: dict):
    try:
        import wandb
    except ImportError:
        raise UserError("logging.wandb.enabled: true needs the wandb package (pip install -e .[wandb])") from None
    # A stable id kept in the run directory lets a resumed run continue the same wandb run.
    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(
        project=cfg.wandb.project,
        entity=cfg.wandb.entity,
        name=run_name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=cfg.wandb.mode,
        config=config,
    )


def _start_tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logging.tensorboard: true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
