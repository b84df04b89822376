"""Where a tensor-parallel linear's local operands sit in the global ones, and what that means for
quantizing them: every shard must be quantized as the unsharded tensor would be.

A column-parallel linear holds rows `out_index` of the global weight [N, K] (its slice of output
channels); a row-parallel one holds columns `in_index` (its slice of input channels). Per GEMM role
the local operand is then a row or column sub-block of the global 2-D operand:

    column-parallel   w, w_t: rows out_index of [N, K]    dy, dy_t: columns out_index of [T, N]
                      x, x_t: whole (every rank holds the same input)
    row-parallel      w, w_t: columns in_index of [N, K]  x, x_t: columns in_index of [T, K]
                      dy, dy_t: whole (every rank receives the same output gradient)

For a sharded operand:
- a per-tensor scale (FP8 current scaling, a delayed scale before any history, NVFP4's tensor amax)
  comes from the global amax: MAX all-reduce over the tensor-parallel group;
- stochastic rounding draws the uniforms of the operand's global element positions
  (SRGenerator.uniform_block), and the stream advances by the global numel, so every rank's bits are
  the unsharded tensor's bits and the next draw starts where it would at tp = 1;
- block scales (NVFP4, MX) stay inside a shard: `check_blocks` refuses shards that split a block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed import ProcessGroup

from megatron_lowp.errors import UserError
from megatron_lowp.numerics.scaling import amax as tensor_amax
from megatron_lowp.numerics.scaling import scale_from_amax
from megatron_lowp.numerics.sr_random import SRGenerator
from megatron_lowp.precision.spec import ROLE_AXIS, GemmSpecs, QuantSpec

# Per kind, the roles whose local operand is a row (0) or column (1) sub-block; others are whole.
_SHARDED = {"column": {"w": 0, "w_t": 0, "dy": 1, "dy_t": 1}, "row": {"w": 1, "w_t": 1, "x": 1, "x_t": 1}}


class _BlockDraw:
    """Stands in for an SRGenerator for one quantize call: its uniforms are the global tensor's."""

    def __init__(self, gen: SRGenerator, global_shape: tuple[int, int], rows, cols):
        self.gen, self.global_shape, self.rows, self.cols = gen, global_shape, rows, cols

    def uniform(self, shape, device=None) -> torch.Tensor:
        u = self.gen.uniform_block(self.global_shape, self.rows, self.cols, device)
        assert tuple(u.shape) == tuple(shape), (u.shape, shape)
        return u


@dataclass
class LinearShard:
    kind: str  # "column" or "row"
    index: torch.Tensor  # global out (column) or in (row) channels this rank holds, in local order
    global_features: int  # N (column) or K (row)
    group: ProcessGroup
    # the local weight from the parameter (a DTensor shard; the fused qkv gathers its heads' rows)
    local_weight: Callable[[torch.Tensor], torch.Tensor]

    def _max(self, t: torch.Tensor) -> torch.Tensor:
        from megatron_lowp.parallel.tp_comm import max_over_tp

        return max_over_tp(t, self.group)

    def quantize_args(self, role: str, t: torch.Tensor, spec: QuantSpec, gen: SRGenerator,
                      extra: dict) -> tuple[QuantSpec, object, dict]:
        """(spec, generator, extra keyword arguments) for quantizing this rank's part of operand `role`."""
        dim = _SHARDED[self.kind].get(role)
        if dim is None:
            return spec, gen, extra
        extra = dict(extra)
        options = spec.kwargs()
        if spec.format.per_tensor_fp8(options) and "scale" not in extra and "scale" not in options:
            elem_max = spec.format.element_format(options).max_value
            extra["scale"] = scale_from_amax(self._max(tensor_amax(t)), elem_max, options.get("power_of_two", False))
        elif spec.fmt.startswith("fp8") and options.get("scaling", "tensor") == "channel":
            if (ROLE_AXIS[role] % 2) == dim:  # the per-channel amax would run across shards
                raise UserError(f"precision.{role}: FP8 channel scaling along the sharded axis is not supported "
                                "with parallel.tp > 1; use scaling: tensor")
        elif spec.fmt == "nvfp4" and options.get("tensor_scale", "amax") == "amax":
            global_amax = float(self._max(tensor_amax(t)))
            # all zeros: the unsharded tensor gets S = 1, as "off" gives
            fixed = {"tensor_scale": "fixed", "tensor_amax": global_amax} if global_amax > 0 else {"tensor_scale": "off"}
            spec = dataclasses.replace(spec, options=tuple({**options, **fixed}.items()))
        if spec.rounding == "stochastic":
            n_rows, n_cols = t.shape
            index = self.index.to(t.device)
            if dim == 0:
                draw = _BlockDraw(gen, (self.global_features, n_cols), index, None)
            else:
                draw = _BlockDraw(gen, (n_rows, self.global_features), None, index)
            extra["backend"] = "torch"  # the fused kernels draw contiguous counters only
            return spec, draw, extra
        return spec, gen, extra

    def check_blocks(self, specs: GemmSpecs, name: str) -> None:
        """Refuse a shard that would split an NVFP4/MX block (or tile) of a role it shards."""
        for role, dim in _SHARDED[self.kind].items():
            spec = getattr(specs, role)
            size = spec.format.block_size if spec is not None else None
            if spec is None or not size:
                continue
            size = spec.kwargs().get("block_size", size)
            blocked_dim = ROLE_AXIS[role] % 2
            if blocked_dim != dim and not spec.kwargs().get("tile", False):
                continue
            idx = self.index.tolist()
            runs = [i for i in range(len(idx)) if i == 0 or idx[i] != idx[i - 1] + 1] + [len(idx)]
            if any(idx[a] % size or (b - a) % size for a, b in zip(runs, runs[1:], strict=False)):
                raise UserError(f"parallel.tp: {name}'s shard splits the {size}-element blocks of role {role} "
                                f"({spec.fmt}); choose a tp for which each rank's slice of that layer is a "
                                f"multiple of {size}")
