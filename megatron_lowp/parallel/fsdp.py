"""FSDP2 (torch.distributed.fsdp.fully_shard): parameters, gradients and optimizer state sharded
over ranks (dim 0 of every parameter), one FSDP unit per transformer block plus the root (embedding,
LM head). Forward and backward all-gather a block's parameters just before it runs, so the
quantized linears, Smooth-SwiGLU and nGPT see ordinary full tensors; the optimizer and nGPT's weight
normalization act on the sharded DTensors.

Mixed precision: parameters are all-gathered in the recipe's autocast dtype (BF16) and gradients
reduced in FP32 (`parallel.fsdp_param_dtype: fp32` gathers FP32, e.g. to compare exactly with a
single-process run).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from megatron_lowp.parallel.dist import DistInfo
from megatron_lowp.parallel.engine import Engine, EngineCapabilities, OptimizerFactory
from megatron_lowp.parallel.mesh import apply_tensor_parallel


class FSDPEngine(Engine):
    name = "fsdp"
    capabilities = EngineCapabilities(plain_module_gradients=False)

    @classmethod
    def from_config(cls, cfg, module, make_optimizer, device, recipe, info):
        param_dtype = None if cfg.parallel.fsdp_param_dtype == "fp32" else recipe.autocast_dtype
        return cls(module, make_optimizer, info, device.type, param_dtype)

    def __init__(self, module: nn.Module, make_optimizer: OptimizerFactory, info: DistInfo, device_type: str,
                 param_dtype: torch.dtype | None):
        # with tensor parallelism, FSDP shards over the dp dimension of the (dp, tp) mesh
        tp_mesh = apply_tensor_parallel(module, device_type, info)
        mesh = init_device_mesh(device_type, (info.world_size,)) if tp_mesh is None else tp_mesh["dp"]
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for block in module.layers:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        super().__init__(module, make_optimizer, info)  # the optimizer sees the sharded parameters

    def accumulating(self, last: bool):
        self.module.set_requires_gradient_sync(last)
        return super().accumulating(last)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        norm = super().clip_grad_norm(max_norm)  # over both meshes with tensor parallelism
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
