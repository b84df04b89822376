"""The training loop: one process, one device (the engines of parallel/ plug in later).

Per optimizer step: set the LR from the schedule, take this step's global batch from the sample
stream (a pure function of seed and samples consumed, so resume is exact), accumulate gradients
over micro-batches under the recipe's autocast, clip, step. Host syncs (`.item()`) happen only on
logging, evaluation and checkpoint steps.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lowp import __version__
from megatron_lowp.config import Config, config_to_dict
from megatron_lowp.data import Tokenizer, build_train_stream, build_validation_set, sequence_losses
from megatron_lowp.device import Device, get_device, set_cpu_threads
from megatron_lowp.errors import Preempted, UserError
from megatron_lowp.model import build_model, cross_entropy_loss
from megatron_lowp.optim import build_optimizer, lr_at, qaf_lr_at, schedule_warnings
from megatron_lowp.parallel import build_engine, dist
from megatron_lowp.parallel.dist import env_info, init_distributed
from megatron_lowp.precision import (
    QuantizedLinear,
    build_recipe,
    commit_amax_histories,
    discard_amax_observations,
    set_high_precision_backward,
    set_sr_rank,
)
from megatron_lowp.precision.grad_noise import measure_gradient_noise, to_rows
from megatron_lowp.precision.telemetry import start_telemetry, telemetry_rows
from megatron_lowp.run.atomic import write_json_atomic
from megatron_lowp.run.checkpoint import CheckpointManager, meta_value
from megatron_lowp.run.logs import JsonlLog, NullLog, encode_row
from megatron_lowp.run.run_dir import VALIDATION_JSON, checkpoint_to_resume, prepare_run_dir, write_config
from megatron_lowp.train.faults import StopSignals
from megatron_lowp.train.metrics import MetricsLog
from megatron_lowp.train.progress import Progress


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    loss: float
    val_loss: float | None
    checkpoint: Path | None
    seconds: float


def _resolve_vocab(cfg: Config, tokenizer: Tokenizer) -> None:
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = tokenizer.vocab_size
    elif cfg.model.vocab_size < tokenizer.vocab_size:
        raise UserError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}, {cfg.data.tokenizer}); leave it null to follow the tokenizer"
        )


# Model keys that decide parameter shapes; the others (rope_theta, max_seq_len, ...) may change on resume.
SHAPE_KEYS = ("arch", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden_size",
              "multiple_of", "tie_embeddings")


def _moment_keys(optim: dict) -> tuple[str, ...]:
    """How the Adam moments are stored: a checkpoint's moments only load into the same storage."""
    return ("moments", "moment1_format", "moment2_format") if optim.get("moments") == "fp8" else ("moments",)


def _check_compatible(meta: dict, cfg: Config, path: Path) -> None:
    saved_cfg, now_cfg = meta_value(meta, "config", dict, path), config_to_dict(cfg)
    if not all(isinstance(saved_cfg.get(section, {}), dict) for section in ("model", "optim")):
        raise UserError(f"{path}/meta.json: 'config' is damaged (model/optim are not sections)")
    checked = (("model", SHAPE_KEYS), ("optim", _moment_keys(now_cfg["optim"])))
    diffs = [f"{section}.{k}: checkpoint {saved_cfg[section][k]!r}, recipe {now_cfg[section][k]!r}"
             for section, keys in checked
             for k in keys if k in saved_cfg.get(section, {}) and saved_cfg[section][k] != now_cfg[section][k]]
    if diffs:
        raise UserError(f"{path}: checkpoint is incompatible with this recipe: " + "; ".join(diffs))


HEARTBEATS = ".heartbeats"  # in the run directory: one small file per rank, the step it last started

# Engines whose gradients the gradient-noise monitor can take with torch.autograd.grad on the plain
# module; FSDP2 and DeepSpeed own the backward of their parameters.
MONITOR_ENGINES = ("single", "ddp")


def _check_engine_support(cfg: Config, quantized: bool) -> None:
    if cfg.precision.qaf.auto and cfg.parallel.engine not in MONITOR_ENGINES:
        raise UserError(f"precision.qaf.auto: the gradient-noise monitor runs on parallel.engine "
                        f"{' or '.join(MONITOR_ENGINES)}, not {cfg.parallel.engine}; start QAF by step, tokens "
                        "or fraction instead (precision.qaf.start_step / start_tokens / start_fraction)")


def _check_batch_split(cfg: Config, world_size: int) -> None:
    t = cfg.train
    if t.global_batch_size % (world_size * t.micro_batch_size):
        raise UserError(f"train.global_batch_size: {t.global_batch_size} must be a multiple of "
                        f"WORLD_SIZE ({world_size}) x train.micro_batch_size ({t.micro_batch_size}), so every "
                        "rank runs whole micro-batches of the same global batch")


def _prepare_run_dir_on_main(cfg: Config, main: bool) -> Path:
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


def _check_single_process(cfg: Config) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.parallel.engine == "single":
        raise UserError(
            f"parallel.engine: 'single' trains in one process, but this job has WORLD_SIZE={world} "
            "(torchrun/srun started several); run it as one process"
        )


def _check_qaf(cfg: Config, quantized: bool) -> None:
    q = cfg.precision.qaf
    if not quantized and (q.auto or any(v is not None for v in (q.start_step, q.start_tokens, q.start_fraction))):
        raise UserError(f"precision.qaf: recipe '{cfg.precision.recipe}' quantizes no linear layer, so there is "
                        "nothing to finetune for; QAF needs a quantized recipe (fp4, fp8, custom)")


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        _check_single_process(cfg)
        local = env_info()
        self.device: Device = get_device(cfg.device.type, index=local.local_rank, hpu_mode=cfg.device.hpu_mode)
        self.device.set_deterministic(cfg.device.deterministic)
        threads_note = set_cpu_threads(cfg.device.cpu_threads)
        _check_batch_split(cfg, local.world_size)
        self.dist = init_distributed(self.device.dist_backend, cfg.parallel.timeout_s,
                                     need_group=cfg.parallel.engine != "single")
        self.tokenizer = Tokenizer.load(cfg.data.tokenizer)
        _resolve_vocab(cfg, self.tokenizer)
        t = cfg.train
        # data (megatron_lowp/data/blend.py): one dataset or a weighted blend, ids checked against the tokenizer
        vocab = self.tokenizer.vocab_size
        self.stream = build_train_stream(cfg.data, t.seq_len, seed=cfg.run.seed, vocab_size=vocab)
        self.valid_data = build_validation_set(cfg.data, t, vocab) if t.eval_every else None
        self.recipe = build_recipe(cfg, self.device)
        self.device.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, self.recipe).to(self.device.torch_device)
        set_sr_rank(model, self.dist.rank)
        self.quantized = any(isinstance(m, QuantizedLinear) for m in model.modules())
        _check_qaf(cfg, self.quantized)
        schedule_notes = schedule_warnings(cfg.optim, cfg.precision.qaf if self.quantized else None, t.steps,
                                           t.global_batch_size * t.seq_len)
        _check_engine_support(cfg, self.quantized)
        self.engine = build_engine(cfg, model, lambda m: build_optimizer(m, cfg.optim), self.device, self.recipe,
                                   self.dist)
        self.model, self.optimizer = self.engine.module, self.engine.optimizer  # unwrapped model
        self.main = self.dist.is_main  # the rank that writes logs, configs and checkpoint manifests
        # Only now, with every user setting checked, does anything get written.
        self.run_dir = _prepare_run_dir_on_main(cfg, self.main)
        self.checkpoints = CheckpointManager(self.run_dir, keep=t.keep_checkpoints)
        self.step = 0
        self.consumed_samples = 0
        self.tokens = 0  # trained tokens; kept separately since seq_len may change on resume
        self.train_seconds = 0.0  # wall time spent training, summed over resumes
        self.resumed_from: Path | None = None
        self.qaf_start_step: int | None = None  # first step of quantization-aware finetuning, once begun
        self._qaf_requested = False  # by the gradient-noise monitor (precision.qaf.auto)
        self.grad_noise_ratio: float | None = None  # the monitor's latest overall ratio
        self.numerics_rows: list[dict] = []  # telemetry, gradient-noise and QAF rows for numerics.jsonl
        self.notes: list[str] = [threads_note, *schedule_notes]  # messages for the progress display
        self.events: list[dict] = []  # non-finite steps, rollbacks, loss spikes: events.jsonl
        self.skipped_steps = 0  # updates skipped for a non-finite gradient (in checkpoints)
        self.skip_batches: set[int] = set()  # sample positions of global batches a rollback marked bad
        self._nonfinite_in_a_row = 0
        self._rolled_back = False
        self._loss_mean: float | None = None  # running mean of the loss, for spike events
        self._loss_count = 0
        resume_from = checkpoint_to_resume(cfg, self.run_dir, self.checkpoints)
        self.notes += self.checkpoints.skipped  # checkpoints passed over, and why
        if resume_from is not None:
            self._load(resume_from)
        if self.main:
            write_config(self.run_dir, cfg, self.step)
            if self.valid_data is not None:  # what compare checks runs against (like for like)
                write_json_atomic(self.run_dir / VALIDATION_JSON, self.valid_data.describe(cfg.data))

    # --- state --------------------------------------------------------------------------------
    def _state(self) -> dict:
        return {**self.engine.state_dict(), "rng": self.device.get_rng_state()}

    def _load(self, path: Path) -> None:
        state = self._state()
        meta = self.checkpoints.load(path, state, check=lambda meta: _check_compatible(meta, self.cfg, path))
        self.engine.load_state_dict(state)
        self.device.set_rng_state(state["rng"])
        self.step = meta["step"]
        self.consumed_samples = meta_value(meta, "consumed_samples", int, path)
        self.stream.load_state_dict(meta.get("data"))  # warns if the data changed; blends: counts as a shortcut
        self.skipped_steps = meta_value(meta, "skipped_steps", int, path, 0)
        self.skip_batches = set(meta_value(meta, "skip_batches", list, path, []))
        self.tokens = meta_value(meta, "tokens", int, path)
        self.train_seconds = float(meta_value(meta, "train_seconds", float, path, 0.0))
        self.resumed_from = path
        self.qaf_start_step = meta_value(meta, "qaf_start_step", int, path, None)
        if self.qaf_start_step is not None:
            set_high_precision_backward(self.model, True)

    def save_checkpoint(self) -> Path:
        meta = {
            "consumed_samples": self.consumed_samples,
            "data": self.stream.state_dict(self.consumed_samples),  # the sampler's position and what it depends on
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "qaf_start_step": self.qaf_start_step,
            "skipped_steps": self.skipped_steps,
            "skip_batches": sorted(self.skip_batches),
            "version": __version__,
            "config": config_to_dict(self.cfg),
        }
        return self.checkpoints.save(self.step, self._state(), meta)

    # --- compute ------------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device.torch_device)
        with self.device.autocast(self.recipe.autocast_dtype):
            logits = self.engine.model(batch[:, :-1])
        return cross_entropy_loss(logits, batch[:, 1:])

    # --- quantization-aware finetuning and the gradient-noise monitor ---------------------------
    def _qaf_reason(self, step: int) -> str | None:
        """Why QAF starts at `step`, or None if it does not."""
        q, t = self.cfg.precision.qaf, self.cfg.train
        if q.start_step is not None and step >= q.start_step:
            return f"precision.qaf.start_step = {q.start_step}"
        if q.start_tokens is not None and self.tokens >= q.start_tokens:
            return f"precision.qaf.start_tokens = {q.start_tokens:,} reached"
        if q.start_fraction is not None and step > math.floor(q.start_fraction * t.steps):
            return f"precision.qaf.start_fraction = {q.start_fraction} of {t.steps} steps"
        if self._qaf_requested:
            return f"gradient-noise ratio {self.grad_noise_ratio:.3g} < {self.cfg.precision.grad_noise.threshold:.3g}"
        return None

    def _start_qaf(self, step: int, reason: str) -> None:
        self.qaf_start_step = step
        set_high_precision_backward(self.model, True)
        self.numerics_rows.append({"step": step, "kind": "event", "event": "qaf_start", "reason": reason})
        self.notes.append(f"QAF from step {step} ({reason}): forward stays quantized, backward and update "
                          f"in high precision, LR re-warmed over {self.cfg.precision.qaf.warmup_steps} steps")

    def _monitor_gradient_noise(self, micro: torch.Tensor) -> None:
        g = self.cfg.precision.grad_noise
        report = measure_gradient_noise(self.model, lambda: self._loss(micro))
        self.grad_noise_ratio = report.ratio
        self.numerics_rows += to_rows(report, self.step)
        if report.below(g.threshold):
            action = "starting QAF next step" if self.cfg.precision.qaf.auto else "consider QAF (precision.qaf)"
            self.notes.append(f"step {self.step}: gradient-noise ratio {report.ratio:.3g} fell below "
                              f"{g.threshold:.3g}: FP4 gradients are no longer effective; {action}")
            self._qaf_requested = self.cfg.precision.qaf.auto

    # --- numerical faults ---------------------------------------------------------------------
    def _nonfinite(self, loss: float, norm: float) -> None:
        """Apply train.nan_policy to a step whose gradient norm is NaN/Inf."""
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        discard_amax_observations(self.model)  # an Inf amax must not set the next scales
        self.skipped_steps += 1
        self._nonfinite_in_a_row += 1
        event = {"step": self.step, "event": "nonfinite", "loss": loss, "grad_norm": norm, "action": t.nan_policy}
        latest = self.checkpoints.latest()
        where = f"the last checkpoint is {latest}" if latest else "no checkpoint has been written yet"
        if t.nan_policy == "stop" or self._nonfinite_in_a_row > t.max_nonfinite_steps:
            self.events.append({**event, "action": "stop"})
            reason = ("train.nan_policy is stop" if t.nan_policy == "stop"
                      else f"{self._nonfinite_in_a_row} non-finite steps in a row > train.max_nonfinite_steps")
            raise UserError(f"step {self.step}: non-finite gradient norm ({norm}), loss {loss}; stopping ({reason}); "
                            f"{where}")
        if t.nan_policy == "rollback":
            if latest is None:
                raise UserError(f"step {self.step}: non-finite gradient norm ({norm}); train.nan_policy is rollback "
                                "but no checkpoint has been written yet")
            bad, earlier = self.consumed_samples, set(self.skip_batches)
            self._load(latest)
            self.skip_batches |= earlier | {bad}  # every bad batch found so far, not only the checkpoint's
            self._rolled_back = True
            self.events.append({**event, "rolled_back_to": str(latest), "skipped_samples_at": bad})
            self.notes.append(f"step {event['step']}: non-finite gradient norm; rolled back to {latest} and will skip "
                              f"the {t.global_batch_size} samples at position {bad}")
            return
        # skip: this batch is consumed without an update
        self.consumed_samples += t.global_batch_size
        self.tokens += t.global_batch_size * t.seq_len
        self.events.append(event)
        self.notes.append(f"step {self.step}: non-finite gradient norm ({norm}); update skipped "
                          f"({self.skipped_steps} skipped so far)")

    def _watch_loss(self, loss: float) -> None:
        """A loss spike (above loss_spike_factor x the running mean, after 20 steps) is an event."""
        if self._loss_mean is not None and self._loss_count >= 20 and loss > self.cfg.train.loss_spike_factor * self._loss_mean:
            self.events.append({"step": self.step, "event": "loss_spike", "loss": loss, "running_mean": self._loss_mean})
            self.notes.append(f"step {self.step}: loss spike {loss:.4f} (running mean {self._loss_mean:.4f})")
        self._loss_count += 1
        weight = 0.05 if self._loss_count > 20 else 1 / self._loss_count
        self._loss_mean = loss if self._loss_mean is None else (1 - weight) * self._loss_mean + weight * loss

    def _heartbeat(self) -> None:
        """Each rank notes the step it starts, so a timeout can name the rank that fell behind."""
        beat = self.run_dir / HEARTBEATS / f"rank{self.dist.rank}"
        beat.parent.mkdir(exist_ok=True)
        beat.write_text(f"{self.step} {time.time():.0f}\n")

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the next global batch; returns (loss, grad_norm) as tensors."""
        t, o, p = self.cfg.train, self.cfg.optim, self.cfg.precision
        self.step += 1
        if self.dist.world_size > 1:
            self._heartbeat()
        if self.quantized and self.qaf_start_step is None:
            reason = self._qaf_reason(self.step)
            if reason is not None:
                self._start_qaf(self.step, reason)
        if self.qaf_start_step is not None:
            lr = qaf_lr_at(self.step, self.qaf_start_step, p.qaf, o, t.steps)
        else:
            lr = lr_at(self.step, o, t.steps)
        self.engine.set_lr(lr)
        while self.consumed_samples in self.skip_batches:  # data a rollback found to produce NaN/Inf
            self.consumed_samples += t.global_batch_size
        batch = self.stream.global_batch(self.consumed_samples, t.global_batch_size, self.dist.rank,
                                         self.dist.world_size)  # this rank's share
        micro_batches = batch.split(t.micro_batch_size)
        monitoring = (self.quantized and self.qaf_start_step is None and p.grad_noise.every
                      and self.engine.name in MONITOR_ENGINES)
        if monitoring and self.step % p.grad_noise.every == 0:
            self._monitor_gradient_noise(micro_batches[0])
        telemetry = self.quantized and p.telemetry_every and self.step % p.telemetry_every == 0
        if telemetry:
            start_telemetry(self.model)
        total = torch.zeros((), device=self.device.torch_device)
        for i, micro in enumerate(micro_batches):
            with self.engine.accumulating(last=i == len(micro_batches) - 1):
                loss = self._loss(micro) / len(micro_batches)
                self.engine.backward(loss)
            self.device.mark_step()
            total += loss.detach()
        if telemetry:
            self.numerics_rows += telemetry_rows(self.model, self.step)
        grad_norm = self.engine.clip_grad_norm(t.grad_clip)
        # One host sync per step: a NaN/Inf must be caught before the optimizer applies it.
        loss_now, norm_now = torch.stack([total.float(), grad_norm.float().to(total.device)]).tolist()
        if not math.isfinite(norm_now):  # the norm is global: every rank takes the same decision
            self._nonfinite(loss_now, norm_now)
            return total, grad_norm
        self._nonfinite_in_a_row = 0
        self._watch_loss(loss_now)
        self.engine.step()
        self.model.after_optimizer_step()  # e.g. nGPT puts its weights back on the unit sphere
        # Delayed FP8 scales move once per optimizer step, from the amax over all data-parallel ranks.
        commit_amax_histories(self.model, self.engine.reduce_max if self.dist.world_size > 1 else None)
        self.device.mark_step()
        self.consumed_samples += t.global_batch_size
        self.tokens += t.global_batch_size * t.seq_len
        return total, grad_norm

    @torch.no_grad()
    def evaluate(self) -> float:
        """The validation loss over the recipe's fixed validation set (data/validation.py): the same
        number at any micro-batch size or world size."""
        self.model.eval()

        def losses_of(batch: torch.Tensor) -> torch.Tensor:
            batch = batch.to(self.device.torch_device)
            with self.device.autocast(self.recipe.autocast_dtype):
                logits = self.engine.model(batch[:, :-1])
            return sequence_losses(logits, batch[:, 1:])

        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            return dist.all_reduce(t.to(self.device.torch_device), "sum").cpu()

        loss = self.valid_data.loss(losses_of, self.dist.rank, self.dist.world_size, all_reduce_sum)
        self.model.train()
        return loss

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        last = t.stop_at_step or t.steps
        # Rank 0 writes logs; every rank computes, evaluates and saves its checkpoint shards.
        metrics = (MetricsLog(self.run_dir, self.step, cfg.logging, cfg.run.name, config_to_dict(cfg))
                   if self.main else NullLog())
        numerics = JsonlLog(self.run_dir / "numerics.jsonl", self.step) if self.quantized and self.main else None
        events = JsonlLog(self.run_dir / "events.jsonl", self.step) if self.main else NullLog()
        progress = Progress(t.steps, self.step, cfg.logging.progress, silent=not self.main)
        for note in self.notes:  # e.g. checkpoints passed over on resume, and why
            progress.note(note)
        self.notes = []
        if self.resumed_from is not None:
            progress.note(f"resumed from {self.resumed_from} at step {self.step} ({self.tokens:,} tokens)")
        if self.step >= last:
            progress.note(f"nothing to do: the run is at step {self.step}, train.steps/stop_at_step is {last}")
        earlier = metrics.earlier_rows
        loss_value = next((r["loss"] for r in reversed(earlier) if "loss" in r), float("nan"))
        val_loss = next((r["val_loss"] for r in reversed(earlier) if "val_loss" in r), None)
        ckpt = None
        window_start, window_tokens = time.perf_counter(), 0
        run_start = time.perf_counter()
        train_seconds_before = self.train_seconds
        stop_signals = StopSignals()  # SIGTERM: finish the step, checkpoint, stop (train/faults.py)
        stop_signals.install()
        try:
            while self.step < last:
                loss, grad_norm = self.train_step()
                window_tokens += t.global_batch_size * t.seq_len
                progress.update()
                if self._rolled_back:  # the rows after the checkpoint will be written again (events stay: history)
                    self._rolled_back = False
                    for log in (metrics,) + ((numerics,) if numerics is not None else ()):
                        log.truncate(self.step)
                    self.numerics_rows = []
                    for note in self.notes:
                        progress.note(note)
                    self.notes = []
                    events.write(self.events)
                    self.events = []
                    continue
                if self.events:
                    events.write(self.events)
                    self.events = []
                if numerics is not None and self.numerics_rows:
                    numerics.write(self.numerics_rows)
                self.numerics_rows = []
                for note in self.notes:
                    progress.note(note)
                self.notes = []
                is_last = self.step == last
                do_eval = self.valid_data is not None and (self.step % t.eval_every == 0 or is_last)
                do_log = self.step % t.log_every == 0 or do_eval or is_last
                if do_log:
                    if self.dist.world_size > 1:
                        loss = self.engine.mean_over_ranks(loss)  # the global batch's loss
                    self.device.synchronize()
                    now = time.perf_counter()
                    loss_value = loss.item()
                    row = {
                        "step": self.step,
                        "tokens": self.tokens,
                        "loss": loss_value,
                        "lr": self.optimizer.param_groups[0]["lr"],
                        "grad_norm": grad_norm.item(),
                        "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                        "elapsed_s": train_seconds_before + now - run_start,
                    }
                    if self.quantized:
                        row["qaf"] = self.qaf_start_step is not None
                    if self.grad_noise_ratio is not None:
                        row["grad_noise_ratio"] = self.grad_noise_ratio
                    if not math.isfinite(loss_value):
                        progress.note(f"warning: non-finite loss {loss_value} at step {self.step}")
                    if do_eval:
                        val_loss = self.evaluate()
                        row["val_loss"] = val_loss
                    row.update({f"mem_{k}": v for k, v in self.device.memory_stats().items()})
                    metrics.log(row)
                    progress.show(row)
                    window_start, window_tokens = time.perf_counter(), 0
                stop = stop_signals.requested(self.engine.reduce_max if self.dist.world_size > 1 else None,
                                              self.device.torch_device)
                if is_last or stop or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
                    save_start = time.perf_counter()
                    self.train_seconds = train_seconds_before + save_start - run_start
                    ckpt = self.save_checkpoint()
                    window_start += time.perf_counter() - save_start  # saving is not training time
                if stop and not is_last:
                    raise Preempted(f"stopped by {stop_signals.name} after step {self.step} with checkpoint {ckpt}; "
                                    "run the same command to resume")
        finally:
            stop_signals.uninstall()
            progress.close()
            metrics.close()
            events.close()
            if self.events and self.main:  # e.g. the stop event of a run that ends with an error
                with open(self.run_dir / "events.jsonl", "a", encoding="utf-8") as f:
                    f.write("".join(encode_row(e) for e in self.events))
            if numerics is not None:
                numerics.close()
        return TrainResult(self.run_dir, self.step, self.tokens, loss_value, val_loss, ckpt,
                           train_seconds_before + time.perf_counter() - run_start)


def _is_collective_timeout(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or "timed out" in text or "timeout" in text


def _hung_ranks(run_dir: Path, world_size: int) -> str:
    """From the ranks' heartbeats (their last started step): which ranks fell behind."""
    beats = {}
    for r in range(world_size):
        try:
            beats[r] = int((run_dir / HEARTBEATS / f"rank{r}").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            beats[r] = -1
    behind = [r for r, step in beats.items() if step < max(beats.values())]
    if not behind:
        return "every rank started the same step, so one is stuck inside it"
    return ", ".join(f"rank {r} (last started step {beats[r]})" for r in behind)


def train(cfg: Config) -> TrainResult:
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    except Preempted:
        trainer.engine.shutdown()  # every rank stopped after the same step, with its checkpoint shards written
        raise
    except RuntimeError as e:
        if trainer.dist.world_size == 1 or not _is_collective_timeout(e):
            raise
        raise UserError(
            f"rank {trainer.dist.rank}: a collective did not complete within parallel.timeout_s = "
            f"{cfg.parallel.timeout_s:g} s at step {trainer.step}; behind: {_hung_ranks(trainer.run_dir, trainer.dist.world_size)}. "
            f"A rank is hung or dead; the job stops (last checkpoint: {trainer.checkpoints.latest()})"
        ) from None
    # Only a run that ended well leaves the process group with a barrier: after a failure the other
    # ranks may never arrive, and the launcher ends them.
    trainer.engine.shutdown()
    return result
