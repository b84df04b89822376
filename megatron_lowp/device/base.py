"""The device interface every other module talks to.

Nothing outside `megatron_lowp/device/` names a device type string or touches `torch.cuda` /
`habana_frameworks`: the trainer, the numerics and the engines ask a `Device` instead. A backend
answers four kinds of question: what it is (type, torch.device, distributed backend), what it can
do (`Capabilities`: autocast dtypes, native FP8/FP4 GEMMs, the E4M3 maximum), how to order work
(synchronize, mark_step for lazy graphs), and what state it holds (memory stats, RNG state).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Capabilities:
    """What the hardware does natively; recipes read this to pick GEMM backends."""

    autocast_dtypes: tuple[torch.dtype, ...]
    native_fp8_gemm: bool
    native_fp4_gemm: bool
    fp8_e4m3_max: float  # 448 for OCP E4M3FN (CUDA/CPU); 240 for Gaudi2's IEEE-like E4M3
    name: str  # human-readable device name for logs and benchmark tables
    peak_bf16_flops: float | None = None  # dense BF16 tensor-core peak (FLOP/s) for MFU; None: unknown


class Device:
    """One accelerator (or the CPU) as the rest of the package sees it."""

    type: str = ""
    dist_backend: str = ""

    def __init__(self, index: int = 0):
        self.index = index

    # --- identity -----------------------------------------------------------------------------
    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.type, self.index)

    @property
    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def supports_autocast(self, dtype: torch.dtype) -> bool:
        return dtype in self.capabilities.autocast_dtypes

    def autocast(self, dtype: torch.dtype | None):
        """Autocast context for `dtype`, or a no-op when dtype is None / float32."""
        if dtype is None or dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=dtype)

    # --- ordering -----------------------------------------------------------------------------
    def synchronize(self) -> None:
        """Block until queued work is done (for honest timings)."""

    def mark_step(self) -> None:
        """Cut the lazy graph (Gaudi lazy mode); a no-op on eager devices."""

    # --- memory -------------------------------------------------------------------------------
    def tune_host_allocator(self, mmap_threshold_kib: int | None) -> str | None:
        """Set how host memory that holds this device's tensors is returned (the CPU's malloc); a
        line for the log, or None. Accelerators keep their tensors in their own allocator."""
        return None

    def memory_stats(self) -> dict[str, int]:
        """Bytes: `allocated`, `peak_allocated` (since the last reset) where the device tracks them."""
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        pass

    # --- randomness ---------------------------------------------------------------------------
    def set_deterministic(self, enabled: bool) -> None:
        """Deterministic kernels where torch has them (warn, not fail, where it has none)."""
        torch.use_deterministic_algorithms(enabled, warn_only=True)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self) -> dict[str, torch.Tensor]:
        """Every RNG state that affects this device's computation, as uint8 tensors."""
        return {"cpu": torch.get_rng_state()}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.torch_device}, {self.capabilities.name})"
