"""The BF16 baseline: BF16 autocast compute, FP32 master weights and Adam moments.

On a device without BF16 autocast the run computes in FP32 and says so, rather than failing.
"""

from __future__ import annotations

import logging

import torch

from megatron_lowp.precision.recipe import PrecisionRecipe, mlp_activation, register_recipe

log = logging.getLogger(__name__)


@register_recipe("bf16")
def bf16_recipe(cfg, device) -> PrecisionRecipe:
    activation = mlp_activation(cfg.precision)
    if device.supports_autocast(torch.bfloat16):
        return PrecisionRecipe(name="bf16", autocast_dtype=torch.bfloat16, mlp_activation=activation)
    log.warning("%s has no BF16 autocast; the bf16 recipe computes in FP32", device)
    return PrecisionRecipe(name="bf16", autocast_dtype=None, mlp_activation=activation)
