"""The process group: who am I (rank, world size, local rank) and the few collectives the trainer
needs. Every function also works without torch.distributed initialized (one process: rank 0 of 1),
so single-process code calls them unconditionally.

torchrun, srun+torchrun and the deepspeed launcher all export RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `init_distributed` reads them. The backend comes from the device
(NCCL on CUDA, HCCL on Gaudi, gloo on CPU). A collective that waits longer than `timeout_s` (a rank
died or hangs) raises instead of hanging the job.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_lowp.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp: int = 1  # ranks laid out as a (dp, tp) mesh, row-major: rank = dp_rank * tp + tp_rank
    sequence_parallel: bool = False  # tp > 1: activations between the blocks split along the sequence

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # The data-parallel position: ranks of one tp group read the same samples.
    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def dp_size(self) -> int:
        return self.world_size // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp


def env_info() -> DistInfo:
    """Rank, world size and local rank from the launcher's environment (defaults: one process)."""
    try:
        return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as e:
        raise UserError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers ({e})") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str, timeout_s: float, need_group: bool = False) -> DistInfo:
    """Join the process group the launcher set up (no-op if already joined). One process joins a
    group of one only if `need_group` (the ddp/fsdp/deepspeed engines use collectives even then,
    e.g. to resume a 2-rank FSDP checkpoint in one process)."""
    info = env_info()
    if info.world_size == 1 and need_group and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if (info.world_size > 1 or need_group) and not dist.is_initialized():
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise UserError(f"WORLD_SIZE={info.world_size} but {key} is not set: start the job with torchrun, "
                                "srun + torchrun or the deepspeed launcher (see launch/)")
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    return info


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if initialized():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (op: sum, max, avg); returns t."""
    if initialized():
        if op == "avg":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        else:
            dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


def broadcast_object(obj, src: int = 0):
    """`obj` from rank `src` on every rank (a small Python object: a path, a decision)."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    """Leave the process group cleanly (gloo workers abort at exit otherwise)."""
    if initialized():
        dist.barrier()
        dist.destroy_process_group()
