"""Precision recipes: how a run computes, as data the model never inspects, and the recipe's lifecycle.

A `PrecisionRecipe` answers for the model:
- `make_linear(in_features, out_features, name)`: the module for one linear layer. `name` is the
  layer's path in the model (e.g. "layers.3.attn.qkv", "lm_head"), so a recipe can keep chosen
  layers in high precision. The model calls this factory and nothing else to get a linear.
- `autocast_dtype` / `forward_context(device)`: the compute dtype of forward passes (BF16 autocast
  here, or plain FP32).
- `mlp_activation`: the MLP gating the model builds: "swiglu", "smooth_swiglu" (per token) or
  "smooth_swiglu_channel" (model/llama.py MLP_ACTIVATIONS).

and, for the training loop, its lifecycle: hooks the loop calls on every recipe, in this order,
so that the loop holds no precision-specific code (the baseline's hooks do nothing):

    attach(model, rank)                  once, after the model is built (and before it is wrapped)
    check_engine(name, capabilities)     once, before the engine is built: refuse what it cannot do
    load_state_dict(state)               on resume, with what state_dict() returned at the save
    per optimizer step:
      lr = on_step_start(step, tokens)   an LR that overrides the schedule's (e.g. QAF), or None
      before_step(step, micro_batches, loss_of)   before the micro-batches run (monitors, telemetry)
      after_backward(step)               after the last micro-batch's backward
      after_optimizer_step(reduce_max)   after optimizer.step (delayed-scaling amax commit)
      or on_skipped_step()               when the step's update was dropped (non-finite gradient)
    drain() -> (numerics rows, notes)    what to write to numerics.jsonl (if `quantized`) and to show the user
    log_fields() -> dict                 extra keys for metrics.jsonl rows
    state_dict() -> dict                 JSON-able state saved in every checkpoint's meta.json

Recipes register under a name with `@register_recipe("name")`; `precision.recipe` in a YAML recipe
picks one, and `available_recipes()` lists the allowed values for config validation. A recipe that
needs its package of defaults (configs/precision/<name>.yaml) says so with `needs_package=True`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lowp.errors import UserError


class LinearFactory(Protocol):
    def __call__(self, in_features: int, out_features: int, name: str) -> nn.Module: ...


ReduceMax = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class PrecisionRecipe:
    name: str
    autocast_dtype: torch.dtype | None
    mlp_activation: str = "swiglu"  # or "smooth_swiglu", "smooth_swiglu_channel" (model/llama.py)

    def make_linear(self, in_features: int, out_features: int, name: str) -> nn.Module:
        """Bias-free linear (Llama has none); quantized recipes return their own module."""
        return Linear(in_features, out_features)

    def forward_context(self, device) -> contextlib.AbstractContextManager:
        """The context every forward of this recipe runs in (autocast to autocast_dtype)."""
        return device.autocast(self.autocast_dtype)

    # --- lifecycle (module docstring); the baseline has nothing to do --------------------------------
    # Whether the attached model has quantized layers: such a recipe writes numerics.jsonl
    # (telemetry, monitors, events) and has a QAF phase to plan.
    quantized = False

    def attach(self, model: nn.Module, rank: int) -> None:
        pass

    def check_engine(self, engine: str, capabilities: Any) -> None:
        pass

    def on_step_start(self, step: int, tokens: int) -> float | None:
        return None

    def before_step(self, step: int, micro_batches: Sequence[torch.Tensor],
                    loss_of: Callable[[torch.Tensor], torch.Tensor]) -> None:
        pass

    def after_backward(self, step: int) -> None:
        pass

    def after_optimizer_step(self, reduce_max: ReduceMax | None) -> None:
        pass

    def on_skipped_step(self) -> None:
        pass

    def drain(self) -> tuple[list[dict], list[str]]:
        return [], []

    def log_fields(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Linear(nn.Linear):
    """nn.Linear without bias whose forward can fold a per-input-channel scale into the weight's
    columns, x (W diag(col_scale))^T (per-channel Smooth-SwiGLU). The quantized linear takes the
    same argument, so the model calls either the same way."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self.tp = None  # a LinearShard when tensor-parallel (parallel/tensor_parallel.py sets it)

    def forward(self, x: torch.Tensor, col_scale: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if self.tp is None else self.tp.local_weight(self.weight)
        weight = weight if col_scale is None else weight * col_scale
        return F.linear(x, weight)


def mlp_activation(p) -> str:
    """The MLP gating that precision settings p (cfg.precision) ask for (model/llama.py MLP_ACTIVATIONS)."""
    if not p.smooth_swiglu:
        return "swiglu"
    return "smooth_swiglu" if p.smooth_swiglu_granularity == "token" else "smooth_swiglu_channel"


_RECIPES: dict[str, Callable[..., PrecisionRecipe]] = {}
_NEEDS_PACKAGE: set[str] = set()


def register_recipe(name: str, needs_package: bool = False):
    """Register a recipe builder `builder(cfg, device) -> PrecisionRecipe` under `name`;
    needs_package: its defaults live in configs/precision/<name>.yaml, which must then exist."""
    def wrap(builder: Callable[..., PrecisionRecipe]):
        _RECIPES[name] = builder
        if needs_package:
            _NEEDS_PACKAGE.add(name)
        return builder

    return wrap


def available_recipes() -> tuple[str, ...]:
    return tuple(sorted(_RECIPES))


def recipes_with_packages() -> tuple[str, ...]:
    """Recipes whose package of defaults (configs/precision/<name>.yaml) is part of the recipe."""
    return tuple(sorted(_NEEDS_PACKAGE))


def build_recipe(cfg, device) -> PrecisionRecipe:
    """The recipe named by `cfg.precision.recipe`, built for `device` (its capabilities decide
    e.g. whether autocast in BF16 is possible)."""
    name = cfg.precision.recipe
    if name not in _RECIPES:
        raise UserError(f"precision.recipe: '{name}' is not one of {', '.join(available_recipes())}")
    return _RECIPES[name](cfg, device)
