"""NVIDIA GPUs: NCCL, BF16 autocast, native FP8 GEMMs from sm89 (Ada/Hopper), FP4 from sm100."""

from __future__ import annotations

import os

import torch

from megatron_lowp.device.base import Capabilities, Device

# Dense (no sparsity) BF16 tensor-core peaks from NVIDIA's datasheets, matched by device name.
PEAK_BF16_FLOPS = (("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("GH200", 989.4e12),
                   ("GB200", 2.5e15), ("B200", 2.25e15), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12))


def peak_bf16_flops(name: str) -> float | None:
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


def cuda_capabilities(compute_capability: tuple[int, int], bf16: bool, name: str) -> Capabilities:
    """FP8 tensor cores arrived with sm89 (Ada) / sm90 (Hopper); FP4 (NVFP4/MX) with sm100 (Blackwell)."""
    major, minor = compute_capability
    sm = 10 * major + minor
    return Capabilities(
        autocast_dtypes=(torch.bfloat16, torch.float16) if bf16 else (torch.float16,),
        native_fp8_gemm=sm >= 89,
        native_fp4_gemm=sm >= 100,
        fp8_e4m3_max=448.0,
        name=name,
        peak_bf16_flops=peak_bf16_flops(name),
    )


class CUDADevice(Device):
    type = "cuda"
    dist_backend = "nccl"

    def __init__(self, index: int = 0):
        super().__init__(index)
        torch.cuda.set_device(index)

    @staticmethod
    def available() -> bool:
        return torch.cuda.is_available()

    @property
    def capabilities(self) -> Capabilities:
        return cuda_capabilities(
            torch.cuda.get_device_capability(self.index),
            torch.cuda.is_bf16_supported(),
            torch.cuda.get_device_name(self.index),
        )

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.index)

    def memory_stats(self) -> dict[str, int]:
        return {
            "allocated": torch.cuda.memory_allocated(self.index),
            "peak_allocated": torch.cuda.max_memory_allocated(self.index),
            "reserved": torch.cuda.memory_reserved(self.index),
        }

    def reset_peak_memory(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.index)

    def set_deterministic(self, enabled: bool) -> None:
        if enabled:
            # cuBLAS needs a fixed workspace to give the same bits run to run.
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = not enabled
        super().set_deterministic(enabled)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)  # seeds every CUDA device as well

    def get_rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state(), "device": torch.cuda.get_rng_state(self.index)}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "device" in state:
            torch.cuda.set_rng_state(state["device"], self.index)
