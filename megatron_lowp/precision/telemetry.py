"""Per-layer numerics telemetry: on chosen steps every quantized linear records, per GEMM role, the
amax it saw and the share of values that were clipped (a block maximum saturated because its rounded
block scale came out a little small: expected, bounded), that overflowed (beyond any scale of the
recipe: delayed, fixed or given scales) or that underflowed (flushed to zero); numerics/stats.py
defines them. Rising overflow on a delayed-scaled role, or underflow on gradients, is how a divergence
shows up before the loss does. Rows go to numerics.jsonl (kind "quant"), one per layer and role."""

from __future__ import annotations

import torch
from torch import nn

from megatron_lowp.precision.quantized_linear import QuantizedLinear


def _quantized(model: nn.Module) -> list[QuantizedLinear]:
    return [m for m in model.modules() if isinstance(m, QuantizedLinear)]


def start_telemetry(model: nn.Module) -> None:
    """From now on every quantization of every quantized linear is counted (same bits as without)."""
    for layer in _quantized(model):
        layer.stats = {}


def telemetry_rows(model: nn.Module, step: int) -> list[dict]:
    """The counts since start_telemetry, as JSON rows; stops counting. One host sync for all layers."""
    layers = [(layer.name, role, s) for layer in _quantized(model) for role, s in (layer.stats or {}).items()]
    for layer in _quantized(model):
        layer.stats = None
    if not layers:
        return []
    keys = ("amax", "clipped", "overflow", "underflow", "nonzero", "numel")
    values = torch.stack([torch.stack([s[k].to(torch.float64) for k in keys]) for _, _, s in layers]).cpu().tolist()
    rows = []
    for (name, role, _), (amax, clipped, over, under, nonzero, numel) in zip(layers, values, strict=True):
        rows.append({"step": step, "kind": "quant", "layer": name, "role": role, "amax": amax,
                     "clipped": clipped / max(numel, 1), "overflow": over / max(numel, 1),
                     "underflow": under / max(nonzero, 1)})
    return rows
