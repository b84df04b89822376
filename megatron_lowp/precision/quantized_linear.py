"""The quantized linear: fprop, dgrad and wgrad, each operand quantized per its role's QuantSpec.

Emulated GEMMs: operands are quantized and dequantized (numerics.fake_quantize), then multiplied in
the compute dtype (the autocast dtype, else the input's). This is the reference backend; it runs on
every device and gives the same quantization bits everywhere.

Memory: forward quantizes the operands backward will need (`w_t` along out_features, `x_t` along
tokens) and saves them *packed* (QuantizedTensor: 4 or 8 bits per value plus scales), not the
high-precision tensors. A role left in high precision saves the original tensor instead (the weight
is a parameter and costs nothing extra).

Native FP8 (`backend="native"`): a GEMM whose two operands are both per-tensor FP8 runs as
`torch._scaled_mm` on the FP8 bytes (one side E4M3; E5M2 x E5M2 has no tensor-core kernel and
stays emulated; so do shapes that are not multiples of 16). Operands are quantized exactly as the
emulated path quantizes them (same axes, same SR draws), so the two backends see the same bits and
differ only in how the products are accumulated.

Stochastic rounding draws from the layer's own SRGenerator, whose (seed, offset) is part of the
module's state_dict (as `sr_state`), so a resumed run continues the same random stream.

Activation checkpointing: the saved operands go through ctx.save_for_backward (so checkpointing can
drop them and saved-tensor hooks can measure them, each part tagged with its role), and a forward
inside a checkpointed region records what it used; its recompute replays that (precision/recompute.py):
the same SR bits, the same scales, no second amax observation or telemetry count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math

import torch
from torch import nn

from megatron_lowp.numerics import E5M2, QuantizedTensor, SRGenerator
from megatron_lowp.numerics.stats import quantization_stats
from megatron_lowp.precision import recompute
from megatron_lowp.precision.delayed import DelayedScaling, ReduceMax
from megatron_lowp.precision.spec import ROLE_AXIS, GemmSpecs, QuantSpec


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    kind = t.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else t.dtype


class RoleQuantizer:
    """Quantizes a layer's operands by role: its specs, its SR stream, and its delayed-scaling state.
    `observing` is True in training forwards (and always in backward): only they feed amaxes to
    delayed scaling, so evaluation never moves the scales. With `stats` (a dict, on telemetry steps)
    every quantization also adds its amax/overflow/underflow counts there, by role; the quantized
    bits and SR draws are the same either way (fake_quantize == quantize + dequantize).
    `scales` holds the delayed scales quantized with, by role: filled as they are used, or, for the
    replay of a recorded forward (precision/recompute.py), given, and then used instead."""

    def __init__(self, specs: GemmSpecs, gen: SRGenerator, delayed: DelayedScaling | None, observing: bool,
                 stats: dict[str, dict[str, torch.Tensor]] | None = None,
                 scales: dict[str, torch.Tensor | None] | None = None, tp=None):
        self.specs, self.gen, self.delayed, self.observing, self.stats = specs, gen, delayed, observing, stats
        self.replaying = scales is not None
        self.scales = {} if scales is None else scales
        self.tp = tp  # a LinearShard (precision/tp_shard.py) when tensor-parallel: global scales and SR draws

    def _record(self, role: str, t: torch.Tensor, qt: QuantizedTensor) -> None:
        new = quantization_stats(t, qt)
        old = self.stats.get(role)
        self.stats[role] = new if old is None else {
            k: torch.maximum(old[k], v) if k == "amax" else old[k] + v for k, v in new.items()}

    def _extra(self, role: str, t: torch.Tensor) -> dict:
        if self.delayed is None or role not in self.delayed.specs:
            return {}
        if self.replaying:
            scale = self.scales.get(role)
        else:
            if self.observing:
                self.delayed.observe(role, t)
            scale = self.scales[role] = self.delayed.scale(role)
        return {} if scale is None else {"scale": scale}

    def _args(self, role: str, t: torch.Tensor, spec: QuantSpec) -> tuple[QuantSpec, SRGenerator, dict]:
        extra = self._extra(role, t)
        return (spec, self.gen, extra) if self.tp is None else self.tp.quantize_args(role, t, spec, self.gen, extra)

    def fake(self, role: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The operand dequantized to the compute dtype (t itself for a high-precision role)."""
        spec = getattr(self.specs, role)
        if spec is None:
            return t.to(dtype)
        if self.stats is not None:
            return self.packed(role, t).dequantize(dtype)
        spec, gen, extra = self._args(role, t, spec)
        return spec.fake_quantize(t, ROLE_AXIS[role], gen, **extra).to(dtype)

    def packed(self, role: str, t: torch.Tensor) -> torch.Tensor | QuantizedTensor:
        """A QuantizedTensor to keep (for backward or a native GEMM), or t for a high-precision role."""
        spec = getattr(self.specs, role)
        if spec is None:
            return t
        spec, gen, extra = self._args(role, t, spec)
        qt = spec.quantize(t, ROLE_AXIS[role], gen, **extra)
        if self.stats is not None:
            self._record(role, t, qt)
        return qt

    def shared(self, role: str, t: torch.Tensor, qt: QuantizedTensor) -> QuantizedTensor:
        """qt, another role's quantization of t that `shares_quantization` found equal, serving `role` too."""
        if self.stats is not None:
            self._record(role, t, qt)
        return qt


def _restore(saved, dtype: torch.dtype) -> torch.Tensor:
    return saved.dequantize(dtype) if isinstance(saved, QuantizedTensor) else saved.to(dtype)


def _save(ctx, saved: dict[str, torch.Tensor | QuantizedTensor | None]) -> None:
    """ctx.save_for_backward of backward's operands (a QuantizedTensor as its tensors), each tensor
    tagged `_lowp_role` (x_t or w_t) for the memory ledger; `_load` rebuilds them in backward."""
    layout, tensors = [], []
    for role, s in saved.items():
        if isinstance(s, QuantizedTensor):
            parts = [t for t in (s.data, s.scale, s.tensor_scale) if t is not None]
            layout.append((role, dataclasses.replace(s, data=None, scale=None, tensor_scale=None), len(parts)))
        else:
            parts = [] if s is None else [s]
            layout.append((role, None, len(parts)))
        for t in parts:
            t._lowp_role = role
        tensors += parts
    ctx.save_for_backward(*tensors)
    ctx.saved_layout = layout


def _load(ctx) -> dict[str, torch.Tensor | QuantizedTensor | None]:
    tensors, out = list(ctx.saved_tensors), {}
    for role, qt, n in ctx.saved_layout:
        parts, tensors = tensors[:n], tensors[n:]
        if qt is None:
            out[role] = parts[0] if parts else None
        else:
            data, scale, *rest = parts
            out[role] = dataclasses.replace(qt, data=data, scale=scale, tensor_scale=rest[0] if rest else None)
    return out


def saved_operands(grad_fn) -> dict[str, torch.Tensor | QuantizedTensor | None]:
    """What a QuantizedLinearFunction node keeps for backward, by role (x_t, w_t), as backward will
    restore it; a RuntimeError once backward has freed it."""
    return _load(grad_fn)


BACKENDS = ("emulated", "native")


def _tensorwise_fp8(spec: QuantSpec | None) -> bool:
    return spec is not None and spec.format.per_tensor_fp8(spec.kwargs())


def _element(spec: QuantSpec):
    return spec.format.element_format(spec.kwargs())


def _native_pair(a: QuantSpec | None, b: QuantSpec | None, *dims: int) -> bool:
    """Both operands per-tensor FP8, not both E5M2, every GEMM dimension a multiple of 16."""
    return (_tensorwise_fp8(a) and _tensorwise_fp8(b) and not (_element(a) is _element(b) is E5M2)
            and all(d % 16 == 0 for d in dims))


def shares_quantization(a: QuantSpec | None, b: QuantSpec | None) -> bool:
    """One quantization of an operand serves two roles: equal specs, values independent of the block
    axis (per-tensor FP8 or NVFP4 16x16 tiles, both round-to-nearest, which draws no SR noise), and
    current scales (delayed ones keep a history per role, and QAF phases observe x without x_t)."""
    return (a is not None and a == b and a.amax_history == 0
            and a.format.same_along_every_axis(a.kwargs(), a.rounding))


def _scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, dtype) -> torch.Tensor:
    """a @ b.T on FP8 bytes (a row-major, b row-major so b.T is column-major as the kernel wants);
    scales are our multiplicative encode scales, the kernel takes their inverses (decode scales)."""
    one = torch.ones((), dtype=torch.float32, device=a.device)
    return torch._scaled_mm(a, b.t(), scale_a=(one / a_scale).reshape(()), scale_b=(one / b_scale).reshape(()),
                            out_dtype=dtype)


class QuantizedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, q: RoleQuantizer, backend: str = "emulated",
                grad_enabled: bool = True) -> torch.Tensor:
        dtype, specs = _compute_dtype(x), q.specs
        x2 = x.reshape(-1, x.shape[-1])
        (tokens, k), n = x2.shape, weight.shape[0]
        ctx.native = backend == "native"
        # Quantize the backward operands only for the gradients that will be taken: inference (no
        # grad) then costs one quantization per operand, draws no SR noise, and takes any token count
        # (wgrad blocks run along the tokens). Where x_t (w_t) would equal x (w), fprop's
        # quantization is kept for wgrad (dgrad) instead of quantizing again.
        needs_dx, needs_dw = (grad_enabled and n for n in ctx.needs_input_grad[:2])
        share_x = needs_dw and shares_quantization(specs.x, specs.x_t)
        share_w = needs_dx and shares_quantization(specs.w, specs.w_t)
        with torch.autocast(x.device.type, enabled=False):
            xq = wq = None
            if ctx.native and _native_pair(specs.x, specs.w, tokens, k, n):
                xq, wq = q.packed("x", x2), q.packed("w", weight)
                y = _scaled_mm(xq.data, xq.scale, wq.data, wq.scale, dtype)
            else:
                xq, wq = (q.packed("x", x2) if share_x else None), (q.packed("w", weight) if share_w else None)
                xf = q.fake("x", x2, dtype) if xq is None else xq.dequantize(dtype)
                wf = q.fake("w", weight, dtype) if wq is None else wq.dequantize(dtype)
                y = xf @ wf.t()
            saved_x = saved_w = None
            if needs_dw:
                saved_x = q.shared("x_t", x2, xq) if share_x else q.packed("x_t", x2.detach())
            if needs_dx:
                saved_w = q.shared("w_t", weight, wq) if share_w else q.packed("w_t", weight.detach())
        _save(ctx, {"x_t": saved_x, "w_t": saved_w})
        ctx.q, ctx.dtype = q, dtype
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q = ctx.q
        q.observing = True  # backward runs only in training
        saved = _load(ctx)
        ctx.saved_x, ctx.saved_w = saved["x_t"], saved["w_t"]
        dy2 = dy.reshape(-1, dy.shape[-1])
        with torch.autocast(dy.device.type, enabled=False):
            dx = None if ctx.saved_w is None else _dgrad(ctx, q, dy2).reshape(ctx.x_shape).to(ctx.x_dtype)
            dw = None if ctx.saved_x is None else _wgrad(ctx, q, dy2).to(ctx.w_dtype)
        ctx.saved_x = ctx.saved_w = None
        return dx, dw, None, None, None


def _dgrad(ctx, q: RoleQuantizer, dy2: torch.Tensor) -> torch.Tensor:
    """dx = dy W, from the W saved (quantized as w_t) in forward."""
    (tokens, n), k = dy2.shape, ctx.x_shape[-1]
    if ctx.native and _native_pair(q.specs.dy, q.specs.w_t, tokens, n, k):
        dyq, wq = q.packed("dy", dy2), ctx.saved_w  # per-tensor: transposing bytes is exact
        return _scaled_mm(dyq.data, dyq.scale, wq.data.t().contiguous(), wq.scale, ctx.dtype)
    return q.fake("dy", dy2, ctx.dtype) @ _restore(ctx.saved_w, ctx.dtype)


def _wgrad(ctx, q: RoleQuantizer, dy2: torch.Tensor) -> torch.Tensor:
    """dW = dy^T x, from the x saved (quantized as x_t) in forward."""
    (tokens, n), k = dy2.shape, ctx.x_shape[-1]
    if ctx.native and _native_pair(q.specs.dy_t, q.specs.x_t, tokens, n, k):
        dyq, xq = q.packed("dy_t", dy2), ctx.saved_x
        return _scaled_mm(dyq.data.t().contiguous(), dyq.scale, xq.data.t().contiguous(), xq.scale, ctx.dtype)
    return q.fake("dy_t", dy2, ctx.dtype).t() @ _restore(ctx.saved_x, ctx.dtype)


def layer_seed(name: str, base_seed: int = 0) -> int:
    """A stable per-layer SR seed from the layer's name (and the run seed): < 2^63 to fit int64."""
    digest = hashlib.sha256(f"{base_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def rank_seed(base_seed: int, rank: int) -> int:
    """The SR seed of data-parallel rank `rank`: the base seed itself on rank 0."""
    return base_seed if rank == 0 else layer_seed(f"rank{rank}", base_seed)


def set_sr_rank(model: nn.Module, rank: int) -> None:
    """Give every quantized linear of `model` the SR stream of data-parallel rank `rank`."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.set_rank(rank)


class QuantizedLinear(nn.Module):
    """Bias-free linear whose three GEMMs follow `specs`; a drop-in for nn.Linear(bias=False)."""

    # A compiled block runs it as one opaque call: traced, every quantization's host sync is a graph
    # break and dynamo recompiles the rest per operand shape (train/compile.py has the numbers).
    compile_opaque = True

    def __init__(self, in_features: int, out_features: int, specs: GemmSpecs, name: str = "", seed: int = 0,
                 backend: str = "emulated"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend {backend!r} is not one of {', '.join(BACKENDS)}")
        self.in_features, self.out_features, self.specs, self.name = in_features, out_features, specs, name
        self.training_specs = specs  # `specs` becomes specs.forward_only() while backward runs in high precision
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Linear's default
        # Each data-parallel rank draws its own SR stream (rank 0's is the single-process stream):
        # identical draws on every rank would make the ranks' rounding noise correlated, so it would
        # not average out in the gradient all-reduce.
        self.sr_base_seed, self.rank = layer_seed(name, seed), 0
        self.sr = SRGenerator(seed=self.sr_base_seed)
        self.stats: dict[str, dict[str, torch.Tensor]] | None = None  # a dict while telemetry is on
        self.tp = None  # a LinearShard when tensor-parallel (parallel/tensor_parallel.py sets it)
        delayed = {r: getattr(specs, r) for r in ROLE_AXIS if getattr(specs, r) and getattr(specs, r).amax_history}
        fmt_max = {r: _element(spec).max_value for r, spec in delayed.items()}
        self.delayed = DelayedScaling(delayed, fmt_max) if delayed else None

    def forward(self, x: torch.Tensor, col_scale: torch.Tensor | None = None) -> torch.Tensor:
        """x W^T, or x (W diag(col_scale))^T: the column scale is folded in before W is quantized."""
        region = recompute.current()
        if region is not None and region[1] == "replay":
            return self._replay(x, col_scale, region[0].replay(self))
        observing = self.training and torch.is_grad_enabled()
        q = RoleQuantizer(self.specs, self.sr, self.delayed, observing, self.stats, tp=self.tp)
        start = self.sr.offset
        y = QuantizedLinearFunction.apply(x, self._local_weight(col_scale), q, self.backend, torch.is_grad_enabled())
        if region is not None:  # a checkpointed forward: its recompute will replay this call
            region[0].record(self, recompute.Call(start, self.sr.offset, dict(q.scales), self.specs))
        return y

    def _local_weight(self, col_scale: torch.Tensor | None) -> torch.Tensor:
        """The weight this rank multiplies (its tensor-parallel shard), with per-channel Smooth-SwiGLU folded in."""
        weight = self.weight if self.tp is None else self.tp.local_weight(self.weight)
        return weight if col_scale is None else weight * col_scale

    def _replay(self, x: torch.Tensor, col_scale: torch.Tensor | None, call: recompute.Call) -> torch.Tensor:
        """The recompute of a recorded forward: the same SR draws and scales; nothing observed or counted."""
        resume, self.sr.offset = self.sr.offset, call.sr_start
        try:
            q = RoleQuantizer(call.specs, self.sr, self.delayed, observing=False, scales=call.scales, tp=self.tp)
            y = QuantizedLinearFunction.apply(x, self._local_weight(col_scale), q, self.backend, torch.is_grad_enabled())
            if self.sr.offset != call.sr_end:
                raise RuntimeError(f"{self.name}: the recompute drew {self.sr.offset - call.sr_start} SR uniforms, the "
                                   f"forward {call.sr_end - call.sr_start}: the recomputed operands would differ")
        finally:
            self.sr.offset = resume
        return y

    def commit_amax(self, reduce_max: ReduceMax | None = None) -> None:
        """End of an optimizer step: this step's amaxes enter the delayed-scaling histories."""
        if self.delayed is not None:
            self.delayed.commit(reduce_max)

    def set_rank(self, rank: int) -> None:
        """Draw this data-parallel rank's SR stream (same position in it)."""
        self.rank = rank
        self.sr = SRGenerator(seed=rank_seed(self.sr_base_seed, rank), offset=self.sr.offset)

    # The SR stream position and the amax histories travel with the weights (state_dict ->
    # checkpoint -> resume). The base seed is saved, so each rank of a resumed run (at any world
    # size) derives its own stream from it; offsets are equal on all ranks (same shapes).
    def get_extra_state(self) -> dict[str, torch.Tensor]:
        state = {"sr": torch.tensor([self.sr_base_seed, self.sr.offset], dtype=torch.int64)}
        if self.delayed is not None:
            state.update({f"amax.{k}": v for k, v in self.delayed.state_dict().items()})
        return state

    def set_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        self.sr_base_seed = int(state["sr"][0])
        self.sr.load_state_dict({"seed": rank_seed(self.sr_base_seed, self.rank), "offset": int(state["sr"][1])})
        if self.delayed is not None:
            self.delayed.load_state_dict({k[len("amax."):]: v for k, v in state.items() if k.startswith("amax.")})

    def extra_repr(self) -> str:
        roles = ", ".join(f"{r}={getattr(self.specs, r).fmt}" for r in ROLE_AXIS if getattr(self.specs, r) is not None)
        return (f"in_features={self.in_features}, out_features={self.out_features}, {roles or 'high precision'}, "
                f"backend={self.backend}")


def set_high_precision_backward(model: nn.Module, enabled: bool) -> None:
    """Run the backward GEMMs (dgrad, wgrad) of every quantized linear in high precision, or back in
    their recipe's formats. Forward quantization is unchanged: QAF and the gradient-noise monitor
    both compare the same quantized forward under two backward precisions."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.specs = module.training_specs.forward_only() if enabled else module.training_specs


@contextlib.contextmanager
def high_precision_backward(model: nn.Module):
    """set_high_precision_backward for a block of code, restoring each layer's specs afterwards."""
    saved = {m: m.specs for m in model.modules() if isinstance(m, QuantizedLinear)}
    set_high_precision_backward(model, True)
    try:
        yield
    finally:
        for module, specs in saved.items():
            module.specs = specs


def discard_amax_observations(model: nn.Module) -> None:
    """Forget the amaxes of the current step (a skipped step's NaN/Inf must not enter the histories)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear) and module.delayed is not None:
            module.delayed.pending = {}


def commit_amax_histories(model: nn.Module, reduce_max: ReduceMax | None = None) -> None:
    """Call after every optimizer step: each quantized linear's delayed scales take in the step's
    amaxes (reduce_max, e.g. an all-reduce MAX over data-parallel ranks, makes them global)."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.commit_amax(reduce_max)
