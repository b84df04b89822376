"""The measurement of `megatron-lowp probe`: where a recipe's own quantization hurts, per linear and
per GEMM role, on one batch of real data (docs/probe.md says what each number means).

1. Operands. Hooks on every QuantizedLinear capture the high-precision operands of its three GEMMs:
   x and the weight it used (a per-channel Smooth-SwiGLU scale folded in) in forward, dY in
   backward. Each role (x, w, dy, w_t, dy_t, x_t) is quantized with the layer's recipe spec (its
   delayed scale where it has one; SR from the probe's own stream) and compared with the tensor:
   relative error, the shares of clipped, overflowed and underflowed elements (numerics/stats.py),
   and per operand max/RMS and kurtosis. Each GEMM (fprop x.w^T, dgrad dy.w, wgrad dy^T.x) is
   computed from the quantized operands and from the BF16 ones (FP32 accumulation, as a BF16 GEMM)
   and the relative error of its output reported.
2. Damage, end to end (one linear at a time). The batch goes through the model with every linear
   quantized, with none (the BF16 reference), and once per linear with only that one quantized,
   every pass from the same SR stream positions. The forward damage is the mean per-token KL
   divergence of the output from the BF16 model's, the gradient damage the squared relative error
   of the full gradient against the BF16 gradient; a linear's share of each is its own damage over
   the sum of all linears' own damages: what moving it to BF16 removes, if the linears' errors add
   up independently (the sums against the all-quantized values say how far they do). Leaving one
   out instead subtracts two large numbers whose difference is drowned by the errors' cross terms
   and by the other layers' re-drawn rounding noise.
   The share is what a plan (precision/plan.py) buys with its FLOPs.
3. The gradient-noise ratio per linear (the sqrt(3) rule, precision/grad_noise.py) and the SwiGLU
   alignment (precision/alignment.py).

The model's state is left as it was: layer specs, SR streams, pending delayed-scaling amaxes, RNG.
Costs (number of quantized linears + 4) forward+backward passes of the batch, and holds one copy of
the gradients and of the reference log-probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lowp.device import fork_rng
from megatron_lowp.model import cross_entropy_loss
from megatron_lowp.numerics import SRGenerator
from megatron_lowp.numerics.stats import quantization_stats
from megatron_lowp.precision.alignment import AlignmentReading, DownInputMax, alignment_readings, gated_mlps
from megatron_lowp.precision.grad_noise import measure_gradient_noise
from megatron_lowp.precision.quantized_linear import QuantizedLinear
from megatron_lowp.precision.spec import ROLE_AXIS, ROLES, GemmSpecs

GEMMS = {"fprop": ("x", "w"), "dgrad": ("dy", "w_t"), "wgrad": ("dy_t", "x_t")}
OPERAND = {"x": "x", "x_t": "x", "w": "w", "w_t": "w", "dy": "dy", "dy_t": "dy"}
RANK_BY = ("damage", "forward", "gradient", "gemm")


@dataclass
class RoleReading:
    fmt: str  # the role's format, or "bf16" for a role the recipe keeps in high precision
    rel_error: float  # ||Q(t) - t|| / ||t||, the mean over the tensor's rows
    clipped: float = 0.0  # shares of the elements (numerics/stats.py)
    overflow: float = 0.0
    underflow: float = 0.0  # of the non-zero elements


@dataclass
class OperandStats:
    amax: float
    max_over_rms: float  # crest factor: how far the largest value sits above the typical one
    kurtosis: float  # E[(t - mean)^4] / var^2: 3 for a Gaussian, large for heavy tails and outliers


@dataclass
class LinearReading:
    name: str
    in_features: int
    out_features: int
    roles: dict[str, RoleReading] = field(default_factory=dict)
    operands: dict[str, OperandStats] = field(default_factory=dict)
    gemm_error: dict[str, float] = field(default_factory=dict)  # fprop, dgrad, wgrad against BF16
    forward_kl_alone: float = 0.0  # KL(BF16 || model) with only this linear quantized
    gradient_error_alone: float = 0.0  # ||g - g_bf16|| / ||g_bf16|| with only this linear quantized
    forward_share: float = 0.0  # its forward_kl_alone over the sum of all linears'
    gradient_share: float = 0.0  # its gradient_error_alone^2 over the sum of all linears'
    grad_noise_ratio: float | None = None  # ||g|| / (sigma_q sqrt(d)) of its weight (None: not measured)

    @property
    def flops_per_token(self) -> int:
        """Training GEMM FLOPs per token: three GEMMs (fprop, dgrad, wgrad) of 2 x in x out each."""
        return 6 * self.in_features * self.out_features

    @property
    def damage(self) -> float:
        """The mean of the forward and gradient shares: what the plan ranks by (docs/probe.md)."""
        return 0.5 * (self.forward_share + self.gradient_share)

    def score(self, rank_by: str) -> float:
        if rank_by == "damage":
            return self.damage
        if rank_by == "forward":
            return self.forward_share
        if rank_by == "gradient":
            return self.gradient_share
        return max(self.gemm_error.values(), default=0.0)  # "gemm"


@dataclass
class ProbeResult:
    linears: list[LinearReading]  # in model order
    alignment: list[AlignmentReading]
    tokens: int
    forward_kl: float  # mean per-token KL(BF16 || recipe) with every linear quantized
    gradient_error: float  # ||g - g_bf16|| / ||g_bf16|| with every linear quantized
    loss: float  # the batch's loss with every linear quantized
    loss_bf16: float
    grad_noise_ratio: float | None  # overall

    def ranked(self, rank_by: str = "damage") -> list[LinearReading]:
        return sorted(self.linears, key=lambda r: r.score(rank_by), reverse=True)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """The mean over rows (tokens; a weight's or wgrad's output rows) of ||a - ref|| / ||ref||. Per
    row, not over the whole tensor: one outlier row would carry the whole norm and hide the rows
    whose small values a shared scale flushed away (docs/probe.md)."""
    ref2, a2 = ref.float().reshape(-1, ref.shape[-1]), a.float().reshape(-1, ref.shape[-1])
    norms = torch.linalg.vector_norm(ref2, dim=-1)
    live = norms > 0
    if not live.any():
        return 0.0
    return float((torch.linalg.vector_norm(a2 - ref2, dim=-1)[live] / norms[live]).mean())


def operand_stats(t: torch.Tensor) -> OperandStats:
    t = t.detach().float().flatten()
    rms = t.square().mean().sqrt()
    centred = t - t.mean()
    var = centred.square().mean()
    kurtosis = float(centred.pow(4).mean() / var.square()) if var > 0 else 0.0
    amax = float(t.abs().max()) if t.numel() else 0.0
    return OperandStats(amax, amax / float(rms) if rms > 0 else 0.0, kurtosis)


class OperandProbe:
    """Hooks that measure each quantized linear's operands (roles, GEMMs) in the forwards and backwards
    that run while attached (a forward under no_grad measures fprop only); `close()` detaches."""

    def __init__(self, layers: list[QuantizedLinear], reference_dtype: torch.dtype, seed: int):
        self.readings = {m.name: LinearReading(m.name, m.in_features, m.out_features) for m in layers}
        self.reference_dtype = reference_dtype
        self.gen = SRGenerator(seed=seed)
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [m.register_forward_hook(self._forward, with_kwargs=True) for m in layers]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._saved = [], {}

    def _quantized(self, layer: QuantizedLinear, role: str, t: torch.Tensor) -> torch.Tensor:
        """t as the role's GEMM sees it (float32), with the role's reading recorded."""
        spec = getattr(layer.training_specs, role)
        reading = self.readings[layer.name]
        if spec is None:
            deq = t.to(self.reference_dtype).float()
            reading.roles[role] = RoleReading("bf16", _rel(deq, t.float()))
            return deq
        extra = {}
        if layer.delayed is not None and role in layer.delayed.specs:
            scale = layer.delayed.scale(role)
            extra = {} if scale is None else {"scale": scale}
        qt = spec.quantize(t, ROLE_AXIS[role], self.gen, **extra)
        deq = qt.dequantize(torch.float32)
        s = {k: float(v) for k, v in quantization_stats(t, qt).items()}
        numel, nonzero = max(s["numel"], 1.0), max(s["nonzero"], 1.0)
        reading.roles[role] = RoleReading(spec.fmt, _rel(deq, t.float()), s["clipped"] / numel,
                                          s["overflow"] / numel, s["underflow"] / nonzero)
        return deq

    def _reference(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.reference_dtype).float()

    def _forward(self, layer: QuantizedLinear, args, kwargs, output) -> None:
        x = args[0].detach()
        col_scale = kwargs.get("col_scale", args[1] if len(args) > 1 else None)
        w = layer.weight.detach() if col_scale is None else (layer.weight * col_scale).detach()
        x2 = x.reshape(-1, x.shape[-1])
        reading = self.readings[layer.name]
        reading.operands["x"], reading.operands["w"] = operand_stats(x2), operand_stats(w)
        with torch.no_grad():
            y = self._quantized(layer, "x", x2) @ self._quantized(layer, "w", w).t()
            reading.gemm_error["fprop"] = _rel(y, self._reference(x2) @ self._reference(w).t())
        if output.requires_grad:
            self._saved[layer.name] = (x2, w)
            output.register_hook(lambda dy, layer=layer: self._backward(layer, dy))

    def _backward(self, layer: QuantizedLinear, dy: torch.Tensor) -> None:
        x2, w = self._saved.pop(layer.name)
        dy2 = dy.detach().reshape(-1, dy.shape[-1])
        reading = self.readings[layer.name]
        reading.operands["dy"] = operand_stats(dy2)
        with torch.no_grad():
            dx = self._quantized(layer, "dy", dy2) @ self._quantized(layer, "w_t", w)
            reading.gemm_error["dgrad"] = _rel(dx, self._reference(dy2) @ self._reference(w))
            dw = self._quantized(layer, "dy_t", dy2).t() @ self._quantized(layer, "x_t", x2)
            reading.gemm_error["wgrad"] = _rel(dw, self._reference(dy2).t() @ self._reference(x2))


class _ModelState:
    """What a probe pass moves in the quantized linears: SR positions, pending amaxes, specs."""

    def __init__(self, layers: list[QuantizedLinear]):
        self.layers = layers
        self.sr = [m.sr.state_dict() for m in layers]
        self.pending = [None if m.delayed is None else dict(m.delayed.pending) for m in layers]
        self.specs = [m.specs for m in layers]

    def rewind(self) -> None:
        for m, sr, pending in zip(self.layers, self.sr, self.pending, strict=True):
            m.sr.load_state_dict(sr)
            if pending is not None:
                m.delayed.pending = dict(pending)

    def restore(self) -> None:
        self.rewind()
        for m, specs in zip(self.layers, self.specs, strict=True):
            m.specs = specs


def probe_model(model: nn.Module, batch: torch.Tensor, forward: Callable[[torch.Tensor], torch.Tensor], *,
                reference_dtype: torch.dtype = torch.bfloat16, min_cos: float = 0.5,
                min_outlier_ratio: float = 64.0, grad_noise: bool = True, seed: int = 0,
                progress: Callable[[str], None] | None = None) -> ProbeResult:
    """Measure `model` (its QuantizedLinears) on `batch` (token ids, (sequences, seq_len + 1));
    `forward(tokens) -> logits` runs the model in the recipe's forward context. See the module
    docstring; `min_cos`/`min_outlier_ratio` are the alignment thresholds (precision.alignment_watch)."""
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    params = [p for p in model.parameters() if p.requires_grad]
    device = batch.device
    tell = progress or (lambda _: None)
    state = _ModelState(layers)
    was_training = model.training
    model.eval()  # no amax observation in forward; nothing here is a training step

    def run() -> tuple[torch.Tensor, list[torch.Tensor], float]:
        state.rewind()
        with fork_rng(device), torch.enable_grad():
            logits = forward(batch[:, :-1])
            loss = cross_entropy_loss(logits, batch[:, 1:])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        logp = F.log_softmax(logits.detach().float().flatten(0, -2), dim=-1)
        return logp, [torch.zeros_like(p) if g is None else g.float() for p, g in zip(params, grads, strict=True)], \
            float(loss.detach())

    def set_quantized(keep_bf16: set[str]) -> None:
        for m in layers:
            m.specs = GemmSpecs() if m.name in keep_bf16 else m.training_specs

    try:
        n_passes = len(layers) + 2
        tell(f"pass 1/{n_passes}: BF16 reference")
        set_quantized({m.name for m in layers})
        ref_logp, ref_grads, loss_bf16 = run()
        ref_sq = math.fsum(float(g.square().sum()) for g in ref_grads)

        def damage(logp: torch.Tensor, grads: list[torch.Tensor]) -> tuple[float, float]:
            kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
            err_sq = math.fsum(float((g - r).square().sum()) for g, r in zip(grads, ref_grads, strict=True))
            return kl, err_sq / ref_sq if ref_sq > 0 else 0.0

        tell(f"pass 2/{n_passes}: every linear quantized, operands measured")
        set_quantized(set())
        operands = OperandProbe(layers, reference_dtype, seed)
        mlps = gated_mlps(model)
        down = DownInputMax(mlps)
        try:
            logp, grads, loss = run()
        finally:
            operands.close()
            down_max = down.detach()
        kl_all, err_all = damage(logp, grads)
        readings = operands.readings
        alone = {}
        for i, m in enumerate(layers, 3):
            tell(f"pass {i}/{n_passes}: only {m.name} quantized")
            set_quantized({other.name for other in layers if other is not m})
            alone[m.name] = damage(*run()[:2])
        kl_sum = math.fsum(kl for kl, _ in alone.values())
        err_sum = math.fsum(err for _, err in alone.values())
        for name, (kl, err) in alone.items():
            r = readings[name]
            r.forward_kl_alone, r.gradient_error_alone = kl, math.sqrt(err)
            r.forward_share = kl / kl_sum if kl_sum > 0 else 0.0
            r.gradient_share = err / err_sum if err_sum > 0 else 0.0
        set_quantized(set())
        state.restore()
        overall = None
        if grad_noise and any(getattr(m.training_specs, r) is not None for m in layers for r in ("dy", "dy_t")):
            tell("gradient-noise ratio (two more passes)")

            def loss_fn() -> torch.Tensor:
                return cross_entropy_loss(forward(batch[:, :-1]), batch[:, 1:])

            report = measure_gradient_noise(model, loss_fn)
            overall = report.ratio if math.isfinite(report.ratio) else None
            for m in layers:
                r = report.per_layer.get(f"{m.name}.weight")
                readings[m.name].grad_noise_ratio = r if r is not None and math.isfinite(r) else None
        alignment = alignment_readings(mlps, down_max, min_cos, min_outlier_ratio) if mlps else []
    finally:
        state.restore()
        model.train(was_training)
    return ProbeResult([readings[m.name] for m in layers], alignment, tokens=batch[:, :-1].numel(),
                       forward_kl=kl_all, gradient_error=math.sqrt(err_all), loss=loss, loss_bf16=loss_bf16,
                       grad_noise_ratio=overall)


__all__ = ["GEMMS", "OPERAND", "RANK_BY", "ROLES", "LinearReading", "OperandProbe", "OperandStats", "ProbeResult", "RoleReading",
           "operand_stats", "probe_model"]
