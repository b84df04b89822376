"""One device abstraction: `get_device("auto" | "cpu" | "cuda" | "hpu")` returns a `Device`.

`auto` picks cuda > hpu > cpu. This package is the only place that knows device type strings.
"""

from __future__ import annotations

import torch

from megatron_lowp.device.base import Capabilities, Device
from megatron_lowp.device.cpu import CPUDevice
from megatron_lowp.device.cuda import CUDADevice
from megatron_lowp.device.hpu import HPU_MODES, HPUDevice, hpu_available
from megatron_lowp.device.kernels import triton_kernels_usable
from megatron_lowp.device.threads import set_cpu_threads
from megatron_lowp.errors import UserError

DEVICE_TYPES = ("auto", "cpu", "cuda", "hpu")

__all__ = [
    "Capabilities",
    "Device",
    "DEVICE_TYPES",
    "HPU_MODES",
    "get_device",
    "resolve_device_type",
    "set_cpu_threads",
    "triton_kernels_usable",
]


def fork_rng(device: torch.device):
    """A block after which the CPU generator and `device`'s own generator are back where they were."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


def resolve_device_type(requested: str) -> str:
    if requested not in DEVICE_TYPES:
        raise UserError(f"device.type: '{requested}' is not one of {', '.join(DEVICE_TYPES)}")
    if requested != "auto":
        return requested
    if CUDADevice.available():
        return "cuda"
    if hpu_available():
        return "hpu"
    return "cpu"


def get_device(requested: str = "auto", index: int = 0, hpu_mode: str = "lazy") -> Device:
    """The `Device` for a config's `device.type`; `index` is the local rank in distributed runs."""
    kind = resolve_device_type(requested)
    if kind == "cuda":
        if not CUDADevice.available():
            raise UserError("device.type: 'cuda' was asked for, but torch sees no CUDA GPU here; use auto or cpu")
        return CUDADevice(index)
    if kind == "hpu":
        return HPUDevice(index, hpu_mode)
    return CPUDevice(index)
