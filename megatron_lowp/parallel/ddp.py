"""DistributedDataParallel: every rank holds the whole model and optimizer; gradients are averaged
with an all-reduce after the last micro-batch of a step (no_sync before it)."""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from megatron_lowp.parallel.dist import DistInfo
from megatron_lowp.parallel.engine import Engine, OptimizerFactory


class DDPEngine(Engine):
    name = "ddp"

    def __init__(self, module: nn.Module, make_optimizer: OptimizerFactory, info: DistInfo, device_ids=None):
        super().__init__(module, make_optimizer, info)
        self.model = DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)

    def accumulating(self, last: bool):
        return super().accumulating(last) if last else self.model.no_sync()
