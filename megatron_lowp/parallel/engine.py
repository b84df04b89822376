"""The interface every engine gives the training loop, and the single-process engine.

A step on any engine:
    for i, micro in enumerate(micro_batches):
        with engine.accumulating(last=i == len(micro_batches) - 1):
            engine.backward(loss_of(engine.model, micro) / len(micro_batches))
    norm = engine.clip_grad_norm(max_norm); engine.step()
`engine.model` is what forward runs through (possibly wrapped); `engine.module` is the plain model
(for its own methods: after_optimizer_step, evaluation helpers). The global batch is the same at
any world size: each rank takes global_batch / world_size samples, and the engines average
gradients over ranks. `reduce_max` makes delayed FP8 amaxes global over data-parallel ranks.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from megatron_lowp.parallel import dist, grad_norm
from megatron_lowp.parallel.dist import DistInfo
from megatron_lowp.parallel.mesh import apply_tensor_parallel
from megatron_lowp.parallel.tensor_parallel import sync_sequence_parallel_grads

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class EngineCapabilities:
    """What an engine can do, for the recipe and the loop to check instead of engine names."""

    # torch.autograd.grad on the unwrapped module gives this rank's gradients without side effects
    # (what the gradient-noise monitor needs); FSDP and ZeRO own their parameters' backward.
    plain_module_gradients: bool = True
    # parallel.tp > 1 composes with this engine (parallel/tensor_parallel.py on the mesh's tp dimension)
    tensor_parallel: bool = True


class Engine:
    name = "single"
    capabilities = EngineCapabilities()

    @classmethod
    def from_config(cls, cfg, module: nn.Module, make_optimizer: OptimizerFactory, device, recipe,
                    info: DistInfo) -> Engine:
        """The engine for a run (each engine takes what it needs of the config, device and recipe)."""
        apply_tensor_parallel(module, device.type, info)
        return cls(module, make_optimizer, info)

    def __init__(self, module: nn.Module, make_optimizer: OptimizerFactory, info: DistInfo):
        self.module = module
        self.model: nn.Module = module
        self.info = info
        self.optimizer = make_optimizer(module)

    # --- a training step ----------------------------------------------------------------------
    def accumulating(self, last: bool):
        """Context for one micro-batch's backward; gradients are synchronized only on the last."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to max_norm (inf: only measure); returns the global gradient norm before clipping."""
        if self.info.tp > 1:  # gradients on several meshes
            sync_sequence_parallel_grads(self.module)  # (a no-op without sequence parallelism)
            return grad_norm.clip_grad_norm(self.module.parameters(), max_norm if max_norm > 0 else math.inf)
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm if max_norm > 0 else math.inf)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --- collectives --------------------------------------------------------------------------
    def reduce_max(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce(t.clone(), "max")

    def mean_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return dist.all_reduce(t.clone(), "avg")

    # --- checkpoints (torch.distributed.checkpoint: each rank saves its shards) ----------------
    def state_dict(self) -> dict:
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_state_dict(self, state: dict) -> None:
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def shutdown(self) -> None:
        dist.shutdown()
