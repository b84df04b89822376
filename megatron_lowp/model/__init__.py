"""Model architectures. `build_model(cfg.model, recipe)` is the one way to make one."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lowp.config.schema import ModelConfig
from megatron_lowp.model.llama import Llama
from megatron_lowp.precision.recipe import PrecisionRecipe

ARCHS = {"llama": Llama}


def build_model(cfg: ModelConfig, recipe: PrecisionRecipe) -> nn.Module:
    return ARCHS[cfg.arch](cfg, recipe.make_linear, recipe.mlp_activation)


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy, computed in FP32 whatever the logits' dtype."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


__all__ = ["ARCHS", "Llama", "build_model", "cross_entropy_loss"]
