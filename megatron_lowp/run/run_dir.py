"""The run directory: created (or reopened) safely, never deleted, never silently overwritten."""

from __future__ import annotations

import os
import time
from pathlib import Path

from megatron_lowp.config import Config, dump_config
from megatron_lowp.errors import UserError
from megatron_lowp.run.atomic import probe_writable, write_text_atomic
from megatron_lowp.run.checkpoint import MANIFEST, CheckpointManager

VALIDATION_JSON = "validation.json"  # the run's validation set: sequences, fingerprint, tokenizer


def has_results(run_dir: Path) -> bool:
    return (run_dir / "metrics.jsonl").exists() or (run_dir / "checkpoints").exists()


def prepare_run_dir(cfg: Config) -> Path:
    """`<out_dir>/<name>`, created and checked writable; with resume: never, an existing run with
    results is refused, or moved aside to `<name>.old-<time>` when run.overwrite is true."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if cfg.run.resume == "never" and run_dir.exists() and has_results(run_dir):
        if not cfg.run.overwrite:
            raise UserError(
                f"run.resume: never, but {run_dir} already holds a run; pick another run.name, "
                "use run.resume=auto to continue it, or run.overwrite=true to move it aside"
            )
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, aside)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe_writable(run_dir)
    except OSError as e:
        raise UserError(f"run.out_dir: cannot write the run directory {run_dir} ({e.strerror})") from None
    if (run_dir / "checkpoints").exists():
        CheckpointManager(run_dir).check_writable()
    return run_dir


def checkpoint_to_resume(cfg: Config, run_dir: Path, checkpoints: CheckpointManager | None = None) -> Path | None:
    """The checkpoint run.resume asks for: auto, this run's newest complete one; a run directory (or
    its checkpoints/ folder), that run's newest; or a checkpoint directory as given."""
    if cfg.run.resume == "never":
        return None
    if cfg.run.resume == "auto":
        return (checkpoints or CheckpointManager(run_dir)).latest()
    given = Path(cfg.run.resume)
    # A run directory (or its checkpoints/ folder) means: its newest complete checkpoint.
    for candidate_run in (given, given.parent):
        if (candidate_run / "checkpoints").is_dir() and given.name in (candidate_run.name, "checkpoints"):
            latest = CheckpointManager(candidate_run).latest()
            if latest is None:
                raise UserError(f"run.resume: {given} holds no complete checkpoint")
            return latest
    return given


def write_config(run_dir: Path, cfg: Config, resumed_step: int) -> None:
    """config.yaml is what runs now; a differing config from before a resume is kept beside it."""
    path = run_dir / "config.yaml"
    text = dump_config(cfg)
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        os.replace(path, run_dir / f"config.before_step_{resumed_step}.yaml")
    write_text_atomic(path, text)


def find_checkpoint(path: Path) -> Path:
    """A checkpoint directory as given, or a run directory's newest complete checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = CheckpointManager(path).latest() if (path / "checkpoints").is_dir() else None
    if latest is None:
        raise UserError(f"{path}: neither a checkpoint directory nor a run directory with a complete checkpoint")
    return latest
