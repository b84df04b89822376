"""Where training numbers go: metrics.jsonl (always; megatron_lowp/run/logs.py), wandb and TensorBoard
(optional)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from megatron_lowp.config.schema import LoggingConfig
from megatron_lowp.errors import UserError
from megatron_lowp.run.logs import JsonlLog


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
