"""Tensor and sequence parallelism (Megatron's layout) on a DTensor device mesh.

Within a block, per tp group of N ranks:
- column-parallel (each rank holds out_features / N rows of the weight): attention's q, k, v (whole
  heads: GQA heads split by tp) and the MLP's gate and up; their input is the full hidden state,
  their output the rank's slice of heads or FFN channels;
- row-parallel (in_features / N columns): attention's out and the MLP's down; each rank multiplies
  its slice, and the partial sums are added across the group (reduce-scattered to the sequence
  shards with sequence parallelism);
- sequence-parallel: between the linears, the residual stream, the norms and nGPT's normalized
  hidden state are split along the sequence (each rank holds seq / N positions; all-gathered into
  the column-parallel linears, reduce-scattered out of the row-parallel ones).
The embedding and the LM head stay whole on every rank (vocabularies here are small; the LM head's
input is gathered back to the full sequence).

Parameters become DTensors sharded on the tp mesh dimension, so checkpoints (DCP) save global
tensors and resume at any tp degree. The linears compute on their local shards (precision
recipes' quantized linears make their scales and stochastic rounding global: precision/
quantized_linear.py), and return DTensors whose placements say what is still to be reduced.
Element-wise work between the linears runs on DTensors too, so reductions over a sharded
dimension (Smooth-SwiGLU's per-token max over the FFN width, nGPT's norms of the down inputs)
are taken over the whole tensor, as at tp = 1.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module

from megatron_lowp.errors import UserError


def _as_dtensor(x, mesh: DeviceMesh, placement) -> DTensor:
    return x if isinstance(x, DTensor) else DTensor.from_local(x, mesh, [placement], run_check=False)


class ShardedLinear(ParallelStyle):
    """A linear (any module whose 2-D parameters are [out, in] weights) split over the tp mesh:
    dim 0 (column-parallel) or dim 1 (row-parallel). 1-D parameters that belong to the output
    channels (e.g. nGPT's scalars after a column-parallel projection) are split with them."""

    def __init__(self, weight_dim: int, input_from, input_to, output_to, local_output: bool):
        super().__init__()
        self.weight_dim, self.input_from, self.input_to = weight_dim, input_from, input_to
        self.output_to, self.local_output = output_to, local_output

    def _partition(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for pname, p in list(module.named_parameters(recurse=False)):
            dim = self.weight_dim if p.ndim == 2 else 0
            module.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Shard(dim)]),
                                                          requires_grad=p.requires_grad))

    def _input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = _as_dtensor(inputs[0], mesh, self.input_from)
        if x.placements != (self.input_to,):
            x = x.redistribute(placements=[self.input_to])
        return (x, *inputs[1:])

    def _output(self, module: nn.Module, output: DTensor, mesh: DeviceMesh):
        if output.placements != (self.output_to,):
            output = output.redistribute(placements=[self.output_to])
        return output.to_local() if self.local_output else output

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        return distribute_module(module, mesh, self._partition, self._input, self._output)


def column_parallel(sequence_parallel: bool, local_output: bool = False) -> ShardedLinear:
    """Input: the full hidden state (gathered from sequence shards); output: this rank's channels."""
    source = Shard(1) if sequence_parallel else Replicate()
    return ShardedLinear(0, source, Replicate(), Shard(-1), local_output)


def row_parallel(sequence_parallel: bool) -> ShardedLinear:
    """Input: this rank's channels; output: the sum over ranks (reduce-scattered to sequence shards)."""
    return ShardedLinear(1, Shard(-1), Shard(-1), Shard(1) if sequence_parallel else Replicate(), False)


class SequenceShards(ParallelStyle):
    """A module that works position by position (norms): input and output split along the sequence."""

    def _apply(self, module: nn.Module, mesh: DeviceMesh) -> nn.Module:
        def inputs(mod, args, mesh):
            return (_as_dtensor(args[0], mesh, Shard(1)), *args[1:])

        def partition(name, mod, mesh):
            for pname, p in list(mod.named_parameters(recurse=False)):
                mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Replicate()])))

        return distribute_module(module, mesh, partition, inputs, None)


def check_tp_shapes(model: nn.Module, tp: int) -> None:
    """Heads, FFN channels and hidden sizes must split evenly over tp ranks (one clear line if not)."""
    cfg = model.cfg
    n_kv = cfg.n_kv_heads or cfg.n_heads
    for key, value in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", n_kv)):
        if value % tp:
            raise UserError(f"parallel.tp: {tp} does not divide {key} ({value}): tensor parallelism splits "
                            "attention by whole heads; choose a tp that divides both head counts")
    ffn = model.layers[0].mlp.up.weight.shape[0]
    if ffn % tp:
        raise UserError(f"parallel.tp: {tp} does not divide the FFN width ({ffn}, model.ffn_hidden_size)")


def parallelize_blocks(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """Apply the tensor/sequence-parallel plan to every block of `model` (in place); the model's
    forward must already speak DTensor between blocks (model/<arch>.py: `tp_plan`)."""
    tp = tp_mesh.size()
    check_tp_shapes(model, tp)
    for block in model.layers:
        parallelize_module(block, tp_mesh, block.tp_plan(column_parallel, row_parallel, SequenceShards,
                                                         sequence_parallel))
        block.set_tp(tp, tp_mesh)
