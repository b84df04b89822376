"""Checks a run makes before it trains: the process layout, the batch split, the vocabulary, the run
directory, and whether a checkpoint fits the recipe. Each mistake is one UserError naming the key."""

from __future__ import annotations

import os
from pathlib import Path

from megatron_lowp.config import Config, config_to_dict
from megatron_lowp.data import Tokenizer
from megatron_lowp.data.tokenizer import resolve_vocab_size
from megatron_lowp.errors import UserError
from megatron_lowp.parallel import dist
from megatron_lowp.run.checkpoint import meta_value
from megatron_lowp.run.run_dir import prepare_run_dir

# Model keys that decide parameter shapes; the others (rope_theta, max_seq_len, ...) may change on resume.
SHAPE_KEYS = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_size",
              "multiple_of", "tie_embeddings")


def check_single_process(cfg: Config) -> None:
    world, tp = int(os.environ.get("WORLD_SIZE", "1")), cfg.parallel.tp
    if world > tp and cfg.parallel.engine == "single":
        what = "one process" if tp == 1 else f"one tensor-parallel group of parallel.tp = {tp} processes"
        raise UserError(f"parallel.engine: 'single' trains in {what}, but this job has WORLD_SIZE={world} "
                        f"(torchrun/srun started more); start {tp} or use a data-parallel engine")


def check_tensor_parallel(cfg: Config, world_size: int, capabilities) -> None:
    """parallel.tp must divide the world, and the engine must compose with tensor parallelism."""
    p = cfg.parallel
    if p.tp == 1:
        return
    from megatron_lowp.parallel import ENGINES, engine_class
    from megatron_lowp.parallel.tensor_parallel import check_tp_shapes

    if not capabilities.tensor_parallel:
        ok = [e for e in ENGINES if engine_class(e).capabilities.tensor_parallel]
        raise UserError(f"parallel.engine: '{p.engine}' does not compose with parallel.tp = {p.tp}; "
                        f"tensor parallelism works with {', '.join(ok)}")
    check_tp_shapes(cfg.model, p.tp)
    if p.sequence_parallel and cfg.train.seq_len % p.tp:
        raise UserError(f"parallel.sequence_parallel: train.seq_len ({cfg.train.seq_len}) must be a multiple of "
                        f"parallel.tp ({p.tp}) to split the sequence evenly")
    if world_size % p.tp:
        raise UserError(f"parallel.tp: {p.tp} does not divide WORLD_SIZE ({world_size}): the ranks form a dp x tp "
                        f"mesh; start a multiple of {p.tp} processes (torchrun --nproc_per_node, launch/)")
    if cfg.precision.telemetry_every:
        raise UserError("precision.telemetry_every: per-layer telemetry counts this rank's shard only under "
                        f"parallel.tp = {p.tp}; set it to 0 (or train with tp = 1)")


def check_batch_split(cfg: Config, dp_size: int) -> None:
    t = cfg.train
    if t.global_batch_size % (dp_size * t.micro_batch_size):
        raise UserError(f"train.global_batch_size: {t.global_batch_size} must be a multiple of the data-parallel "
                        f"size ({dp_size}: WORLD_SIZE / parallel.tp) x train.micro_batch_size "
                        f"({t.micro_batch_size}), so every rank runs whole micro-batches of the same global batch")


def resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
    """model.vocab_size: null follows the tokenizer (data/tokenizer.py, shared with `megatron-lowp config`)."""
    cfg.model.vocab_size = resolve_vocab_size(cfg.model.vocab_size, tokenizer, cfg.data.tokenizer)


def prepare_run_dir_on_main(cfg: Config, main: bool) -> Path:
    """Rank 0 prepares the run directory (or fails with the user's error); every rank learns the
    outcome, so a refusal ends all ranks at once instead of leaving them waiting."""
    path, error = None, None
    if main:
        try:
            path = prepare_run_dir(cfg)
        except UserError as e:
            error = str(e)
    path, error = dist.broadcast_object((path, error))
    if error is not None:
        raise UserError(error)
    return Path(path)


def _moment_keys(optim: dict) -> tuple[str, ...]:
    """How the Adam moments are stored: a checkpoint's moments only load into the same storage."""
    return ("moments", "moment1_format", "moment2_format") if optim.get("moments") == "fp8" else ("moments",)


def check_compatible(meta: dict, cfg: Config, path: Path) -> None:
    """A checkpoint whose model shapes or moment storage differ from the recipe's is refused by name."""
    saved_cfg, now_cfg = meta_value(meta, "config", dict, path), config_to_dict(cfg)
    if not all(isinstance(saved_cfg.get(section, {}), dict) for section in ("model", "optim")):
        raise UserError(f"{path}/meta.json: 'config' is damaged (model/optim are not sections)")
    checked = (("model", SHAPE_KEYS), ("optim", _moment_keys(now_cfg["optim"])))
    diffs = [f"{section}.{k}: checkpoint {saved_cfg[section][k]!r}, recipe {now_cfg[section][k]!r}"
             for section, keys in checked
             for k in keys if k in saved_cfg.get(section, {}) and saved_cfg[section][k] != now_cfg[section][k]]
    if diffs:
        raise UserError(f"{path}: checkpoint is incompatible with this recipe: " + "; ".join(diffs))
