"""What a finished (or running) training run measured, read from its run directory.

Sources: metrics.jsonl (loss, val_loss, tokens/s), numerics.jsonl (gradient-noise ratio, the QAF
switch) and the newest checkpoint's metadata (the optimizer state's bytes, counted from the tensor
shapes and dtypes recorded there, so nothing large is loaded).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from megatron_lowp.errors import UserError
from megatron_lowp.run.checkpoint import CheckpointManager
from megatron_lowp.run.logs import read_jsonl, value
from megatron_lowp.run.run_dir import VALIDATION_JSON
from megatron_lowp.run.safe_load import read_metadata


def state_bytes(checkpoint: Path) -> dict[str, int]:
    """Bytes of the model parameters and of the optimizer state in a checkpoint, and the parameter count."""
    meta = read_metadata(checkpoint)
    out = {"model_params": 0, "optim_bytes": 0}
    for key, item in meta.state_dict_metadata.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        numel = 1
        for size in item.size:
            numel *= size
        nbytes = numel * item.properties.dtype.itemsize
        if key.startswith("model.") and not key.endswith("_extra_state"):
            out["model_params"] += numel
        elif key.startswith("optim.state."):
            out["optim_bytes"] += nbytes
    return out


def read_run_config(run_dir: Path) -> dict:
    """A run's config.yaml as a mapping ({} if absent); anything that is not plain YAML is a UserError."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not a plain YAML recipe ({str(e).splitlines()[0][:200]})") from None
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise UserError(f"{path}: not a recipe (a mapping of sections)")
    return config


def read_validation(run_dir: Path) -> dict | None:
    """The run's validation.json (its validation set's fingerprint and tokenizer), None if absent."""
    path = Path(run_dir) / VALIDATION_JSON
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def run_summary(run_dir: Path, last_train_points: int = 5) -> dict:
    """Final/min losses, throughput, optimizer bytes per parameter and numerics events of one run.
    Train loss: the last logged value (`last_train_loss`) and, since one global batch's loss is
    noisy, the mean of the last `last_train_points` logged values (`mean_train_loss_last_n`)."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    valid = [r for r in rows if "val_loss" in r]
    config = read_run_config(run_dir)
    summary: dict = {"run": run_dir.name, "recipe": (config.get("precision") or {}).get("recipe"),
                     "steps": train[-1]["step"] if train else 0, "tokens": train[-1]["tokens"] if train else 0}
    if train:
        tail = [value(r, "loss") for r in train[-last_train_points:]]
        summary["last_train_loss"] = tail[-1]
        summary["mean_train_loss_last_n"] = sum(tail) / len(tail)
        summary["mean_train_loss_n"] = len(tail)
        # the first logging window holds start-up costs (compilation, allocation): not the steady state
        speeds = [r["tokens_per_s"] for r in train[1:] or train]
        summary["tokens_per_s"] = statistics.median(speeds)
        summary["nan_steps"] = [r["step"] for r in train if not math.isfinite(value(r, "loss"))]
    if valid:
        summary["final_val_loss"] = valid[-1]["val_loss"]
        summary["min_val_loss"] = min(r["val_loss"] for r in valid)
    numerics = read_jsonl(run_dir / "numerics.jsonl")
    noise = [r for r in numerics if r.get("kind") == "grad_noise" and r.get("layer") == "all"]
    if noise:
        summary["grad_noise_ratio_first"] = noise[0]["ratio"]
        summary["grad_noise_ratio_last"] = noise[-1]["ratio"]
    qaf = [r for r in numerics if r.get("event") == "qaf_start"]
    if qaf:
        summary["qaf_start_step"] = qaf[0]["step"]
    summary["validation"] = read_validation(run_dir)
    latest = CheckpointManager(run_dir).latest()
    if latest is not None:
        sizes = state_bytes(latest)
        summary["params"] = sizes["model_params"]
        summary["optim_bytes_per_param"] = sizes["optim_bytes"] / max(sizes["model_params"], 1)
    return summary
