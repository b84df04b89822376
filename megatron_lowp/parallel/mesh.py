"""The (dp, tp) device mesh of a run, and applying tensor parallelism to a built model."""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatron_lowp.parallel.dist import DistInfo


def device_mesh(device_type: str, info: DistInfo) -> DeviceMesh:
    """Ranks as a dp x tp grid, row-major: a tp group is tp consecutive ranks (one node's GPUs first)."""
    return init_device_mesh(device_type, (info.dp_size, info.tp), mesh_dim_names=("dp", "tp"))


def apply_tensor_parallel(module: nn.Module, device_type: str, info: DistInfo) -> DeviceMesh | None:
    """Split `module`'s blocks over the tp dimension (in place); the mesh, or None when tp is 1."""
    if info.tp == 1:
        return None
    from megatron_lowp.parallel.tensor_parallel import parallelize

    mesh = device_mesh(device_type, info)
    parallelize(module, mesh["tp"], info.sequence_parallel)
    return mesh
