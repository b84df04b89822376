"""Learning-rate schedules as pure functions of the step: nothing to checkpoint but the step.

- constant: linear warmup, then `lr`.
- cosine:   linear warmup, then cosine from `lr` down to `min_lr` at the last step.
- wsd:      warmup-stable-decay: linear warmup, `lr` held, then a decay to `min_lr` over the last
            `decay_fraction` of the steps, linear or "1-sqrt" (lr scaled by 1 - sqrt(progress), the
            nGPT-NVFP4 paper's runs).
- QAF phase (qaf_lr_at): from the switch step, a linear re-warmup to the QAF peak over
  `qaf.warmup_steps`, then cosine down to `min_lr` at the last step ("FP4 All the Way": LR reset,
  40-step warmup, cosine). The main schedule before the switch is the run's own, unchanged.
Steps are 1-based: step 1 is the first optimizer update.
"""

from __future__ import annotations

import math

from megatron_lowp.config.schema import OptimConfig, QafConfig


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
        shape = progress if cfg.decay_shape == "linear" else math.sqrt(progress)
        return cfg.lr + (cfg.min_lr - cfg.lr) * shape
    raise ValueError(f"unknown schedule {cfg.schedule!r}")


def qaf_lr_at(step: int, start: int, qaf: QafConfig, cfg: OptimConfig, total_steps: int) -> float:
    """The LR of `step` in a QAF phase that began at step `start` (its first step is start)."""
    peak = qaf.lr if qaf.lr is not None else cfg.lr
    k = step - start + 1
    if qaf.warmup_steps and k <= qaf.warmup_steps:
        return peak * k / qaf.warmup_steps
    span = max(total_steps - start + 1 - qaf.warmup_steps, 1)
    progress = min(max(k - qaf.warmup_steps, 0) / span, 1.0)
    floor = min(cfg.min_lr, peak)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))


def planned_qaf_start(qaf: QafConfig, steps: int, tokens_per_step: int) -> int | None:
    """The first QAF step a recipe asks for by step, tokens or fraction (None: never, or by the monitor)."""
    if qaf.start_step is not None:
        return qaf.start_step
    if qaf.start_tokens is not None:  # QAF starts once the trained tokens reach start_tokens
        return math.ceil(qaf.start_tokens / tokens_per_step) + 1
    if qaf.start_fraction is not None:
        return math.floor(qaf.start_fraction * steps) + 1
    return None


def schedule_warnings(cfg: OptimConfig, steps: int) -> list[str]:
    """What a run too short for its schedule would silently get wrong, in words (empty when it fits)."""
    out = []
    if cfg.schedule != "constant" and cfg.warmup_steps >= steps:
        out.append(f"warning: optim.warmup_steps ({cfg.warmup_steps}) >= train.steps ({steps}): the LR warms up "
                   f"and never decays ({cfg.schedule} schedule); raise train.steps or lower optim.warmup_steps")
    if cfg.schedule == "wsd":
        decay_start = steps - max(round(cfg.decay_fraction * steps), 1)
        if decay_start < cfg.warmup_steps:
            out.append(f"warning: the wsd decay (last {steps - decay_start} steps) starts during the warmup "
                       f"({cfg.warmup_steps} steps): the LR never holds at optim.lr")
    return out


def qaf_warnings(cfg: OptimConfig, qaf: QafConfig, steps: int, tokens_per_step: int) -> list[str]:
    """What a QAF phase that does not fit the run would silently get wrong (empty when it fits)."""
    out = []
    start = planned_qaf_start(qaf, steps, tokens_per_step)
    if start is not None and start <= steps:
        left = steps - start + 1
        if left < qaf.warmup_steps:
            out.append(f"warning: QAF starts at step {start} with {left} step{'s' * (left != 1)} left, fewer than "
                       f"precision.qaf.warmup_steps ({qaf.warmup_steps}): its LR never reaches the QAF peak; "
                       "lower precision.qaf.warmup_steps or start QAF earlier")
        if start <= cfg.warmup_steps:
            out.append(f"warning: QAF starts at step {start}, inside the main warmup ({cfg.warmup_steps} steps)")
    return out
