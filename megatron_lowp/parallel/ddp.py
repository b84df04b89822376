"""DistributedDataParallel: every rank holds the whole model and optimizer; gradients are averaged
with an all-reduce after the last micro-batch of a step (no_sync before it)."""

from __future__ import annotations

import inspect

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megatron_lowp.parallel.dist import DistInfo
from megatron_lowp.parallel.engine import Engine, EngineCapabilities, OptimizerFactory

# Buffers need no sync before each forward: our only ones are the RoPE tables, the same on every rank.
# torch 2.13 deprecates `broadcast_buffers` (a FutureWarning on every rank) for `forward_sync_buffers`,
# which also syncs buffers once at init: a no-op copy for identical tables. Older torch has only the first.
NO_BUFFER_SYNC = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                  else "broadcast_buffers")


class DDPEngine(Engine):
    name = "ddp"
    # DDP all-reduces whole local gradients and knows no DTensor shards: no tensor parallelism
    capabilities = EngineCapabilities(tensor_parallel=False)

    @classmethod
    def from_config(cls, cfg, module, make_optimizer, device, recipe, info):
        ids = [device.torch_device.index] if device.torch_device.index is not None else None
        return cls(module, make_optimizer, info, device_ids=ids)

    def __init__(self, module: nn.Module, make_optimizer: OptimizerFactory, info: DistInfo, device_ids=None):
        super().__init__(module, make_optimizer, info)
        self.model = DistributedDataParallel(module, device_ids=device_ids, **{NO_BUFFER_SYNC: False})

    def accumulating(self, last: bool):
        return super().accumulating(last) if last else self.model.no_sync()
