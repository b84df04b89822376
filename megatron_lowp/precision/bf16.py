"""The BF16 baseline: BF16 autocast compute, FP32 master weights and Adam moments.

On a device without BF16 autocast the run computes in FP32 and says so, rather than failing.
"""

from __future__ import annotations

import logging

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.precision.recipe import PrecisionRecipe, mlp_activation, register_recipe

log = logging.getLogger(__name__)


@register_recipe("bf16")
def bf16_recipe(cfg, device) -> PrecisionRecipe:
    q = cfg.precision.qaf
    if q.auto or any(v is not None for v in (q.start_step, q.start_tokens, q.start_fraction)):
        raise UserError("precision.qaf: recipe 'bf16' quantizes no linear layer, so there is nothing to finetune "
                        "for; QAF needs a quantized recipe (fp4, fp8, custom)")
    activation = mlp_activation(cfg.precision)
    if cfg.precision.autocast and device.supports_autocast(torch.bfloat16):
        return PrecisionRecipe(name="bf16", autocast_dtype=torch.bfloat16, mlp_activation=activation)
    if cfg.precision.autocast:
        log.warning("%s has no BF16 autocast; the bf16 recipe computes in FP32", device)
    return PrecisionRecipe(name="bf16", autocast_dtype=None, mlp_activation=activation)
