"""Precision recipes: how a run computes, as data the model never inspects.

A `PrecisionRecipe` answers two questions for the rest of the code:
- `make_linear(in_features, out_features, name)`: the module for one linear layer. `name` is the
  layer's path in the model (e.g. "layers.3.attn.qkv", "lm_head"), so a recipe can keep chosen
  layers in high precision. The model calls this factory and nothing else to get a linear.
- `autocast_dtype`: the dtype of autocast regions (BF16 here), or None for plain FP32.
- `mlp_activation`: the MLP gating the model builds: "swiglu", "smooth_swiglu" (per token) or
  "smooth_swiglu_channel" (model/llama.py MLP_ACTIVATIONS).

Recipes register under a name with `@register_recipe("name")`; `precision.recipe` in a YAML recipe
picks one, and `available_recipes()` lists the allowed values for config validation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lowp.errors import UserError


class LinearFactory(Protocol):
    def __call__(self, in_features: int, out_features: int, name: str) -> nn.Module: ...


@dataclass
class PrecisionRecipe:
    name: str
    autocast_dtype: torch.dtype | None
    mlp_activation: str = "swiglu"  # or "smooth_swiglu", "smooth_swiglu_channel" (model/llama.py)

    def make_linear(self, in_features: int, out_features: int, name: str) -> nn.Module:
        """Bias-free linear (Llama has none); quantized recipes return their own module."""
        return Linear(in_features, out_features)


class Linear(nn.Linear):
    """nn.Linear without bias whose forward can fold a per-input-channel scale into the weight's
    columns, x (W diag(col_scale))^T (per-channel Smooth-SwiGLU). The quantized linear takes the
    same argument, so the model calls either the same way."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, col_scale: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if col_scale is None else self.weight * col_scale
        return F.linear(x, weight)


def mlp_activation(p) -> str:
    """The MLP gating that precision settings p (cfg.precision) ask for (model/llama.py MLP_ACTIVATIONS)."""
    if not p.smooth_swiglu:
        return "swiglu"
    return "smooth_swiglu" if p.smooth_swiglu_granularity == "token" else "smooth_swiglu_channel"


_RECIPES: dict[str, Callable[..., PrecisionRecipe]] = {}


def register_recipe(name: str):
    def wrap(builder: Callable[..., PrecisionRecipe]):
        _RECIPES[name] = builder
        return builder

    return wrap


def available_recipes() -> tuple[str, ...]:
    return tuple(sorted(_RECIPES))


def build_recipe(cfg, device) -> PrecisionRecipe:
    """The recipe named by `cfg.precision.recipe`, built for `device` (its capabilities decide
    e.g. whether autocast in BF16 is possible)."""
    name = cfg.precision.recipe
    if name not in _RECIPES:
        raise UserError(f"precision.recipe: '{name}' is not one of {', '.join(available_recipes())}")
    return _RECIPES[name](cfg, device)
