"""The lifecycle of a quantized recipe: what it does around the training steps (hooks of
precision/recipe.py), so the training loop holds no precision-specific code.

- SR ranks (`attach`): every data-parallel rank draws its own stochastic-rounding stream.
- QAF ("FP4 All the Way", docs/papers.md §2.2): a closing phase whose forward stays quantized while
  backward and update run in high precision, from a step, a token count, a fraction of the run, or
  when the gradient-noise monitor asks (`precision.qaf.auto`). `on_step_start` decides the switch
  and returns the LR: the QAF phase's re-warmed cosine, and before it, by default, a main cosine
  that reaches `optim.min_lr` at the last step before QAF (as in the paper, where the main run has
  decayed fully before the finetune; `precision.qaf.main_decay: run` keeps the main cosine over all
  `train.steps` instead).
- The gradient-noise monitor (the sqrt(3) rule, precision/grad_noise.py) every
  `precision.grad_noise.every` steps, on the first micro-batch, on engines whose plain module gives
  this rank's gradients (`check_engine`; tp shards are summed over the tp group in grad_noise.py).
- Per-layer telemetry every `precision.telemetry_every` steps (precision/telemetry.py), with the
  SwiGLU alignment watch (precision/alignment.py): gate/up alignment and down-input outliers per
  layer, and a warning when a channel is both (`precision.alignment_watch`).
- Delayed FP8 scaling: the step's amaxes are committed after the optimizer step (reduced over the
  data-parallel ranks) or dropped when the step was skipped.
Its state in checkpoints is JSON: the QAF start step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from megatron_lowp.errors import UserError
from megatron_lowp.optim.schedule import lr_at, planned_qaf_start, qaf_lr_at, qaf_warnings
from megatron_lowp.precision.alignment import AlignmentWatch
from megatron_lowp.precision.grad_noise import measure_gradient_noise, to_rows
from megatron_lowp.precision.quantized_linear import (
    QuantizedLinear,
    commit_amax_histories,
    discard_amax_observations,
    set_high_precision_backward,
    set_sr_rank,
)
from megatron_lowp.precision.recipe import ReduceMax
from megatron_lowp.precision.telemetry import start_telemetry, telemetry_rows


@dataclass
class LifecycleSettings:
    """What a quantized recipe's lifecycle reads of the run's config (cfg.precision, cfg.optim, cfg.train)."""

    qaf: object  # QafConfig
    grad_noise: object  # GradNoiseConfig
    telemetry_every: int
    optim: object  # OptimConfig
    steps: int
    tokens_per_step: int
    alignment_watch: object = None  # AlignmentWatchConfig

    @classmethod
    def from_config(cls, cfg) -> LifecycleSettings:
        return cls(cfg.precision.qaf, cfg.precision.grad_noise, cfg.precision.telemetry_every, cfg.optim,
                   cfg.train.steps, cfg.train.global_batch_size * cfg.train.seq_len, cfg.precision.alignment_watch)


class QuantizedLifecycle:
    """Lifecycle hooks of quantized recipes (the QuantizedRecipe in precision/quantized.py mixes it in)."""

    settings: LifecycleSettings | None  # None: a recipe built outside training (eval, tests)

    def init_lifecycle(self) -> None:
        """The run-time state (the recipe's __post_init__ calls this)."""
        self._model: nn.Module | None = None
        self.quantized = False  # whether the attached model has quantized linears
        self.qaf_start_step: int | None = None
        self._qaf_requested = False
        self.grad_noise_ratio: float | None = None
        self._monitor_engine = True
        self._rows: list[dict] = []
        self._notes: list[str] = []
        self._telemetry = False
        a = self.settings.alignment_watch if self.settings is not None else None
        self._alignment = AlignmentWatch(a.min_cos, a.min_outlier_ratio) if a is not None else None

    def attach(self, model: nn.Module, rank: int) -> None:
        self._model = model
        self.quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
        set_sr_rank(model, rank)
        q = self.settings.qaf if self.settings else None
        asked = q is not None and (q.auto or any(v is not None for v in (q.start_step, q.start_tokens, q.start_fraction)))
        if asked and not self.quantized:
            raise UserError(f"precision.qaf: recipe '{self.name}' quantizes no linear layer of this model, so there "
                            "is nothing to finetune for; QAF needs quantized layers")
        if self.quantized and self.settings is not None:
            s = self.settings
            self._notes += qaf_warnings(s.optim, s.qaf, s.steps, s.tokens_per_step)

    def check_engine(self, engine: str, capabilities) -> None:
        self._monitor_engine = capabilities.plain_module_gradients
        if self.settings and self.settings.qaf.auto and not self._monitor_engine:
            raise UserError(f"precision.qaf.auto: the gradient-noise monitor needs an engine whose plain module gives "
                            f"this rank's gradients (single, ddp), not {engine}; start QAF by step, tokens or "
                            "fraction instead (precision.qaf.start_step / start_tokens / start_fraction)")
        if self.settings and self.quantized and self.settings.grad_noise.every and not self._monitor_engine:
            # said once, so a missing grad_noise.jsonl row is never a silent surprise
            self._notes.append(f"precision.grad_noise.every = {self.settings.grad_noise.every}: the gradient-noise "
                               f"monitor does not run on {engine} (its module holds no whole gradients); it runs on "
                               "single (with or without parallel.tp) and ddp")

    # --- per step -------------------------------------------------------------------------------
    def _qaf_reason(self, step: int, tokens: int) -> str | None:
        q, s = self.settings.qaf, self.settings
        if q.start_step is not None and step >= q.start_step:
            return f"precision.qaf.start_step = {q.start_step}"
        if q.start_tokens is not None and tokens >= q.start_tokens:
            return f"precision.qaf.start_tokens = {q.start_tokens:,} reached"
        if q.start_fraction is not None and step > math.floor(q.start_fraction * s.steps):
            return f"precision.qaf.start_fraction = {q.start_fraction} of {s.steps} steps"
        if self._qaf_requested:
            return f"gradient-noise ratio {self.grad_noise_ratio:.3g} < {s.grad_noise.threshold:.3g}"
        return None

    def on_step_start(self, step: int, tokens: int) -> float | None:
        s = self.settings
        if s is None or not self.quantized:
            return None
        if self.qaf_start_step is None:
            reason = self._qaf_reason(step, tokens)
            if reason is not None:
                self.qaf_start_step = step
                set_high_precision_backward(self._model, True)
                self._rows.append({"step": step, "kind": "event", "event": "qaf_start", "reason": reason})
                self._notes.append(f"QAF from step {step} ({reason}): forward stays quantized, backward and update "
                                   f"in high precision, LR re-warmed over {s.qaf.warmup_steps} steps")
        if self.qaf_start_step is not None:
            return qaf_lr_at(step, self.qaf_start_step, s.qaf, s.optim, s.steps)
        return self._main_lr(step)

    def _main_lr(self, step: int) -> float | None:
        """Before QAF: the main schedule, ending at the step before a planned QAF start (main_decay: full)."""
        s = self.settings
        start = planned_qaf_start(s.qaf, s.steps, s.tokens_per_step)
        if s.qaf.main_decay != "full" or start is None or start > s.steps:
            return None  # the run's own schedule over train.steps
        return lr_at(step, s.optim, max(start - 1, 1))

    def before_step(self, step: int, micro_batches: Sequence[torch.Tensor],
                    loss_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        s = self.settings
        if s is None or not self.quantized:
            return
        every = s.grad_noise.every
        if every and self.qaf_start_step is None and self._monitor_engine and step % every == 0:
            self._measure_gradient_noise(step, lambda: loss_of(micro_batches[0]))
        self._telemetry = bool(s.telemetry_every) and step % s.telemetry_every == 0
        if self._telemetry:
            start_telemetry(self._model)
            if self._alignment is not None:
                self._alignment.start(self._model)

    def _measure_gradient_noise(self, step: int, loss_fn: Callable[[], torch.Tensor]) -> None:
        g = self.settings.grad_noise
        report = measure_gradient_noise(self._model, loss_fn)
        self.grad_noise_ratio = report.ratio
        self._rows += to_rows(report, step)
        if report.below(g.threshold):
            auto = self.settings.qaf.auto
            action = "starting QAF next step" if auto else "consider QAF (precision.qaf)"
            self._notes.append(f"step {step}: gradient-noise ratio {report.ratio:.3g} fell below {g.threshold:.3g}: "
                               f"FP4 gradients are no longer effective; {action}")
            self._qaf_requested = auto

    def after_backward(self, step: int) -> None:
        if self._telemetry:
            self._rows += telemetry_rows(self._model, step)
            if self._alignment is not None:
                rows, notes = self._alignment.finish(step)
                self._rows += rows
                self._notes += notes
            self._telemetry = False

    def after_optimizer_step(self, reduce_max: ReduceMax | None) -> None:
        if self._model is not None:
            commit_amax_histories(self._model, reduce_max)

    def on_skipped_step(self) -> None:
        if self._model is not None:
            discard_amax_observations(self._model)  # an Inf amax must not set the next scales

    # --- reporting and state --------------------------------------------------------------------
    def drain(self) -> tuple[list[dict], list[str]]:
        rows, notes = self._rows, self._notes
        self._rows, self._notes = [], []
        return rows, notes

    def log_fields(self) -> dict:
        if not self.quantized:
            return {}
        fields = {"qaf": self.qaf_start_step is not None}
        if self.grad_noise_ratio is not None:
            fields["grad_noise_ratio"] = self.grad_noise_ratio
        return fields

    def state_dict(self) -> dict:
        return {"qaf_start_step": self.qaf_start_step}

    def load_state_dict(self, state: dict) -> None:
        start = state.get("qaf_start_step")
        if start is not None and not (isinstance(start, int) and not isinstance(start, bool)):
            raise UserError(f"checkpoint precision state: qaf_start_step must be an integer, got {start!r}")
        self.qaf_start_step = start
        self._rows, self._notes, self._qaf_requested = [], [], False
        if self._model is not None:
            set_high_precision_backward(self._model, start is not None)
