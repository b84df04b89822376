"""Distributed training on existing engines: `parallel.engine: single | ddp | fsdp | deepspeed`.

`build_engine(cfg, module, make_optimizer, device, info)` wraps a built model and makes its optimizer
the engine's way; the training loop only uses the `Engine` interface (parallel/engine.py).
"""

from __future__ import annotations

import importlib

from megatron_lowp.errors import UserError
from megatron_lowp.parallel import dist
from megatron_lowp.parallel.dist import DistInfo, init_distributed
from megatron_lowp.parallel.engine import Engine, OptimizerFactory

# name -> (module, class): the one list of engines (parallel.engine's allowed values come from here)
ENGINE_CLASSES = {
    "single": ("megatron_lowp.parallel.engine", "Engine"),
    "ddp": ("megatron_lowp.parallel.ddp", "DDPEngine"),
    "fsdp": ("megatron_lowp.parallel.fsdp", "FSDPEngine"),
    "deepspeed": ("megatron_lowp.parallel.deepspeed_engine", "DeepSpeedEngine"),
}
ENGINES = tuple(ENGINE_CLASSES)


def engine_class(name: str) -> type[Engine]:
    """The class of engine `name` (its `capabilities` can be read before anything is built)."""
    if name not in ENGINE_CLASSES:
        raise UserError(f"parallel.engine: '{name}' is not one of {', '.join(ENGINES)}")
    module, cls = ENGINE_CLASSES[name]
    return getattr(importlib.import_module(module), cls)


def build_engine(cfg, module, make_optimizer: OptimizerFactory, device, recipe, info: DistInfo) -> Engine:
    return engine_class(cfg.parallel.engine).from_config(cfg, module, make_optimizer, device, recipe, info)


__all__ = ["ENGINES", "ENGINE_CLASSES", "DistInfo", "Engine", "build_engine", "dist", "engine_class", "init_distributed"]
