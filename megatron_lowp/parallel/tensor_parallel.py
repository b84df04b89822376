"""Tensor parallelism (Megatron's layout) for Llama and nGPT, on the tp dimension of a device mesh.

Within a block, per tp group of N ranks:
- column-parallel (each rank holds out_features / N rows of the weight): attention's qkv (whole
  heads: q and GQA k/v heads split by tp) and the MLP's gate and up; their input is the whole hidden
  state, their output the rank's heads or FFN channels;
- row-parallel (in_features / N columns): attention's out and the MLP's down; each rank multiplies
  its slice and the partial sums are added over the group at the attention/MLP output, so anything
  the MLP applies to its output (per-token Smooth-SwiGLU's scale) is applied before the sum;
- 1-D parameters indexed by those channels (a module's `channel_params`: nGPT's s_qk per query
  channel, s_u/s_v per FFN channel) are sharded with them; a norm over such a sharded width (nGPT's
  FNGPT N(.) of the attn.out and mlp.down inputs) takes its sum of squares over tp through the
  module's `sum_across_shards`;
- the embedding, the norms, the residual stream and the LM head stay whole on every rank; with
  sequence parallelism the residual stream and the parameters applied to it position by position
  (the model's `residual_stream_parameters()`: Llama's norms, nGPT's alphas) see seq / N positions
  per rank instead (all-gathered into the attention and MLP, reduce-scattered out of them).

Parameters become DTensors sharded on the tp mesh dimension (Shard(0) column-parallel, Shard(1)
row-parallel) in their usual layout, so checkpoints (DCP) hold global tensors and resume at any tp
degree, and FSDP2 can shard them further over dp. The fused qkv weight is stored in contiguous
row chunks like any column-parallel weight; since those chunks do not hold whole q/k/v heads, its
forward all-gathers the weight over tp and takes this rank's head rows (its gradient is
reduce-scattered back): one weight all-gather per layer per forward, the price of keeping the
fused layout, its initialisation and its checkpoints unchanged.

The linears compute on local shards; their `tp` (a LinearShard, precision/tp_shard.py) tells a
quantized linear which global operand each local one belongs to, for global amaxes and SR draws.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megatron_lowp.config.schema import ModelConfig
from megatron_lowp.errors import UserError
from megatron_lowp.model.llama import ffn_hidden_size
from megatron_lowp.parallel.tp_comm import (
    copy_to_tp,
    gather_rows,
    gather_seq,
    gather_seq_whole,
    max_over_tp,
    reduce_from_tp,
    scatter_seq,
    split_seq,
    sum_over_tp,
)
from megatron_lowp.precision.tp_shard import LinearShard


def check_tp_shapes(cfg: ModelConfig, tp: int) -> None:
    """The model must be one we can split, its heads and FFN channels evenly over tp ranks."""
    from megatron_lowp.model import ARCHS

    if not getattr(ARCHS[cfg.arch], "tensor_parallel", False):
        ok = ", ".join(name for name, cls in ARCHS.items() if getattr(cls, "tensor_parallel", False))
        raise UserError(f"parallel.tp: {tp}: model.arch {cfg.arch} has no tensor-parallel plan (it has: {ok}); "
                        "use parallel.tp=1 with ddp/fsdp")
    n_kv = cfg.n_kv_heads or cfg.n_heads
    for key, value in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", n_kv)):
        if value % tp:
            raise UserError(f"parallel.tp: {tp} does not divide {key} ({value}): tensor parallelism splits "
                            "attention by whole heads; choose a tp that divides both head counts")
    ffn = ffn_hidden_size(cfg)
    if ffn % tp:
        raise UserError(f"parallel.tp: {tp} does not divide the FFN width ({ffn}, model.ffn_hidden_size)")


def _chunk(rank: int, size: int, tp: int, start: int = 0) -> torch.Tensor:
    n = size // tp
    return torch.arange(start + rank * n, start + (rank + 1) * n)


def _local(w: torch.Tensor) -> torch.Tensor:
    return w.to_local()


def _gathered_rows(w: torch.Tensor, index: torch.Tensor, group) -> torch.Tensor:
    return gather_rows(w.to_local(), group)[index.to(w.device)]


def _shard(linear: nn.Module, mesh: DeviceMesh, kind: str, index: torch.Tensor, global_features: int,
           local_weight) -> None:
    dim = 0 if kind == "column" else 1
    w = linear.weight
    linear.weight = nn.Parameter(distribute_tensor(w.detach(), mesh, [Shard(dim)]), requires_grad=w.requires_grad)
    linear.tp = LinearShard(kind, index, global_features, mesh.get_group(), local_weight)
    if hasattr(linear, "specs"):  # a quantized linear: its blocks must not straddle shards
        linear.tp.check_blocks(linear.specs, getattr(linear, "name", "a linear"))


def _shard_channel_params(module: nn.Module, mesh: DeviceMesh) -> None:
    """The module's `channel_params` (1-D, one entry per channel of its column-parallel output),
    sharded with those channels: contiguous chunks, Shard(0) like the weights' rows."""
    for name in getattr(module, "channel_params", ()):
        p = getattr(module, name, None)
        if p is not None:
            setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)]),
                                               requires_grad=p.requires_grad))
    if hasattr(module, "local_shard"):
        module.local_shard = _local


def _whole_in_partial_out(module: nn.Module, group, sequence_parallel: bool) -> None:
    """The module's first input enters column-parallel linears (f, or an all-gather of the sequence
    shards); its output is a partial sum (g, or a reduce-scatter to the sequence shards)."""
    enter, leave = (gather_seq, scatter_seq) if sequence_parallel else (copy_to_tp, reduce_from_tp)
    module.register_forward_pre_hook(lambda mod, args: (enter(args[0], group), *args[1:]))
    module.register_forward_hook(lambda mod, args, out: leave(out, group))


def _split_sequence(model: nn.Module, group) -> None:
    """Sequence parallelism: the residual stream between the blocks holds seq / tp positions per
    rank; the LM head gets the whole sequence back. The gradients of the parameters applied to it
    position by position (`residual_stream_parameters()`) are then sums over this rank's positions
    only: `sync_sequence_parallel_grads` adds them over tp."""
    model.embed.register_forward_hook(lambda mod, args, out: split_seq(out, group))
    model.lm_head.register_forward_pre_hook(lambda mod, args: (gather_seq_whole(args[0], group), *args[1:]))
    model.sequence_parallel_group = group


def sync_sequence_parallel_grads(model: nn.Module) -> None:
    """After the last backward of a step: the residual-stream parameters' gradients, summed over tp.
    (Asked of the model now, not at `parallelize`: FSDP replaces the parameter objects after it.)"""
    group = getattr(model, "sequence_parallel_group", None)
    if group is None:
        return
    for p in model.residual_stream_parameters():
        g = p.grad
        if g is not None:
            torch.distributed.all_reduce(g.to_local() if isinstance(g, DTensor) else g, group=group)


def parallelize(model: nn.Module, mesh: DeviceMesh, sequence_parallel: bool = False) -> None:
    """Apply the tensor-parallel plan to every block of `model` (in place) on the 1-D tp `mesh`."""
    tp, rank, group = mesh.size(), mesh.get_local_rank(), mesh.get_group()
    check_tp_shapes(model.cfg, tp)
    for block in model.layers:
        attn, mlp = block.attn, block.mlp
        nh, nkv, hd = attn.n_heads, attn.n_kv_heads, attn.head_dim
        qkv_rows = torch.cat([_chunk(rank, nh * hd, tp), _chunk(rank, nkv * hd, tp, nh * hd),
                              _chunk(rank, nkv * hd, tp, (nh + nkv) * hd)])
        _shard(attn.qkv, mesh, "column", qkv_rows, (nh + 2 * nkv) * hd,
               functools.partial(_gathered_rows, index=qkv_rows, group=group))
        _shard(attn.out, mesh, "row", _chunk(rank, nh * hd, tp), nh * hd, _local)
        attn.n_heads, attn.n_kv_heads = nh // tp, nkv // tp
        ffn = mlp.up.weight.shape[0]
        for linear in (getattr(mlp, "gate", None), mlp.up):  # nGPT's relu2 MLP has no gate
            if linear is not None:
                _shard(linear, mesh, "column", _chunk(rank, ffn, tp), ffn, _local)
        _shard(mlp.down, mesh, "row", _chunk(rank, ffn, tp), ffn, _local)
        for module in (attn, mlp):
            _shard_channel_params(module, mesh)
            if hasattr(module, "sum_across_shards"):
                module.sum_across_shards = functools.partial(sum_over_tp, group=group)
        act = getattr(mlp, "act", None)
        if hasattr(act, "max_across_shards"):
            act.max_across_shards = functools.partial(max_over_tp, group=group)
        _whole_in_partial_out(attn, group, sequence_parallel)
        _whole_in_partial_out(mlp, group, sequence_parallel)
    if sequence_parallel:
        _split_sequence(model, group)
