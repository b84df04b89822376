"""AdamW over FP32 master weights, with weight decay only on matrices (not norms or biases).

optim.moments=fp32 (with FP32 master weights) is torch's AdamW; bf16 / fp8 moments, or
optim.master_weights=fp16_pts, use LowPrecisionAdamW (same update math)."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lowp.config.schema import OptimConfig
from megatron_lowp.errors import UserError
from megatron_lowp.optim.lowp_adamw import LowPrecisionAdamW


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.moments == "fp32" and cfg.moments_rounding == "stochastic":
        raise UserError("optim.moments_rounding: 'stochastic' needs optim.moments=fp8 (fp32 moments are not rounded)")
    if cfg.moments != "fp32" or cfg.master_weights != "fp32":
        return LowPrecisionAdamW(
            param_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.beta1, cfg.beta2),
            eps=cfg.eps,
            moments=cfg.moments,
            moment1_format=cfg.moment1_format,
            moment2_format=cfg.moment2_format,
            rounding=cfg.moments_rounding,
            master_weights=cfg.master_weights,
        )
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
