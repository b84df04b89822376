"""Optimizers and learning-rate schedules."""

from megatron_lowp.optim.adamw import build_optimizer, param_groups
from megatron_lowp.optim.lowp_adamw import LowPrecisionAdamW
from megatron_lowp.optim.schedule import lr_at, planned_qaf_start, qaf_lr_at, qaf_warnings, schedule_warnings

__all__ = ["LowPrecisionAdamW", "build_optimizer", "lr_at", "param_groups", "planned_qaf_start", "qaf_lr_at",
           "qaf_warnings", "schedule_warnings"]
