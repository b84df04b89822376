"""Distributed training on existing engines: `parallel.engine: single | ddp | fsdp | deepspeed`.

`build_engine(cfg, module, make_optimizer, device, info)` wraps a built model and makes its optimizer
the engine's way; the training loop only uses the `Engine` interface (parallel/engine.py).
"""

from __future__ import annotations

from megatron_lowp.errors import UserError
from megatron_lowp.parallel import dist
from megatron_lowp.parallel.dist import DistInfo, init_distributed
from megatron_lowp.parallel.engine import Engine, OptimizerFactory

ENGINES = ("single", "ddp", "fsdp", "deepspeed")


def build_engine(cfg, module, make_optimizer: OptimizerFactory, device, recipe, info: DistInfo) -> Engine:
    name = cfg.parallel.engine
    if name == "single":
        return Engine(module, make_optimizer, info)
    if name == "ddp":
        from megatron_lowp.parallel.ddp import DDPEngine

        ids = [device.torch_device.index] if device.torch_device.index is not None else None
        return DDPEngine(module, make_optimizer, info, device_ids=ids)
    if name == "fsdp":
        from megatron_lowp.parallel.fsdp import FSDPEngine

        param_dtype = None if cfg.parallel.fsdp_param_dtype == "fp32" else recipe.autocast_dtype
        return FSDPEngine(module, make_optimizer, info, device.type, param_dtype)
    if name == "deepspeed":
        from megatron_lowp.parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, module, make_optimizer, info, device)
    raise UserError(f"parallel.engine: '{name}' is not one of {', '.join(ENGINES)}")


__all__ = ["ENGINES", "DistInfo", "Engine", "build_engine", "dist", "init_distributed"]
