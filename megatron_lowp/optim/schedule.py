"""Learning-rate schedules as pure functions of the step: nothing to checkpoint but the step.

- constant: linear warmup, then `lr`.
- cosine:   linear warmup, then cosine from `lr` down to `min_lr` at the last step.
- wsd:      warmup-stable-decay: linear warmup, `lr` held, then a linear decay to `min_lr` over the
            last `decay_fraction` of the steps (the MiniCPM / "scaling laws beyond fixed budgets" form).
Steps are 1-based: step 1 is the first optimizer update.
"""

from __future__ import annotations

import math

from megatron_lowp.config.schema import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    if cfg.warmup_steps and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(total_steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "wsd":
        decay_steps = max(round(cfg.decay_fraction * total_steps), 1)
        decay_start = total_steps - decay_steps
        if step <= decay_start:
            return cfg.lr
        progress = min((step - decay_start) / decay_steps, 1.0)
        return cfg.lr + (cfg.min_lr - cfg.lr) * progress
    raise ValueError(f"unknown schedule {cfg.schedule!r}")
