"""Model architectures. `build_model(cfg.model, recipe)` is the one way to make one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lowp.config.schema import ModelConfig
from megatron_lowp.errors import UserError
from megatron_lowp.model.llama import Llama
from megatron_lowp.model.ngpt import NGPT
from megatron_lowp.precision.recipe import PrecisionRecipe

ARCHS = {"llama": Llama, "ngpt": NGPT}


def build_model(cfg: ModelConfig, recipe: PrecisionRecipe) -> nn.Module:
    # Combinations the schema cannot see field by field; user mistakes, so UserError (one CLI line).
    if cfg.mlp != "swiglu" and cfg.arch != "ngpt":
        raise UserError(f"model.mlp: '{cfg.mlp}' is only implemented for model.arch: ngpt; "
                        f"model.arch: {cfg.arch} allows swiglu")
    if cfg.mlp != "swiglu" and recipe.mlp_activation != "swiglu":
        raise UserError(f"precision.smooth_swiglu rescales the gated branch of a SwiGLU MLP; "
                        f"model.mlp: '{cfg.mlp}' has none (use model.mlp: swiglu or precision.smooth_swiglu: false)")
    return ARCHS[cfg.arch](cfg, recipe.make_linear, recipe.mlp_activation)


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy, computed in FP32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


__all__ = ["ARCHS", "NGPT", "Llama", "build_model", "cross_entropy_loss"]
