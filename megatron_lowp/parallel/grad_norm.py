"""Global gradient-norm clipping when gradients live on several meshes (tp-sharded DTensors, FSDP's
dp-sharded DTensors, 2-D ones, and plain tensors replicated on every rank).

Each rank sums the squares of its local pieces; a piece that n_copies ranks hold identically is
weighted 1 / n_copies, and one all-reduce over the world gives the norm of the global gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor

from megatron_lowp.parallel import dist


def _copies(g: torch.Tensor, world_size: int) -> int:
    """How many ranks hold this rank's piece of g (the rest of the world holds other pieces)."""
    if not isinstance(g, DTensor):
        return world_size
    assert not any(p.is_partial() for p in g.placements), g.placements  # gradients are reduced by now
    # Shard and FSDP's _StridedShard (which is no Shard subclass) both split: all but Replicate
    pieces = math.prod(g.device_mesh.size(i) for i, p in enumerate(g.placements) if not p.is_replicate())
    return world_size // pieces


def clip_grad_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to max_norm (inf: only measure); returns the global norm before clipping (a tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    world = dist.world_size()
    total = torch.zeros((), dtype=torch.float32)
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        total = total.to(local.device) + local.detach().float().pow(2).sum() / _copies(g, world)
    norm = dist.all_reduce(total, "sum").sqrt()
    if math.isfinite(max_norm):
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.device))
    return norm
