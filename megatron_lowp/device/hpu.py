"""Intel Gaudi (HPU) through `habana_frameworks.torch`: HCCL, BF16, FP8 GEMMs (E4M3 max 240 on Gaudi2).

Gaudi runs in *lazy* mode (ops are accumulated into a graph that `mark_step` compiles and runs;
the default of Habana's PyTorch) or *eager* mode (`PT_HPU_LAZY_MODE=0`, needed by torch.compile).
The mode must be chosen before `habana_frameworks.torch` is first imported, so we set the
environment variable here, before the import.
"""

from __future__ import annotations

import importlib
import os

import torch

from megatron_lowp.device.base import Capabilities, Device
from megatron_lowp.errors import UserError

HPU_MODES = ("lazy", "eager")


def _import_habana(mode: str):
    if mode not in HPU_MODES:
        raise UserError(f"device.hpu_mode: '{mode}' is not one of {', '.join(HPU_MODES)}")
    os.environ.setdefault("PT_HPU_LAZY_MODE", "1" if mode == "lazy" else "0")
    try:
        # `habana_frameworks` alone can be created by unrelated PyPI packages; `.torch` is the real one.
        core = importlib.import_module("habana_frameworks.torch.core")
        hpu = importlib.import_module("habana_frameworks.torch.hpu")
    except ImportError as e:
        raise UserError(
            "device.type: 'hpu' needs Intel Gaudi's PyTorch bridge (habana_frameworks.torch), "
            f"which is not installed here ({e}). Install the Gaudi software stack "
            "(pip install -e .[hpu] on a Gaudi machine) or pick device.type: auto|cpu."
        ) from None
    return core, hpu


def hpu_available() -> bool:
    try:
        importlib.import_module("habana_frameworks.torch")
    except Exception:  # ImportError, or a broken install that raises something else
        return False
    return bool(torch.hpu.is_available()) if hasattr(torch, "hpu") else False


def hpu_capabilities(name: str) -> Capabilities:
    """Gaudi2's FP8 E4M3 follows IEEE conventions (max 240); Gaudi3 has the OCP E4M3FN (max 448)."""
    return Capabilities(
        autocast_dtypes=(torch.bfloat16,),
        native_fp8_gemm=True,  # Gaudi2 and later
        native_fp4_gemm=False,
        fp8_e4m3_max=240.0 if "GAUDI2" in name.upper() else 448.0,
        name=name,
    )


class HPUDevice(Device):
    type = "hpu"
    dist_backend = "hccl"

    def __init__(self, index: int = 0, mode: str = "lazy"):
        super().__init__(index)
        self.mode = mode
        self._core, self._hpu = _import_habana(mode)

    @property
    def capabilities(self) -> Capabilities:
        return hpu_capabilities(self._hpu.get_device_name(self.index))

    def synchronize(self) -> None:
        self._hpu.synchronize()

    def mark_step(self) -> None:
        if self.mode == "lazy":
            self._core.mark_step()

    def memory_stats(self) -> dict[str, int]:
        stats = self._hpu.memory_stats(self.index)
        return {
            "allocated": int(stats.get("InUse", 0)),
            "peak_allocated": int(stats.get("MaxInUse", 0)),
        }

    def reset_peak_memory(self) -> None:
        self._hpu.reset_peak_memory_stats(self.index)

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)
        self._hpu.random.manual_seed(seed)

    def get_rng_state(self) -> dict[str, torch.Tensor]:
        return {"cpu": torch.get_rng_state(), "device": self._hpu.random.get_rng_state(self.index)}

    def set_rng_state(self, state: dict[str, torch.Tensor]) -> None:
        torch.set_rng_state(state["cpu"])
        if "device" in state:
            self._hpu.random.set_rng_state(state["device"], self.index)
