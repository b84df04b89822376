"""DeepSpeed ZeRO as an engine: `parallel.engine: deepspeed` (ZeRO stage 0-3 on DeepSpeed 0.19).

Configuration. `parallel.deepspeed_config` names a DeepSpeed JSON file (presets in
configs/deepspeed/zero{1,2,3}.json); without one the config is `{"zero_optimization": {"stage":
parallel.zero_stage}}` (a file without a stage also takes parallel.zero_stage). The recipe owns the
batch and the clipping: `train_micro_batch_size_per_gpu` = train.micro_batch_size,
`gradient_accumulation_steps` = global_batch_size / (WORLD_SIZE x micro_batch_size),
`train_batch_size` = train.global_batch_size and `gradient_clipping` = train.grad_clip are always set
here; a file giving other values (not "auto") is refused, naming the key and the file. The file may
not name an `optimizer` or `scheduler` either: the optimizer is ours (optim/adamw.py, handed to
DeepSpeed as its client optimizer) and the training loop sets the LR every step.

Precision. Our recipes compute in BF16 under torch autocast (the loop's forward) with FP32 weights,
FP32 gradients and FP32 master weights, exactly as the ddp/fsdp engines do, so DeepSpeed's `bf16` /
`fp16` sections stay disabled: enabling them would keep the model itself in 16 bits (BF16 weights
and gradient reductions, FP32 masters only inside the ZeRO optimizer) or add fp16 loss scaling, on top
of the recipe's autocast and quantized linears. A file that enables them is obeyed, with a warning
that the numerics are no longer the recipe's.

The step. The loop runs backward on every micro-batch, then asks for the gradient norm (skipping the
update if it is not finite, train.nan_policy) and steps once. `accumulating(last)` tells DeepSpeed
whether a micro-batch ends the global batch (`set_gradient_accumulation_boundary`), so it reduces the
gradients there and `engine.step()`, called once per global batch, always updates; a skipped step
leaves no micro-step count behind. The loop already divides each micro-batch's loss by the number of
micro-batches, so `backward` passes `scale_wrt_gas=False` (DeepSpeed would divide by
gradient_accumulation_steps a second time).

Clipping. ZeRO clips inside its step to `gradient_clipping` = train.grad_clip. `clip_grad_norm`
returns the global gradient norm before clipping, computed before the step with ZeRO's own norm
(over each rank's gradient partition, all-reduced; ZeRO recomputes it in its step). If it is not
finite, `clip_grad_norm` hands the step to DeepSpeed at once: its overflow check discards the
accumulated gradients without an update (for FP32 parameters always, for bf16 with
`check_grad_overflow`, which is therefore required), and the loop's skip/rollback/stop policy
follows. ZeRO computes the norm in FP64 where torch's clip_grad_norm_ (ddp, fsdp) uses FP32, so
clipped steps differ from ddp at the 1e-5 relative level (losses otherwise match ddp bit for bit at
ZeRO 1/2). Stage 0 (DeepSpeed's plain data parallelism) clips like the base engine: the gradients
are all-reduced at the boundary backward, and torch's clip_grad_norm_ clips them and gives the norm
(DeepSpeed's own gradient_clipping is set to 0).

Optimizers. With ZeRO 1-3 the optimizer steps on flat 1-D FP32 partitions of each parameter group,
not on the parameters: torch's AdamW (optim.moments=fp32, optim.master_weights=fp32) is the same
update on any layout, but LowPrecisionAdamW's per-tensor rules (FP8 moments with one scale per weight
matrix for parameters with ndim >= 2, the fp16_pts master grid) would silently fall back to plain
moments on a 1-D partition, so that combination is refused; it works with zero_stage 0 (the optimizer
sees the real parameters) and with the ddp engine.

nGPT (`after_optimizer_step` renormalizes the weights in place). With ZeRO 1/2 the parameters are
full FP32 replicas, but the optimizer updates its own FP32 master partitions and copies them over the
parameters on the next step, which would undo the normalization; so before every step (and before a
checkpoint) the master partitions are refreshed from the parameters (`refresh_fp32_params`, an exact
copy when the parameters are FP32). ZeRO-3 keeps only partitions of every weight, which a row norm
cannot use without gathering, and 16-bit parameters (bf16/fp16 sections) would round the masters: both
are refused for nGPT.

Checkpoints (torch.distributed.checkpoint, through the trainer's CheckpointManager). `state_dict()`
gives the same keys and shapes as the other engines (torch's get_state_dict of the model and a
torch AdamW): `model.<name>` full FP32 weights and buffers, `optim.state.<name>.{step, exp_avg,
exp_avg_sq}` in each parameter's own shape and `optim.param_groups`. With ZeRO each rank contributes
only what it holds: its slice of every FP32 master weight and Adam moment, described to DCP as a
ShardedTensor whose shards are the rectangular pieces of the parameter that the rank's contiguous
flat partition covers. Nothing is gathered to save, and DCP reassembles any layout on load, so a
deepspeed checkpoint resumes at another world size, another ZeRO stage, or with parallel.engine
single/ddp/fsdp, and a ddp/fsdp checkpoint resumes under deepspeed (for an offline consolidated copy:
torch.distributed.checkpoint.format_utils.dcp_to_torch_save). DeepSpeed's own counters (global_steps,
skipped steps) are not saved; the loop keeps the step count. `load_state_dict` also works on a
running engine (train.nan_policy=rollback). Stage 0 saves with get_state_dict like the base engine. ShardedTensor is deprecated in torch (in favour of DTensor, whose even shards
cannot describe ZeRO's partitions) but still read and written by DCP in torch 2.13; its deprecation
notices, and those of the collectives DeepSpeed 0.19 calls by their old names, are filtered.

Not supported: optimizer/parameter offload to NVMe (the partitions are swapped out of memory) and
partitioning over subgroups (MiCS, ZeRO++ hpZ), both refused; pipeline parallelism; DeepSpeed's own
optimizers and schedulers (refused above). CPU offload is untested.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from megatron_lowp.errors import UserError
from megatron_lowp.parallel.dist import DistInfo
from megatron_lowp.parallel.engine import Engine, EngineCapabilities, OptimizerFactory

MISSING_DEEPSPEED = ("parallel.engine: 'deepspeed' needs the deepspeed package (pip install -e .[deepspeed]); "
                     "on Gaudi use Habana's DeepSpeed fork")
# Printed by DeepSpeed at every `steps_per_print` steps: never, the loop logs.
_NEVER = 1 << 62


# --- configuration ------------------------------------------------------------------------------
def _read_json(path: str) -> dict:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"parallel.deepspeed_config: {file} does not exist (presets: configs/deepspeed/"
                        "zero1.json, zero2.json, zero3.json)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"parallel.deepspeed_config: cannot read {file} ({e})") from None
    try:
        config = json.loads(text)
    except ValueError as e:
        raise UserError(f"parallel.deepspeed_config: {file} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise UserError(f"parallel.deepspeed_config: {file} must hold a JSON object, not {type(config).__name__}")
    return config


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and bool(section.get("enabled", False))


def half_precision_sections(config: dict) -> list[str]:
    """The DeepSpeed mixed-precision sections a config enables (bf16, fp16)."""
    return [name for name in ("bf16", "bfloat16", "fp16") if _enabled(config.get(name))]


def build_deepspeed_config(cfg, world_size: int, n_params: int | None = None) -> tuple[dict, list[str]]:
    """The DeepSpeed config for this recipe at this world size, and warnings to show.

    A pure function (no deepspeed import): the file's settings plus the recipe's batch, clipping and
    the loop's accumulation contract; see the module docstring. ZeRO's bucket sizes the file leaves
    out default to the model's parameter count, capped at DeepSpeed's own default (5e8 elements):
    ZeRO allocates a bucket buffer every micro-step, which torch's deterministic mode fills, so a
    5e8-element (2 GB) buffer costs more than a small model's whole step."""
    p, t = cfg.parallel, cfg.train
    where = f"parallel.deepspeed_config ({p.deepspeed_config})" if p.deepspeed_config else "parallel"
    config = _read_json(p.deepspeed_config) if p.deepspeed_config else {}
    notes: list[str] = []
    zero = config.setdefault("zero_optimization", {})
    if not isinstance(zero, dict):
        raise UserError(f"{where}: zero_optimization must be a JSON object")
    stage = zero.setdefault("stage", p.zero_stage)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UserError(f"{where}: zero_optimization.stage is {stage!r}; expected 0, 1, 2 or 3")
    for key in ("optimizer", "scheduler"):
        if key in config:
            raise UserError(f"{where}: remove '{key}': the optimizer is the recipe's (optim.*), handed to DeepSpeed "
                            "as its client optimizer, and the training loop sets the learning rate every step")
    if config.get("managed_gradient_accumulation", True) is not True:
        raise UserError(f"{where}: managed_gradient_accumulation must be true (or absent): the engine marks "
                        "the accumulation boundary (the last micro-batch of each global batch) for DeepSpeed")
    for name in ("bf16", "bfloat16"):
        if _enabled(config.get(name)) and config[name].get("check_grad_overflow", True) is False:
            raise UserError(f"{where}: {name}.check_grad_overflow must stay true: it is how a step with a "
                            "non-finite gradient norm is discarded (train.nan_policy)")
    for kind in ("offload_optimizer", "offload_param"):
        if isinstance(zero.get(kind), dict) and zero[kind].get("device") == "nvme":
            raise UserError(f"{where}: zero_optimization.{kind}.device 'nvme' is not supported: checkpoints "
                            "read the optimizer partitions from memory; use 'cpu' or 'none'")
    if n_params is not None:
        bucket = int(min(5e8, n_params + n_params % 2))  # even: DeepSpeed's all-gather alignment
        keys = ("reduce_bucket_size", "allgather_bucket_size") if stage < 3 else (
            "reduce_bucket_size", "stage3_prefetch_bucket_size")
        for key in keys if stage > 0 else ():
            zero.setdefault(key, bucket)
    if zero.get("mics_shard_size", -1) > 0 or zero.get("zero_hpz_partition_size", 1) > 1:
        raise UserError(f"{where}: mics_shard_size / zero_hpz_partition_size are not supported: checkpoints "
                        "assume every rank holds one partition of the whole data-parallel group")
    micro_batches = t.global_batch_size // (world_size * t.micro_batch_size)
    ours = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": float(t.grad_clip),
    }
    source = {"train_batch_size": "train.global_batch_size", "train_micro_batch_size_per_gpu":
              "train.micro_batch_size", "gradient_accumulation_steps":
              "train.global_batch_size / (WORLD_SIZE x train.micro_batch_size)", "gradient_clipping": "train.grad_clip"}
    for key, value in ours.items():
        given = config.get(key, "auto")
        if given != "auto" and (isinstance(given, bool) or not isinstance(given, (int, float)) or given != value):
            raise UserError(f"{where}: {key} = {given!r}, but the recipe gives {value} ({source[key]} at "
                            f"WORLD_SIZE={world_size}); remove {key} from the file (or set it to \"auto\"): "
                            "the recipe owns the batch and the clipping")
        config[key] = value
    config.setdefault("steps_per_print", _NEVER)
    config.setdefault("wall_clock_breakdown", False)
    if stage == 0:
        # Stage 0 clips like the base engine, with torch's clip_grad_norm_ (which also gives the norm).
        config["gradient_clipping"] = 0.0
    half = half_precision_sections(config)
    if half:
        notes.append(f"{where}: DeepSpeed's {'/'.join(half)} section is enabled: the model's weights, gradients "
                     "and their reductions are then 16-bit (FP32 only in ZeRO's master copy), on top of the "
                     f"recipe's autocast '{cfg.precision.recipe}': numerics differ from the recipe's FP32 weights "
                     "and gradients and from the ddp/fsdp engines")
    return config, notes


# --- rectangular pieces of a contiguous flat range -----------------------------------------------
def flat_range_boxes(shape: tuple[int, ...], start: int, stop: int) -> list[tuple[list[int], list[int], int]]:
    """Split the row-major flat range [start, stop) of a tensor of `shape` into boxes.

    Returns (offsets, sizes, flat_start) per box, in order; every box is itself contiguous in the flat
    order (a run inside one row, or whole rows), so it is a view `flat[flat_start:...].view(sizes)`."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [([start], [stop - start], start)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:  # inside one row of the outermost dimension
        return [([first, *o], [1, *s], first * inner + f)
                for o, s, f in flat_range_boxes(shape[1:], start - first * inner, stop - first * inner)]
    boxes = []
    if start % inner:
        boxes += flat_range_boxes(shape, start, (first + 1) * inner)
        first += 1
    full_end = stop // inner
    if full_end > first:
        boxes.append(([first] + [0] * (len(shape) - 1), [full_end - first, *shape[1:]], first * inner))
    if stop % inner:
        boxes += flat_range_boxes(shape, full_end * inner, stop)
    return boxes


# --- the engine ---------------------------------------------------------------------------------
def import_deepspeed(device_type: str):
    """deepspeed, on the accelerator our device uses (DeepSpeed picks one at import; its accelerator
    names are our device types)."""
    os.environ.setdefault("DS_ACCELERATOR", device_type)
    try:
        import deepspeed
    except ModuleNotFoundError as e:
        if e.name is not None and e.name.split(".")[0] != "deepspeed":
            raise
        raise UserError(MISSING_DEEPSPEED) from None
    from deepspeed.accelerator import get_accelerator

    name = get_accelerator().device_name()
    if device_type != name:
        raise UserError(f"device.type is {device_type} but DeepSpeed runs on its '{name}' accelerator; set "
                        f"DS_ACCELERATOR={device_type} (or device.type={name})")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 calls collectives that torch 2.13 renamed, and our checkpoints describe ZeRO's
    # partitions to DCP as ShardedTensors (see the module docstring): deprecation notices the user
    # can do nothing about, once per collective or checkpoint.
    for message in (r"`torch\.distributed\.\w+` is deprecated\. Please use `torch\.distributed\.\w+_single`",
                    r"Please use DTensor instead and we are deprecating ShardedTensor"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    return deepspeed


def _check_combination(cfg, stage: int, optimizer: torch.optim.Optimizer, half: list[str],
                       constrains_weights: bool) -> None:
    """constrains_weights: the model renormalizes its weights after each step (the model contract)."""
    o = cfg.optim
    if stage >= 1 and type(optimizer) is not torch.optim.AdamW:
        raise UserError(
            f"parallel.engine=deepspeed with ZeRO stage {stage} and optim.moments={o.moments}, "
            f"optim.master_weights={o.master_weights} (LowPrecisionAdamW): ZeRO hands the optimizer flat 1-D "
            "partitions of each parameter group, on which the per-tensor FP8 moment scales and the fp16_pts grid "
            "(parameters with ndim >= 2 only) would silently not apply. With ZeRO use optim.moments=fp32 and "
            "optim.master_weights=fp32 (torch AdamW); for low-precision moments use parallel.zero_stage=0 or "
            "parallel.engine=ddp")
    if stage == 0 and half:
        raise UserError(f"parallel.engine=deepspeed with zero_stage 0 and DeepSpeed's {'/'.join(half)} section is not "
                        "supported (DeepSpeed then wraps the optimizer in its own 16-bit optimizer); use a ZeRO stage "
                        "1-3 or disable the section")
    if constrains_weights and stage == 3:
        raise UserError(f"model.arch={cfg.model.arch} with DeepSpeed ZeRO stage 3: nGPT renormalizes every weight matrix after "
                        "each step, and ZeRO-3 keeps only flat partitions of them; use ZeRO stage 1 or 2, or "
                        "parallel.engine=fsdp")
    if constrains_weights and stage >= 1 and half:
        raise UserError(f"model.arch={cfg.model.arch} with DeepSpeed's {'/'.join(half)} section: the weights renormalized "
                        "after each step would be 16-bit copies of ZeRO's FP32 masters; disable the section "
                        "(the recipe's autocast already computes in BF16)")


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    capabilities = EngineCapabilities(plain_module_gradients=False, tensor_parallel=False)

    @classmethod
    def from_config(cls, cfg, module, make_optimizer, device, recipe, info):
        return cls(cfg, module, make_optimizer, info, device)

    def __init__(self, cfg, module: nn.Module, make_optimizer: OptimizerFactory, info: DistInfo, device):
        deepspeed = import_deepspeed(device.type)
        n_params = sum(p.numel() for p in module.parameters())
        config, notes = build_deepspeed_config(cfg, info.world_size, n_params)
        self.stage = config["zero_optimization"]["stage"]
        self.module = module
        self.info = info
        self._max_norm = float(cfg.train.grad_clip)
        client = make_optimizer(module)
        _check_combination(cfg, self.stage, client, half_precision_sections(config),
                           getattr(module, "constrains_weights", False))
        if info.is_main:
            for note in notes:
                warnings.warn(note, stacklevel=2)
        # Names of the parameters the optimizer owns, per group, and the group settings to checkpoint:
        # ZeRO replaces the groups' parameters with flat partitions.
        names = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self._names = names
        self._group_params: list[list[nn.Parameter]] = [list(g["params"]) for g in client.param_groups]
        self._group_keys = [[k for k in g if k != "params"] for g in client.param_groups]
        # DeepSpeed reads the launcher's variables; one process started without a launcher has none.
        for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", info.world_size)):
            os.environ.setdefault(key, str(value))
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=client, config=config,
                                                             dist_init_required=False)
        self.model = self.ds
        self._pending_state: dict | None = None
        if self.stage >= 1:
            self._zero = self.ds.optimizer  # DeepSpeedZeroOptimizer (1/2) or DeepSpeedZeroOptimizer_Stage3
            self._base = self._zero.optimizer  # our torch AdamW, now over flat partitions
            self._refresh = self.stage in (1, 2) and all(p.dtype == torch.float32 for g in self._group_params
                                                            for p in g)

    # --- a training step ----------------------------------------------------------------------
    def accumulating(self, last: bool):
        self.ds.set_gradient_accumulation_boundary(last)  # DeepSpeed reduces the gradients after the last
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the loop has divided by the number of micro-batches

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """The global gradient norm before clipping; ZeRO clips in step() (to train.grad_clip, its
        config). A non-finite norm makes DeepSpeed discard this step's gradients right away."""
        if max_norm != self._max_norm:
            raise ValueError(f"deepspeed clips to train.grad_clip = {self._max_norm} (its config), not {max_norm}")
        if self.stage == 0:
            return super().clip_grad_norm(max_norm)  # the boundary backward has all-reduced p.grad
        if self.stage in (1, 2):
            norm = self._zero.scaled_global_norm()
        else:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            norm = combine_grad_norm_groups(self._zero._get_norm_groups())
        norm = torch.as_tensor(norm, dtype=torch.float64) / self._zero.loss_scale
        if not math.isfinite(norm.item()):
            self.ds.step()  # ZeRO's overflow check: gradients dropped, no update
            return torch.full((), math.inf)
        return norm.float()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self._sync_masters()
        self.ds.step()

    def _sync_masters(self) -> None:
        """ZeRO 1/2 with FP32 parameters: the parameters are the truth (nGPT renormalizes them after
        the step, a checkpoint may have been loaded into them); copy them into the master partitions."""
        if self.stage >= 1 and self._refresh:
            self._zero.refresh_fp32_params()

    # --- checkpoints --------------------------------------------------------------------------
    def _fragments(self, p: nn.Parameter) -> list[tuple[int, int, torch.Tensor, int]]:
        """This rank's pieces of parameter p: (start in p's flat order, numel, the flat FP32 partition
        holding it, offset in that partition). The partition is also the key of its optimizer state."""
        if self.stage in (1, 2):
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is None:
                return []
            flat = self._zero.single_partition_of_fp32_groups[mapping.param_group_index]
            return [(mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel, flat,
                     mapping.hp_fragment_address.start)]
        group, offset, numel = self._zero.grad_position[self._zero.get_param_id(p)]
        start = self.info.rank * p.partition_numel()
        numel = max(0, min(numel, p.ds_numel - start))
        return [(start, numel, self._zero.fp32_partitioned_groups_flat[group], offset)] if numel else []

    def _flats(self) -> list[torch.Tensor]:
        """This rank's flat FP32 master partitions, the keys of the optimizer state."""
        if self.stage in (1, 2):
            return list(self._zero.single_partition_of_fp32_groups)
        return list(self._zero.fp32_partitioned_groups_flat)

    def _sharded(self, p: nn.Parameter, buffer_of: Any) -> Any:
        """A ShardedTensor in p's shape whose local shards are views of this rank's pieces of
        `buffer_of(flat partition)` (the master weights or an optimizer state)."""
        from torch.distributed._shard.metadata import ShardMetadata
        from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

        shape = tuple(p.ds_shape) if self.stage == 3 else tuple(p.shape)
        if not shape:
            raise UserError("deepspeed checkpoints: 0-dimensional parameters are not supported")
        shards = []
        for start, numel, flat, offset in self._fragments(p):
            data = buffer_of(flat)
            for offsets, sizes, piece_start in flat_range_boxes(shape, start, start + numel):
                at = offset + piece_start - start
                view = data.narrow(0, at, math.prod(sizes)).view(sizes)
                shards.append(Shard(view, ShardMetadata(offsets, sizes, f"rank:{self.info.rank}/{view.device}")))
        sharded = init_from_local_shards(shards, *shape)  # a collective: every rank, every parameter
        # A rank holding no piece leaves the key out: DCP would drop it anyway, and a key that the
        # 2.3-format fallback of DCP's load planner can see but the planner cannot makes it misread
        # the checkpoint as an old one.
        return sharded if shards else None

    def _state_tensors(self) -> dict[int, dict[str, torch.Tensor]]:
        """The optimizer state of every flat partition (keyed by id), created empty before the first
        step so a checkpoint can be loaded into it (installed by load_state_dict)."""
        flats = {id(f): f for f in self._flats()}
        if all(self._base.state.get(f) for f in flats.values()):
            self._pending_state = None
            return {i: self._base.state[f] for i, f in flats.items()}
        if self._pending_state is None:
            amsgrad = any(g.get("amsgrad", False) for g in self._base.param_groups)
            keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if amsgrad else ("exp_avg", "exp_avg_sq")
            self._pending_state = {i: {"step": torch.zeros((), dtype=torch.float32),
                                       **{k: torch.zeros_like(f) for k in keys}} for i, f in flats.items()}
        return self._pending_state

    def state_dict(self) -> dict:
        if self.stage == 0:
            return super().state_dict()  # the optimizer steps on the real parameters
        self._sync_masters()
        params = [p for g in self._group_params for p in g]
        owned = {name for p in params for name in self._names[id(p)]}
        model = {k: v for k, v in self.module.state_dict().items() if k not in owned}  # buffers
        states = self._state_tensors()
        optim_state: dict[str, dict] = {}
        for p in params:
            weights = self._sharded(p, lambda flat: flat)
            per_param = {}
            for key in self._state_keys(states):
                if key == "step":
                    per_param[key] = torch.tensor(self._step_value(states), dtype=torch.float32)
                else:
                    piece = self._sharded(p, lambda flat, key=key: states[id(flat)][key])
                    if piece is not None:
                        per_param[key] = piece
            if weights is not None:
                for name in self._names[id(p)]:
                    model[name] = weights
            optim_state[self._names[id(p)][0]] = per_param
        groups = [{**{k: g[k] for k in keys}, "params": [self._names[id(p)][0] for p in ps]}
                  for g, keys, ps in zip(self.optimizer.param_groups, self._group_keys, self._group_params, strict=True)]
        return {"model": model, "optim": {"state": optim_state, "param_groups": groups}}

    @staticmethod
    def _state_keys(states: dict[int, dict[str, torch.Tensor]]) -> list[str]:
        return sorted({k for s in states.values() for k, v in s.items() if isinstance(v, torch.Tensor)})

    @staticmethod
    def _step_value(states: dict[int, dict[str, torch.Tensor]]) -> float:
        steps = [float(s["step"]) for s in states.values() if "step" in s]
        return max(steps) if steps else 0.0

    def load_state_dict(self, state: dict) -> None:
        if self.stage == 0:
            return super().load_state_dict(state)
        params = {name: p for p in (q for g in self._group_params for q in g) for name in self._names[id(p)]}
        with torch.no_grad():
            for name, value in state["model"].items():  # buffers; the weights were loaded into the masters
                if name not in params:
                    target = self.module.get_buffer(name)
                    if target.data_ptr() != value.data_ptr():
                        target.copy_(value)
            saved_groups = state["optim"]["param_groups"]
            for group, saved in zip(self.optimizer.param_groups, saved_groups, strict=True):
                group.update({k: v for k, v in saved.items() if k != "params"})
            steps = [float(v["step"]) for v in state["optim"]["state"].values() if "step" in v]
            step = max(steps) if steps else 0.0
            if self._pending_state is not None:
                for flat in self._flats():
                    installed = self._pending_state[id(flat)]
                    installed["step"].fill_(step)
                    self._base.state[flat] = installed
                self._pending_state = None
            else:
                for s in self._base.state.values():
                    s["step"].fill_(step)
            self._masters_to_params()

    def shutdown(self) -> None:
        self.ds.destroy()
        super().shutdown()

    def _masters_to_params(self) -> None:
        """Copy the (loaded) FP32 master partitions into the model's parameters on every rank."""
        zero = self._zero
        if self.stage in (1, 2):
            zero.update_lp_params()
            return
        for i in range(len(zero.fp16_partitioned_groups_flat)):
            zero._reassign_or_swap_out_partitioned_parameters(i)
        if zero.persistent_parameters:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
