"""The memory ledger's prediction, before a run: `megatron-lowp memory RECIPE [overrides]`.

The model is built and run once on fake tensors (torch's FakeTensorMode: shapes and dtypes, no
memory, no arithmetic), in the recipe's autocast, with the recipe's activation checkpointing, and
every tensor that forward and the loss save for backward is recorded (memory/saved.py). Quantized
linears are stood in for by `_StoredLinear`, which keeps tensors of exactly the size their operands
have in the role's stored format (memory/stored.py) instead of quantizing (a fake tensor has no
values to quantize). Parameters, gradients and optimizer state follow from the parameters' shapes
and the optimizer settings. The trace runs the CPU's kernels (e.g. its attention saves a logsumexp,
not a probability matrix); other devices' kernels can save otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from megatron_lowp.config import Config
from megatron_lowp.memory.ledger import Ledger
from megatron_lowp.memory.saved import SavedTensors
from megatron_lowp.memory.stored import stored_bytes
from megatron_lowp.model import build_model, cross_entropy_loss
from megatron_lowp.model.checkpointing import apply_activation_checkpointing
from megatron_lowp.precision.quantized_linear import QuantizedLinear
from megatron_lowp.precision.spec import ROLE_AXIS

MASTER_NOTE = "master_weights: none apart from the parameters, which are FP32 and are the master weights"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def _stand_in(spec, t: torch.Tensor, role: str) -> torch.Tensor:
    """What the quantized linear saves for `role`: t itself in high precision, else its stored bytes."""
    if spec is None:
        s = t.detach()
    else:
        s = torch.empty(stored_bytes(spec, tuple(t.shape), ROLE_AXIS[role], t.dtype), dtype=torch.uint8,
                        device=t.device)
    s._lowp_role = role
    return s


class _StoredLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, specs, dtype: torch.dtype) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        needs_dx, needs_dw = ctx.needs_input_grad[:2]
        saved = ([_stand_in(specs.x_t, x2, "x_t")] if needs_dw else []) + \
                ([_stand_in(specs.w_t, weight, "w_t")] if needs_dx else [])
        ctx.save_for_backward(*saved)
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


class _StoredLinear(nn.Module):
    """A QuantizedLinear's parameters and specs; its forward saves what the real one would, by size."""

    def __init__(self, inner: QuantizedLinear):
        super().__init__()
        self.weight, self.specs = inner.weight, inner.specs

    def forward(self, x: torch.Tensor, col_scale: torch.Tensor | None = None) -> torch.Tensor:
        weight = self.weight if col_scale is None else self.weight * col_scale
        return _StoredLinearFunction.apply(x, weight, self.specs, _compute_dtype(x))


class _TracedRecipe:
    """The recipe as build_model sees it, with quantized linears replaced by their stand-ins."""

    def __init__(self, recipe):
        self.recipe, self.mlp_activation = recipe, recipe.mlp_activation

    def make_linear(self, in_features: int, out_features: int, name: str) -> nn.Module:
        linear = self.recipe.make_linear(in_features, out_features, name)
        return _StoredLinear(linear) if isinstance(linear, QuantizedLinear) else linear


def optimizer_bytes(params: list[torch.Tensor], optim, shards: int = 1) -> int:
    """Adam's state for `params` (cfg.optim): two moments per value in their storage, FP32 per-tensor
    scales for FP8 moments, an FP32 step counter per tensor; moments sharded over `shards` ranks."""
    total = 0
    for p in params:
        if optim.moments == "fp8" and p.ndim >= 2:
            per_value, scalars = 2, 2
        else:
            per_value, scalars = {"fp32": 8, "bf16": 4, "fp8": 8}[optim.moments], 0
        total += math.ceil(p.numel() / shards) * per_value + 4 * (scalars + 1)
    return total


def transient_estimate(tokens: int, vocab: int, operands: list[int], quantized: bool) -> int:
    """The largest short-lived working set, estimated: the loss (BF16 logits, their FP32 copy and FP32
    gradients: ~10 bytes per logit) or, where operands are quantized on the fly, the float32 copies,
    SR uniforms and rounding intermediates of the largest operand (~16 bytes per value)."""
    return max(tokens * vocab * 10, (16 * max(operands, default=0)) if quantized else 0)


def predict(cfg: Config, recipe, world_size: int = 1) -> Ledger:
    """The ledger of one rank of a run of `cfg` (model.vocab_size resolved) with `recipe` built."""
    t = cfg.train
    micro = t.micro_batch_size
    shards = world_size if cfg.parallel.engine == "fsdp" else 1
    operands: list[int] = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = build_model(cfg.model, _TracedRecipe(recipe))
        apply_activation_checkpointing(model, t.activation_checkpointing)
        model.train()
        batch = torch.zeros(micro, t.seq_len + 1, dtype=torch.long)  # as the trainer slices it
        device = _cpu()
        with SavedTensors(model) as saved:
            with recipe.forward_context(device):
                logits = model(batch[:, :-1])
            cross_entropy_loss(logits, batch[:, 1:])
        params = list(model.parameters())
        quantized = [m for m in model.modules() if isinstance(m, _StoredLinear)]
        operands = [micro * t.seq_len * max(m.weight.shape) for m in quantized]
    param_bytes = sum(math.ceil(p.numel() / shards) * p.element_size() for p in params)
    grad_bytes = sum(math.ceil(p.numel() / shards) * p.element_size() for p in params if p.requires_grad)
    ledger = Ledger.from_saved(
        saved.rows, parameters=param_bytes, master_weights=0, gradients=grad_bytes,
        optimizer_state=optimizer_bytes([p for p in params if p.requires_grad], cfg.optim, shards),
        largest_transient=transient_estimate(micro * t.seq_len, cfg.model.vocab_size, operands, bool(quantized)))
    ledger.notes.append(MASTER_NOTE)
    if cfg.parallel.engine == "ddp":
        ledger.notes.append(f"ddp: gradient buckets add about one more copy of the gradients "
                            f"({grad_bytes / 2**20:,.1f} MiB), not counted above")
    if cfg.parallel.engine == "deepspeed":
        ledger.notes.append("deepspeed: ZeRO's partitioning and buffers are not modelled (counted as one process)")
    if shards > 1:
        ledger.notes.append(f"fsdp: parameters, gradients and moments sharded over {shards} ranks")
    return ledger


def _cpu():
    from megatron_lowp.device import get_device

    return get_device("cpu")


def predict_from_config(cfg: Config, world_size: int = 1) -> Ledger:
    """predict() for a loaded recipe: resolves the vocabulary and builds the recipe as training does."""
    from megatron_lowp.data import Tokenizer
    from megatron_lowp.precision import build_recipe
    from megatron_lowp.train.setup import resolve_vocab

    resolve_vocab(cfg, Tokenizer.load(cfg.data.tokenizer))
    return predict(cfg, build_recipe(cfg, _cpu()), world_size)
