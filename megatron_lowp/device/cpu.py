"""CPU backend: gloo for collectives, BF16 autocast, FP8 only by emulation."""

from __future__ import annotations

import resource
import sys

import torch

from megatron_lowp.device.base import Capabilities, Device
from megatron_lowp.device.cpu_malloc import set_mmap_threshold


class CPUDevice(Device):
    type = "cpu"
    dist_backend = "gloo"

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            autocast_dtypes=(torch.bfloat16,),
            native_fp8_gemm=False,  # torch has a CPU _scaled_mm, but it is a reference path, not a fast one
            native_fp4_gemm=False,
            fp8_e4m3_max=448.0,
            name="cpu",
        )

    def memory_stats(self) -> dict[str, int]:
        # The CPU allocator keeps no tensor statistics; peak resident set size is the honest number.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak *= 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
        return {"peak_rss": int(peak)}

    def tune_host_allocator(self, mmap_threshold_kib: int | None) -> str | None:
        return set_mmap_threshold(mmap_threshold_kib)
