"""SwiGLU weight alignment, the FP8 paper's mechanism of late divergence (docs/papers.md §1.3), measured.

Theorem 1 of "Scaling FP8 training to trillion-token LLMs": with weight decay, training drives the
gate row w_gate[i] and the linear ("up") row w_up[i] of an FFN channel i towards alignment,
|cos(w_gate[i], w_up[i])| -> 1. The channel's output silu(w_gate[i].x) * (w_up[i].x) is then
quadratic in x, and once the rows have also grown, that channel produces the down projection's
largest inputs: with a per-tensor scale they set the scale of the whole tensor, and every other
value loses its bits (the paper's plain-FP8 run diverges after ~200B tokens).

Per gated MLP (a module with `gate`, `up` and `down` linears, Llama's SwiGLU or nGPT's) this file
reads:
- `cos`: the cosine of w_gate[i] and w_up[i], per channel (from the weights);
- the max |down input| per channel over the tokens of the forwards it watched (a forward pre-hook
  on `down`: the tensor the down GEMM quantizes, after Smooth-SwiGLU where the recipe has it);
- the outlier ratio of each channel: its max over the median channel's max.

`AlignmentWatch` does this around a training step (precision/lifecycle.py, every
`precision.telemetry_every` steps): rows of kind "alignment" for numerics.jsonl, and a warning when
a channel is both aligned (|cos| >= min_cos) and an outlier (ratio >= min_outlier_ratio); the
thresholds are justified in docs/probe.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _full(weight: torch.Tensor) -> torch.Tensor:
    """The whole weight (FSDP2 shards parameters as DTensors)."""
    return weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every gated MLP: a module with gate, up and down linears."""
    found = []
    for name, m in model.named_modules():
        parts = [getattr(m, k, None) for k in ("gate", "up", "down")]
        if all(isinstance(getattr(p, "weight", None), torch.Tensor) for p in parts):
            found.append((name, m))
    return found


def channel_alignment(w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """cos(w_gate[i], w_up[i]) per FFN channel i (rows are channels: weights are (hidden, d_model))."""
    return F.cosine_similarity(_full(w_gate).detach().float(), _full(w_up).detach().float(), dim=1, eps=1e-12)


class DownInputMax:
    """Max |down input| per FFN channel over every forward while attached (no host sync)."""

    def __init__(self, mlps: list[tuple[str, nn.Module]]):
        self.max: dict[str, torch.Tensor] = {}
        self._handles = [m.down.register_forward_pre_hook(self._hook(name)) for name, m in mlps]

    def _hook(self, name: str):
        def record(module: nn.Module, args) -> None:
            h = args[0].detach()
            channel_max = h.abs().reshape(-1, h.shape[-1]).amax(dim=0).float()
            old = self.max.get(name)
            self.max[name] = channel_max if old is None else torch.maximum(old, channel_max)
        return record

    def detach(self) -> dict[str, torch.Tensor]:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self.max


@dataclass
class AlignmentReading:
    layer: str  # the MLP, e.g. "layers.3.mlp"
    max_cos: float  # the largest |cos(w_gate[i], w_up[i])| over channels
    max_cos_channel: int
    down_input_max: float | None  # the largest |down input| (None: no forward watched)
    down_input_channel: int | None  # the channel it came from
    down_input_cos: float | None  # that channel's cos: the mechanism when close to +-1
    outlier_ratio: float | None  # down_input_max / the median channel's max
    hazard_channel: int | None = None  # the worst channel that is aligned and an outlier (thresholds)
    hazard_cos: float | None = None
    hazard_ratio: float | None = None

    def row(self, step: int) -> dict:
        return {"step": step, "kind": "alignment", **{k: v for k, v in vars(self).items() if not k.startswith("hazard")}}


def alignment_readings(mlps: list[tuple[str, nn.Module]], down_max: dict[str, torch.Tensor],
                       min_cos: float, min_outlier_ratio: float) -> list[AlignmentReading]:
    """One reading per gated MLP; one host sync for all of them."""
    per_layer = []
    for name, m in mlps:
        cos = channel_alignment(m.gate.weight, m.up.weight)
        peak = down_max.get(name)
        if peak is None:
            ratio = torch.full_like(cos, float("nan"))
            peak = torch.full_like(cos, float("nan"))
        else:
            ratio = peak.to(cos.device) / peak.median().clamp_min(torch.finfo(torch.float32).tiny).to(cos.device)
            peak = peak.to(cos.device)
        hazard = (cos.abs() >= min_cos) & (ratio >= min_outlier_ratio)
        per_layer.append(torch.stack([cos, peak, ratio, hazard.float()]).cpu())
    readings = []
    for (name, _), (cos, peak, ratio, hazard) in zip(mlps, per_layer, strict=True):
        watched = not torch.isnan(peak).all()
        c = int(cos.abs().argmax())
        p = int(peak.argmax()) if watched else None
        reading = AlignmentReading(
            layer=name, max_cos=float(cos[c].abs()), max_cos_channel=c,
            down_input_max=float(peak[p]) if watched else None, down_input_channel=p,
            down_input_cos=float(cos[p]) if watched else None, outlier_ratio=float(ratio[p]) if watched else None)
        if hazard.any():
            worst = int(torch.where(hazard > 0, ratio, torch.zeros_like(ratio)).argmax())
            reading.hazard_channel, reading.hazard_cos, reading.hazard_ratio = worst, float(cos[worst]), float(ratio[worst])
        readings.append(reading)
    return readings


class AlignmentWatch:
    """Around one training step: watch the down inputs, then read the alignment of every gated MLP.
    `start(model)` before the step's forwards, `finish(step)` after its backward -> (rows, notes);
    a channel warns (an "event" row, and a note the first time for its layer) when it is aligned and
    an outlier at once."""

    def __init__(self, min_cos: float, min_outlier_ratio: float):
        self.min_cos, self.min_outlier_ratio = min_cos, min_outlier_ratio
        self._mlps: list[tuple[str, nn.Module]] = []
        self._down: DownInputMax | None = None
        self._warned: set[str] = set()

    def start(self, model: nn.Module) -> None:
        self._mlps = gated_mlps(model)
        self._down = DownInputMax(self._mlps) if self._mlps else None

    def finish(self, step: int) -> tuple[list[dict], list[str]]:
        if self._down is None:
            return [], []
        readings = alignment_readings(self._mlps, self._down.detach(), self.min_cos, self.min_outlier_ratio)
        self._down = None
        rows, notes = [r.row(step) for r in readings], []
        for r in readings:
            if r.hazard_channel is None:
                continue
            rows.append({"step": step, "kind": "event", "event": "swiglu_alignment", "layer": r.layer,
                         "channel": r.hazard_channel, "cos": r.hazard_cos, "outlier_ratio": r.hazard_ratio})
            if r.layer not in self._warned:
                self._warned.add(r.layer)
                notes.append(f"step {step}: {r.layer} channel {r.hazard_channel}: gate and up weights aligned "
                             f"(cos {r.hazard_cos:+.2f}) and its down-projection inputs {r.hazard_ratio:.0f}x the "
                             f"median channel's: the FP8 paper's divergence mechanism; consider "
                             f"precision.smooth_swiglu=true or keeping '{r.layer}.down' in high precision "
                             f"(megatron-lowp probe)")
        return rows, notes


__all__ = ["AlignmentReading", "AlignmentWatch", "DownInputMax", "alignment_readings", "channel_alignment",
           "gated_mlps"]
