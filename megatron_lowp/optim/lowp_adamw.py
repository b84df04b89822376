"""AdamW whose moments are stored in low precision between steps (FP8 or BF16): docs/papers.md §1.4.

The update is torch.optim.AdamW's single-tensor algorithm, in FP32, on the dequantized moments:

    p *= 1 - lr * wd
    m = lerp(m, g, 1 - beta1);  v = beta2 * v + (1 - beta2) * g * g
    p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

then m and v are quantized again and only the quantized form is kept. With ``moments="fp32"`` (a test
hook; ``build_optimizer`` uses torch's AdamW for fp32) the parameters follow torch.optim.AdamW
(foreach=False) bit for bit.

Storage per parameter (``state_bytes`` reports it):
* ``fp8``, parameters with ndim >= 2: m as ``moment1_format`` (default fp8_e4m3 -> float8_e4m3fn) and
  v as ``moment2_format`` (default fp8_e5m2 -> float8_e5m2): real 1-byte tensors, each with an FP32
  per-tensor scale ``exp_avg_scale`` / ``exp_avg_sq_scale``: s = FMAX / amax (an exact ratio, not a
  power of two, as the paper's code), q = round(t * s) (nearest-even, or stochastic), t_hat = q / s;
  an all-zero tensor keeps scale 1. 1-D parameters (norm gains, biases) keep FP32 moments.
* ``bf16``: m and v as bfloat16 for every parameter (torch's round-to-nearest-even cast). numerics has
  no BF16 stochastic rounding, so ``moments_rounding="stochastic"`` with bf16 is refused.
* ``fp32``: plain FP32 moments.

Master weights (``master_weights``): ``fp32`` keeps them as they are; ``fp16_pts`` (the FP8 paper's
script, MW_DTYPE=fp16_pts) rounds every parameter with ndim >= 2 after its update onto the grid of FP16
with a per-tensor scale s = 65504 / amax (nearest-even; the cast cannot overflow since |p| s <= 65504),
as the reference does: the numerics of FP16 master weights, kept in the FP32 parameter (the model
computes with it), so this option does not shrink memory.

Guards:
* v floor: a positive v never rounds to 0. After rounding, scaled values of v > 0 that became 0 are
  set to the format's smallest subnormal (a v below amax(v) * 2^-16 / 57344 in E5M2). Flushing them
  would turn the update m / (sqrt(v) + eps) into m / eps (huge); the floor only ever overestimates v,
  i.e. shrinks such steps. m flushing to 0 is harmless (a zero step) and is left as is.
* Non-finite moments are not checked (no host sync): NaN/Inf propagate to NaN as in torch's AdamW.
* Stochastic rounding draws from one ``SRGenerator`` per optimizer (seed ``sr_seed``), m then v for
  each parameter in order (one uniform per element, zero tensors included: no host sync to skip
  them; a zero stays zero), so runs are reproducible.

Checkpoints: ``state_dict``/``load_state_dict`` keep the stored dtypes (torch's Optimizer would cast
every floating state tensor to the parameter's dtype); DCP saves float8 tensors as they are.
``state_dict()['param_groups'][0]`` also carries ``sr_seed``/``sr_offset`` (the generator) and
``moment_storage`` (checked on load, so resuming with other moment settings is a UserError rather than
DCP silently casting scaled FP8 codes into another dtype); group keys are the only extra place that
survives torch.distributed.checkpoint's get_state_dict/set_state_dict.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from megatron_lowp.errors import UserError
from megatron_lowp.numerics import FORMATS, FloatFormat, SRGenerator, amax, round_to_format, scale_from_amax
from megatron_lowp.numerics.formats import TORCH_DTYPES

MOMENT_STORAGE = ("fp32", "bf16", "fp8")
# the per-tensor FP8 formats, with their default element (E4M3 OCP, E5M2)
MOMENT_FORMATS: dict[str, FloatFormat] = {name: f.element_format({}) for name, f in FORMATS.items()
                                          if f.per_tensor_fp8({})}
MOMENT_ROUNDING = ("nearest", "stochastic")
MASTER_WEIGHTS = ("fp32", "fp16_pts")
_FP16_MAX = 65504.0
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _check(name: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise UserError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
    return value


def _show(dtypes: dict[str, torch.dtype]) -> str:
    return ", ".join(f"{k}: {str(v).replace('torch.', '')}" for k, v in sorted(dtypes.items()))


class LowPrecisionAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        moments: str = "fp8",
        moment1_format: str = "fp8_e4m3",
        moment2_format: str = "fp8_e5m2",
        rounding: str = "nearest",
        sr_seed: int = 0,
        master_weights: str = "fp32",
    ) -> None:
        self.master_weights = _check("optim.master_weights", master_weights, MASTER_WEIGHTS)
        self.moments = _check("optim.moments", moments, MOMENT_STORAGE)
        self.moment_formats = (
            MOMENT_FORMATS[_check("optim.moment1_format", moment1_format, MOMENT_FORMATS)],
            MOMENT_FORMATS[_check("optim.moment2_format", moment2_format, MOMENT_FORMATS)],
        )
        self.rounding = _check("optim.moments_rounding", rounding, MOMENT_ROUNDING)
        if moments == "bf16" and rounding == "stochastic":
            raise UserError("optim.moments_rounding: 'stochastic' is not available for optim.moments=bf16 "
                            "(numerics has no BF16 stochastic rounding); use 'nearest', or optim.moments=fp8")
        if moments == "fp32" and rounding == "stochastic":
            raise UserError("optim.moments_rounding: 'stochastic' needs optim.moments=fp8 (fp32 moments are not rounded)")
        self.sr_generator = SRGenerator(sr_seed)
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    # --- storage layout -----------------------------------------------------------------------
    def _is_fp8(self, p: torch.Tensor) -> bool:
        return self.moments == "fp8" and p.ndim >= 2

    def _storage_dtype(self, p: torch.Tensor, which: int) -> torch.dtype:
        if self._is_fp8(p):
            return TORCH_DTYPES[self.moment_formats[which].name]
        return torch.bfloat16 if self.moments == "bf16" else torch.float32

    def _load_moment(self, state: dict, p: torch.Tensor, which: int) -> torch.Tensor:
        """The stored moment as float32 (dequantized)."""
        key = _MOMENTS[which]
        stored = state[key]
        if self._is_fp8(p):
            return stored.to(torch.float32) / state[key + "_scale"]
        return stored.to(torch.float32)

    def _store_moment(self, state: dict, p: torch.Tensor, which: int, t: torch.Tensor) -> None:
        """Quantize the float32 moment t into the state's storage."""
        key = _MOMENTS[which]
        if not self._is_fp8(p):
            state[key] = t.to(self._storage_dtype(p, which))
            return
        fmt = self.moment_formats[which]
        scale = scale_from_amax(amax(t), fmt.max_value)
        u = self.sr_generator.uniform(t.shape, device=t.device) if self.rounding == "stochastic" else None
        q = round_to_format(t * scale, fmt, self.rounding, u)
        if which == 1:  # v floor: a positive second moment never becomes 0 (see the module docstring)
            q = torch.where((t > 0) & (q == 0), torch.full_like(q, fmt.min_subnormal), q)
        state[key] = q.to(TORCH_DTYPES[fmt.name])
        state[key + "_scale"] = scale

    def _init_state(self, state: dict, p: torch.Tensor) -> None:
        state["step"] = torch.tensor(0.0, dtype=torch.float32)
        for which in (0, 1):  # two tensors, never one aliased zeros (fp32 storage updates them in place)
            state[_MOMENTS[which]] = torch.zeros_like(p, dtype=self._storage_dtype(p, which),
                                                      memory_format=torch.preserve_format)
            if self._is_fp8(p):
                state[_MOMENTS[which] + "_scale"] = torch.ones((), dtype=torch.float32, device=p.device)

    # --- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LowPrecisionAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    self._init_state(state, p)
                self._update(p, state, lr, beta1, beta2, eps, wd)
        return loss

    def _update(self, p: torch.Tensor, state: dict, lr: float, beta1: float, beta2: float, eps: float,
                wd: float) -> None:
        # The same operations, in the same order, as torch.optim.adam._single_tensor_adam (decoupled wd).
        grad = p.grad.to(torch.float32)
        param = p if p.dtype == torch.float32 else p.to(torch.float32)
        exp_avg = self._load_moment(state, p, 0)
        exp_avg_sq = self._load_moment(state, p, 1)
        state["step"] += 1
        if wd != 0:
            param.mul_(1 - lr * wd)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = state["step"].item()
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)
        if self.master_weights == "fp16_pts" and p.ndim >= 2:
            scale = scale_from_amax(amax(param), _FP16_MAX)
            param.copy_((param * scale).to(torch.float16).to(torch.float32) / scale)
        if param is not p:
            p.copy_(param)
        self._store_moment(state, p, 0, exp_avg)
        self._store_moment(state, p, 1, exp_avg_sq)

    # --- checkpoints --------------------------------------------------------------------------
    def moment_storage(self) -> str:
        """How the moments are stored, e.g. 'fp8 (m fp8_e4m3, v fp8_e5m2)': checked when a state is loaded."""
        if self.moments != "fp8":
            return self.moments
        m, v = (f.name for f in self.moment_formats)
        return f"fp8 (m fp8_{m}, v fp8_{v})"

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if sd["param_groups"]:
            sr = self.sr_generator.state_dict()
            sd["param_groups"][0].update(sr_seed=sr["seed"], sr_offset=sr["offset"], moment_storage=self.moment_storage())
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict["param_groups"]
        sr = None
        if groups and "sr_seed" in groups[0]:
            sr = {"seed": int(groups[0]["sr_seed"]), "offset": int(groups[0]["sr_offset"])}
        saved_storage = groups[0].get("moment_storage") if groups else None
        if saved_storage is not None and saved_storage != self.moment_storage():
            raise UserError(
                f"the checkpoint's optimizer stores its Adam moments as {saved_storage}, this run as "
                f"{self.moment_storage()} (optim.moments / moment1_format / moment2_format); resume with the "
                "checkpoint's settings"
            )
        super().load_state_dict(state_dict)  # casts floating state to the parameter's dtype: undone below
        for group in self.param_groups:
            for key in ("sr_seed", "sr_offset", "moment_storage"):
                group.pop(key, None)
        if sr is not None:
            self.sr_generator.load_state_dict(sr)
        saved_ids = chain.from_iterable(g["params"] for g in groups)
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params, strict=True):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            state = self.state[p]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.to(device=p.device)  # the stored dtype, bits untouched
            self._check_layout(pid, p, state)

    def _check_layout(self, pid: Any, p: torch.Tensor, state: dict) -> None:
        expected = {_MOMENTS[w]: self._storage_dtype(p, w) for w in (0, 1)}
        if self._is_fp8(p):
            expected.update({k + "_scale": torch.float32 for k in _MOMENTS})
        got = {k: v.dtype for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)}
        if got != expected:
            raise UserError(
                f"optimizer state for parameter {pid!r} holds ({_show(got)}) but this optimizer stores "
                f"({_show(expected)}) with optim.moments={self.moments}; resume with the moment settings the "
                "checkpoint was written with"
            )

    # --- reporting ----------------------------------------------------------------------------
    def state_bytes(self) -> dict[str, float]:
        """Optimizer state memory: every state tensor (moments, scales, step counters) in bytes.

        Returns ``{"bytes": total, "params": parameters with state, "per_param": bytes / params}``."""
        total = numel = 0
        for p, state in self.state.items():
            numel += p.numel()
            total += sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
        return {"bytes": total, "params": numel, "per_param": total / numel if numel else 0.0}
