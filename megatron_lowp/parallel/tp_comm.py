"""The collectives of tensor parallelism as autograd functions (Megatron's f and g), over one
tensor-parallel process group.

- `copy_to_tp`: forward identity, backward all-reduce: a whole tensor entering column-parallel
  linears, each of which contributes part of its gradient.
- `reduce_from_tp`: forward all-reduce, backward identity: the partial sums of row-parallel linears.
- `gather_rows`: forward all-gather along dim 0, backward reduce-scatter: a dim-0 shard used whole
  (or in other rows) by this rank.
- `sum_over_tp`: forward all-reduce, backward all-reduce: a sum of per-shard parts (nGPT's sum of
  squares over a sharded width) that every rank then uses on its own shard.
Every rank of the group sees identical values for whatever is "whole": identical gradients flow
back into it, so replicated parameters need no extra reduction.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

# torch 2.13 renames the tensor forms of all-gather and reduce-scatter (the old names warn); older torch has only those
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _SumOverTP(torch.autograd.Function):
    """S = sum_r s_r, and rank r uses S only on its own shard (y_r / sqrt(S)), whose contribution
    reaches the loss through the row-parallel sum. The gradient arriving at rank r's S covers rank r's
    path only; dL/dS is the sum of these over ranks, and dL/ds_r = dL/dS for every r: an all-reduce
    backward too (unlike reduce_from_tp, whose output every rank uses identically, so its gradient
    is whole on every rank already)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        ctx.group, n = group, dist.get_world_size(group)
        out = torch.empty((n * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = dist.get_world_size(ctx.group)
        out = torch.empty((grad.shape[0] // n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None


def copy_to_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _ReduceFromTP.apply(x, group)


def gather_rows(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _GatherRows.apply(x, group)


def sum_over_tp(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _SumOverTP.apply(x, group)


def max_over_tp(t: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    """MAX over the group of a tensor that carries no gradient (amaxes, Smooth-SwiGLU scales)."""
    t = t.detach().contiguous().clone()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


# --- sequence parallelism: activations (batch, seq, hidden) split along the sequence (dim 1) ---

def _gather_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    xs = x.transpose(0, 1).contiguous()  # the collectives split dim 0
    out = torch.empty((dist.get_world_size(group) * xs.shape[0], *xs.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, xs, group=group)
    return out.transpose(0, 1).contiguous()


def _scatter_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    xs = x.transpose(0, 1).contiguous()
    out = torch.empty((xs.shape[0] // dist.get_world_size(group), *xs.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter(out, xs, group=group)
    return out.transpose(0, 1).contiguous()


def _own_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    n = x.shape[1] // dist.get_world_size(group)
    r = dist.get_rank(group)
    return x[:, r * n:(r + 1) * n].contiguous()


class _GatherSeq(torch.autograd.Function):
    """Forward all-gather along the sequence; backward reduce-scatter (each rank's gradient covers
    every position, the sum over ranks goes to the position's owner)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _scatter_seq(grad, ctx.group), None


class _ScatterSeq(torch.autograd.Function):
    """Forward reduce-scatter of partial sums to sequence shards; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _SplitSeq(torch.autograd.Function):
    """Forward: this rank's positions of a whole tensor; backward all-gather (every rank's gradient
    of the whole tensor is then the same)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _own_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _GatherSeqWhole(torch.autograd.Function):
    """Forward all-gather into a tensor every rank then uses whole and identically (the LM head);
    backward: this rank's positions of the (identical) gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _own_seq(grad, ctx.group), None


def gather_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _GatherSeq.apply(x, group)


def scatter_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _ScatterSeq.apply(x, group)


def split_seq(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _SplitSeq.apply(x, group)


def gather_seq_whole(x: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
    return _GatherSeqWhole.apply(x, group)
