"""The sqrt(3) rule of "FP4 All the Way": how large the gradient is against the noise that the
quantized backward adds to it.

With stochastic rounding the quantized gradient is g_q = grad L + n, where n is zero-mean noise of
per-coordinate std sigma_q. The paper's analysis of a step -eta * g_q finds that FP4 gradients stop
helping once the per-coordinate gradient ||grad L|| / sqrt(d) falls below sqrt(3) * sigma_q, so we
monitor

    r = ||grad L|| / (sigma_q * sqrt(d))        (switch backward/update to high precision, QAF, below sqrt(3))

Estimator, on one monitoring micro-batch:

1. the same quantized forward runs twice; the first time the parameter gradients are taken with the
   model's quantized backward (g_q), the second time inside `high_precision_backward(model)`, which
   keeps the forward's quantization and runs every dgrad and wgrad in high precision (g_hp);
2. n = g_q - g_hp is the whole noise the update sees: the wgrad's own quantization plus the dgrad
   noise propagated from later layers. SR noise is zero-mean, so sigma_q^2 = mean(n^2), the second
   moment (a backward role rounded to nearest, like the paper's Q_RtN(W^T) in dgrad, adds a fixed
   error instead, which this counts as noise too);
3. ||grad L|| is estimated by ||g_hp||, hence r = ||g_hp|| / (rms(n) sqrt(d)) = ||g_hp|| / ||n||,
   per parameter tensor and over all monitored parameters (sums of squares over all of them).

One draw of n estimates sigma_q well because d is large (every coordinate is a sample). But g_hp is
one micro-batch's gradient: an estimate of grad L that also carries the batch's sampling noise, so
near convergence it overstates ||grad L|| (r reads high) and single readings fluctuate; compare
readings over several measurements, not one.

Both passes start from the same state: each layer's SR stream position and pending delayed-scaling
amaxes, and the RNG, are rewound before each pass and restored at the end (per-role telemetry is
paused meanwhile), so the forwards are
identical (even with SR or dropout in the forward) and the monitor leaves no trace on training: the
next step draws the SR noise it would have drawn without it, and if it runs on the same micro-batch
its gradient carries exactly the noise measured here. Gradients come from `torch.autograd.grad`, so
`.grad` (and gradient accumulation) is untouched. Under DistributedDataParallel call it on the
wrapped module (`ddp.module`) so no all-reduce hook fires; readings are then per rank. Under tensor
parallelism (DTensor parameters sharded on a 1-D tp mesh) the readings are the global gradient's:
the shards' sums of squares are added over the tp group, and a tensor every rank holds whole (the
LM head) counts once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from megatron_lowp.device import fork_rng
from megatron_lowp.precision.quantized_linear import QuantizedLinear, high_precision_backward


@dataclass
class GradNoiseReport:
    ratio: float  # overall ||g|| / (sigma_q sqrt(d)) over the monitored parameters (inf where the noise is 0)
    per_layer: dict[str, float] = field(default_factory=dict)  # parameter name -> its ratio (inf: noise exactly 0)
    grad_rms: float = 0.0  # ||g_hp|| / sqrt(d)
    noise_std: float = 0.0  # sigma_q = ||g_q - g_hp|| / sqrt(d)
    params: int = 0  # d, the number of monitored coordinates

    def below(self, threshold: float) -> bool:
        """True when the gradient has sunk into the quantization noise (the paper: threshold sqrt(3))."""
        return self.ratio < threshold


def _ratio(grad_sq: float, noise_sq: float) -> float:
    return math.inf if noise_sq == 0 else math.sqrt(grad_sq / noise_sq)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _squares(tensors: Sequence[Tensor], norms: Tensor) -> Tensor:
    """Squares (float64, on the CPU) of the per-tensor norms `norms` (rows: this rank's pieces). With
    DTensors among `tensors`: the global tensors', summed over their tp group, each piece weighted by
    1 / the number of ranks holding it."""
    mesh = next((t.device_mesh for t in tensors if isinstance(t, DTensor)), None)
    if mesh is None:
        return norms.cpu().double().square()
    if mesh.ndim != 1:
        raise ValueError(f"noise_ratio: gradients on a {mesh.ndim}-D mesh; the monitor sums over one tp group")
    size = mesh.size()
    copies = [size if not isinstance(t, DTensor) or t.placements[0].is_replicate() else 1 for t in tensors]
    sq = norms.double().square() / torch.tensor(copies, dtype=torch.float64, device=norms.device).unsqueeze(1)
    dist.all_reduce(sq, group=mesh.get_group())
    return sq.cpu()


def noise_ratio(g_hp: Sequence[Tensor], g_q: Sequence[Tensor], names: Sequence[str]) -> GradNoiseReport:
    """The estimator: g_hp the high-precision-backward gradients, g_q the quantized-backward ones
    (same forward), one tensor per name (tensor-parallel DTensors: their global tensors). Reduces on
    the tensors' devices, then syncs once."""
    if not len(g_hp) == len(g_q) == len(names):
        raise ValueError(f"noise_ratio: {len(g_hp)} g_hp, {len(g_q)} g_q and {len(names)} names differ in number")
    if not names:
        return GradNoiseReport(ratio=math.inf)
    sums = []
    home = g_hp[0].device
    for name, hp, q in zip(names, g_hp, g_q, strict=True):
        if hp.shape != q.shape:
            raise ValueError(f"noise_ratio: {name}: g_hp {tuple(hp.shape)} and g_q {tuple(q.shape)} differ in shape")
        hp32 = _local(hp).detach().float()
        noise = _local(q).detach().float() - hp32
        # Norms in float32 (fine for a monitor, and every backend has it), squared later in float64.
        sums.append(torch.stack([torch.linalg.vector_norm(hp32), torch.linalg.vector_norm(noise)]).to(home))
    squares = _squares(g_hp, torch.stack(sums)).tolist()  # the one host sync
    grad_sq = [g for g, _ in squares]
    noise_sq = [n for _, n in squares]
    d = sum(t.numel() for t in g_hp)  # a DTensor's numel is its global tensor's
    total_g, total_n = math.fsum(grad_sq), math.fsum(noise_sq)
    return GradNoiseReport(
        ratio=_ratio(total_g, total_n),
        per_layer={name: _ratio(g, n) for name, g, n in zip(names, grad_sq, noise_sq, strict=True)},
        grad_rms=math.sqrt(total_g / d) if d else 0.0,
        noise_std=math.sqrt(total_n / d) if d else 0.0,
        params=d,
    )


def monitored_parameters(model: nn.Module, only_quantized: bool = True) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) pairs the monitor measures: the weights of the quantized linears, or every
    parameter with requires_grad."""
    if not only_quantized:
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [(f"{name}.weight" if name else "weight", m.weight) for name, m in model.named_modules()
            if isinstance(m, QuantizedLinear) and m.weight.requires_grad]


@dataclass
class _LayerState:
    """What a quantized linear carries between steps that a measurement pass would move."""

    module: QuantizedLinear
    sr: dict[str, int]
    pending: dict | None  # delayed scaling: this step's observed amaxes, not yet committed
    stats: dict | None  # per-role telemetry being gathered this step (layers that have it)

    def rewind(self, measuring: bool) -> None:
        self.module.sr.load_state_dict(self.sr)
        if self.pending is not None:
            self.module.delayed.pending = dict(self.pending)
        if hasattr(self.module, "stats"):  # telemetry counts training steps only
            self.module.stats = None if measuring else self.stats


def _layer_states(model: nn.Module) -> list[_LayerState]:
    return [_LayerState(m, m.sr.state_dict(), None if m.delayed is None else dict(m.delayed.pending),
                        getattr(m, "stats", None))
            for m in model.modules() if isinstance(m, QuantizedLinear)]


def measure_gradient_noise(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    params: Sequence[tuple[str, nn.Parameter]] | None = None,
    only_quantized: bool = True,
) -> GradNoiseReport:
    """Run loss_fn (forward + scalar loss; the caller sets up autocast) twice, under the model's
    quantized backward and under `high_precision_backward(model)`, and compare the gradients of
    `params` ((name, parameter) pairs; default `monitored_parameters(model, only_quantized)`).
    `.grad`, the layers' specs, SR streams, pending amaxes and telemetry, and the RNG are left as
    they were. Costs two forward+backward passes and holds two copies of the monitored gradients."""
    named = list(params) if params is not None else monitored_parameters(model, only_quantized)
    if not named:
        return GradNoiseReport(ratio=math.inf)
    names, tensors = [n for n, _ in named], [p for _, p in named]
    states = _layer_states(model)
    device = tensors[0].device

    def grads() -> list[Tensor]:
        for state in states:
            state.rewind(measuring=True)
        with fork_rng(device), torch.enable_grad():
            loss = loss_fn()
            out = torch.autograd.grad(loss, tensors, allow_unused=True)  # frees the graph
        return [torch.zeros_like(p) if g is None else g for p, g in zip(tensors, out, strict=True)]

    try:
        g_q = grads()
        with high_precision_backward(model):
            g_hp = grads()
    finally:
        for state in states:
            state.rewind(measuring=False)
    return noise_ratio(g_hp, g_q, names)


def to_rows(report: GradNoiseReport, step: int) -> list[dict]:
    """numerics.jsonl rows: one overall row, then one per parameter. An infinite ratio (noise
    exactly 0) is written as null: strict JSON has no Infinity."""
    def finite(x: float) -> float | None:
        return x if math.isfinite(x) else None

    rows = [{"step": int(step), "kind": "grad_noise", "layer": "all", "ratio": finite(report.ratio),
             "grad_rms": report.grad_rms, "noise_std": report.noise_std, "params": report.params}]
    rows += [{"step": int(step), "kind": "grad_noise", "layer": name, "ratio": finite(r)}
             for name, r in report.per_layer.items()]
    return rows


__all__ = ["GradNoiseReport", "measure_gradient_noise", "monitored_parameters", "noise_ratio", "to_rows"]
