"""The training loop, the same for every precision recipe and engine.

Per optimizer step: the recipe's step start (which may override the schedule's LR, e.g. for QAF),
this step's global batch from the sample stream (a pure function of seed and samples consumed, so
resume is exact), gradients accumulated over micro-batches in the recipe's forward context, clip,
step, the recipe's after-step hook. The loop knows no precision: everything a recipe does around
the steps (QAF, monitors, telemetry, delayed scales) comes through the hooks of
precision/recipe.py. Faults (non-finite steps, loss spikes, hung ranks, SIGTERM) are train/faults.py.
Blocks may be compiled (train/compile.py) and checkpointed (model/checkpointing.py); the first step
is measured for the memory ledger (memory/measure.py: memory.json).
Host syncs (`.item()`) happen once per step (the non-finite check) and on logging, evaluation and
checkpoint steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from megatron_lowp import __version__
from megatron_lowp.config import Config, config_to_dict
from megatron_lowp.data import Tokenizer, build_train_stream, build_validation_set, sequence_losses
from megatron_lowp.device import Device, get_device, set_cpu_threads
from megatron_lowp.errors import Preempted, UserError
from megatron_lowp.memory.measure import MemoryWatch
from megatron_lowp.model import build_model, cross_entropy_loss
from megatron_lowp.model.checkpointing import apply_activation_checkpointing
from megatron_lowp.optim import build_optimizer, lr_at, schedule_warnings
from megatron_lowp.parallel import build_engine, dist, engine_class
from megatron_lowp.parallel.dist import env_info, init_distributed
from megatron_lowp.precision import build_recipe
from megatron_lowp.run.atomic import write_json_atomic
from megatron_lowp.run.checkpoint import CheckpointManager, meta_value
from megatron_lowp.run.logs import JsonlLog, NullLog, encode_row
from megatron_lowp.run.run_dir import VALIDATION_JSON, checkpoint_to_resume, write_config
from megatron_lowp.train.compile import compile_blocks
from megatron_lowp.train.faults import (
    Heartbeats,
    LossSpikes,
    NonFiniteSteps,
    StopForNonFinite,
    StopSignals,
    is_collective_timeout,
)
from megatron_lowp.train.metrics import MetricsLog
from megatron_lowp.train.progress import Progress
from megatron_lowp.train.setup import (
    check_batch_split,
    check_compatible,
    check_single_process,
    check_tensor_parallel,
    prepare_run_dir_on_main,
    resolve_vocab,
)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    loss: float
    val_loss: float | None
    checkpoint: Path | None
    seconds: float


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        check_single_process(cfg)
        local = env_info()
        self.device: Device = get_device(cfg.device.type, index=local.local_rank, hpu_mode=cfg.device.hpu_mode)
        self.device.set_deterministic(cfg.device.deterministic)
        self.notes: list[str] = [set_cpu_threads(cfg.device.cpu_threads)]  # messages for the progress display
        self.notes += filter(None, [self.device.tune_host_allocator(cfg.device.cpu_mmap_threshold_kib)])
        capabilities = engine_class(cfg.parallel.engine).capabilities
        check_tensor_parallel(cfg, local.world_size, capabilities)
        check_batch_split(cfg, local.world_size // cfg.parallel.tp)
        self.dist = replace(init_distributed(self.device.dist_backend, cfg.parallel.timeout_s,
                                             need_group=cfg.parallel.engine != "single"), tp=cfg.parallel.tp,
                            sequence_parallel=cfg.parallel.sequence_parallel)
        self.tokenizer = Tokenizer.load(cfg.data.tokenizer)
        resolve_vocab(cfg, self.tokenizer)
        t = cfg.train
        # data (megatron_lowp/data/blend.py): one dataset or a weighted blend, ids checked against the tokenizer
        vocab = self.tokenizer.vocab_size
        self.stream = build_train_stream(cfg.data, t.seq_len, seed=cfg.run.seed, vocab_size=vocab)
        self.valid_data = build_validation_set(cfg.data, t, vocab) if t.eval_every else None
        self.recipe = build_recipe(cfg, self.device)
        self.device.manual_seed(cfg.run.seed)
        model = build_model(cfg.model, self.recipe).to(self.device.torch_device)
        self.recipe.attach(model, self.dist.dp_rank)  # SR streams per data-parallel rank
        self.compile_watch = compile_blocks(model) if t.compile else None  # before checkpointing wraps the blocks
        apply_activation_checkpointing(model, t.activation_checkpointing)
        engine_name = cfg.parallel.engine
        if cfg.parallel.tp > 1:  # (the gradient-noise monitor sums the plain module's tp shards itself)
            engine_name += f" with parallel.tp = {cfg.parallel.tp}"
        self.recipe.check_engine(engine_name, capabilities)
        self.notes += schedule_warnings(cfg.optim, t.steps) + self.recipe.drain()[1]  # e.g. a QAF that cannot fit
        self.engine = build_engine(cfg, model, lambda m: build_optimizer(m, cfg.optim), self.device, self.recipe,
                                   self.dist)
        self.model, self.optimizer = self.engine.module, self.engine.optimizer  # unwrapped model
        self.main = self.dist.is_main  # the rank that writes logs, configs and checkpoint manifests
        # Only now, with every user setting checked, does anything get written.
        self.run_dir = prepare_run_dir_on_main(cfg, self.main)
        self.checkpoints = CheckpointManager(self.run_dir, keep=t.keep_checkpoints)
        self.memory = MemoryWatch(self.model, self.optimizer, self.device, self.run_dir,
                                  enabled=cfg.logging.memory and self.main,
                                  meta={"device": self.device.capabilities.name, "world_size": self.dist.world_size})
        self._first_step_fields: dict = {}  # e.g. the compile time, for the next metrics row
        self.heartbeats = Heartbeats(self.run_dir, self.dist.rank, self.dist.world_size)
        self.step = 0
        self.consumed_samples = 0
        self.tokens = 0  # trained tokens; kept separately since seq_len may change on resume
        self.train_seconds = 0.0  # wall time spent training, summed over resumes
        self.resumed_from: Path | None = None
        self.nonfinite = NonFiniteSteps(t.nan_policy, t.max_nonfinite_steps)
        self.spikes = LossSpikes(t.loss_spike_factor)
        self.stop_signals = StopSignals()  # SIGTERM: finish the step, checkpoint, stop
        self.events: list[dict] = []  # non-finite steps, rollbacks, loss spikes: events.jsonl
        self._rolled_back = False
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
        meta = self.checkpoints.load(path, state, check=lambda meta: check_compatible(meta, self.cfg, path))
        self.engine.load_state_dict(state)
        self.device.set_rng_state(state["rng"])
        self.step = meta["step"]
        self.consumed_samples = meta_value(meta, "consumed_samples", int, path)
        self.stream.load_state_dict(meta.get("data"))  # warns if the data changed; blends: counts as a shortcut
        self.nonfinite.skipped_steps = meta_value(meta, "skipped_steps", int, path, 0)
        self.nonfinite.skip_batches = set(meta_value(meta, "skip_batches", list, path, []))
        self.tokens = meta_value(meta, "tokens", int, path)
        self.train_seconds = float(meta_value(meta, "train_seconds", float, path, 0.0))
        self.recipe.load_state_dict(meta_value(meta, "precision_state", dict, path, {}))
        self.resumed_from = path

    def save_checkpoint(self) -> Path:
        meta = {
            "consumed_samples": self.consumed_samples,
            "data": self.stream.state_dict(self.consumed_samples),  # the sampler's position and what it depends on
            "tokens": self.tokens,
            "train_seconds": self.train_seconds,
            "precision_state": self.recipe.state_dict(),
            **self.nonfinite.state(),
            "version": __version__,
            "config": config_to_dict(self.cfg),
        }
        return self.checkpoints.save(self.step, self._state(), meta)

    # --- compute ------------------------------------------------------------------------------
    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device.torch_device)
        with self.recipe.forward_context(self.device):
            logits = self.engine.model(batch[:, :-1])
        return cross_entropy_loss(logits, batch[:, 1:])

    def _reduce_max(self):
        return self.engine.reduce_max if self.dist.world_size > 1 else None

    def _on_nonfinite(self, loss: float, norm: float) -> None:
        """Apply train.nan_policy (train/faults.py) to a step whose gradient norm is NaN/Inf."""
        t = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        self.recipe.on_skipped_step()
        latest = self.checkpoints.latest()
        try:
            action, event = self.nonfinite.action(self.step, loss, norm, latest)
        except StopForNonFinite as stop:
            self.events.append(stop.event)
            raise
        if action == "rollback":
            bad, earlier = self.consumed_samples, set(self.nonfinite.skip_batches)
            self._load(latest)
            self.nonfinite.skip_batches |= earlier | {bad}  # every bad batch found so far, not only the checkpoint's
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
                          f"({self.nonfinite.skipped_steps} skipped so far)")

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on the next global batch; returns (loss, grad_norm) as tensors."""
        t = self.cfg.train
        self.step += 1
        if self.dist.world_size > 1:
            self.heartbeats.beat(self.step)
        lr = self.recipe.on_step_start(self.step, self.tokens)
        self.engine.set_lr(lr if lr is not None else lr_at(self.step, self.cfg.optim, t.steps))
        while self.consumed_samples in self.nonfinite.skip_batches:  # data a rollback found to produce NaN/Inf
            self.consumed_samples += t.global_batch_size
        batch = self.stream.global_batch(self.consumed_samples, t.global_batch_size, self.dist.dp_rank,
                                         self.dist.dp_size)  # this data-parallel rank's share
        micro_batches = batch.split(t.micro_batch_size)
        self.recipe.before_step(self.step, micro_batches, self._loss)
        total = torch.zeros((), device=self.device.torch_device)
        for i, micro in enumerate(micro_batches):
            with self.engine.accumulating(last=i == len(micro_batches) - 1):
                with self.memory.saved_tensors(self.step, i):
                    loss = self._loss(micro) / len(micro_batches)
                self.engine.backward(loss)
            self.device.mark_step()
            total += loss.detach()
        self.recipe.after_backward(self.step)
        self.memory.after_backward(self.step)
        grad_norm = self.engine.clip_grad_norm(t.grad_clip)
        # One host sync per step: a NaN/Inf must be caught before the optimizer applies it.
        loss_now, norm_now = torch.stack([total.float(), grad_norm.float().to(total.device)]).tolist()
        if not math.isfinite(norm_now):  # the norm is global: every rank takes the same decision
            self._on_nonfinite(loss_now, norm_now)
            return total, grad_norm
        self.nonfinite.finite()
        spike = self.spikes.observe(self.step, loss_now)
        if spike is not None:
            self.events.append(spike)
            self.notes.append(f"step {self.step}: loss spike {loss_now:.4f} (running mean {spike['running_mean']:.4f})")
        self.engine.step()
        self.memory.after_step(self.step)
        self.model.after_optimizer_step()  # e.g. nGPT puts its weights back on the unit sphere
        self.recipe.after_optimizer_step(self._reduce_max())  # e.g. delayed FP8 scales, from the amax over all ranks
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
            with self.recipe.forward_context(self.device):
                logits = self.engine.model(batch[:, :-1])
            return sequence_losses(logits, batch[:, 1:])

        def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
            t = t if self.dist.tp_rank == 0 else torch.zeros_like(t)  # a tp group's ranks hold the same sums
            return dist.all_reduce(t.to(self.device.torch_device), "sum").cpu()

        loss = self.valid_data.loss(losses_of, self.dist.dp_rank, self.dist.dp_size, all_reduce_sum)
        self.model.train()
        return loss

    # --- the loop -----------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        last = t.stop_at_step or t.steps
        # Rank 0 writes logs; every rank computes, evaluates and saves its checkpoint shards.
        metrics = (MetricsLog(self.run_dir, self.step, cfg.logging, cfg.run.name, config_to_dict(cfg))
                   if self.main else NullLog())
        numerics = (JsonlLog(self.run_dir / "numerics.jsonl", self.step) if self.recipe.quantized and self.main
                    else NullLog())
        events = JsonlLog(self.run_dir / "events.jsonl", self.step) if self.main else NullLog()
        progress = Progress(t.steps, self.step, cfg.logging.progress, silent=not self.main)

        def show_notes() -> None:
            for note in self.notes:
                progress.note(note)
            self.notes = []

        show_notes()  # threads, schedule warnings, checkpoints passed over on resume
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
        self.stop_signals.install()
        try:
            while self.step < last:
                step_start = time.perf_counter()
                loss, grad_norm = self.train_step()
                if self.compile_watch is not None and not self.compile_watch.reported:
                    note, event = self.compile_watch.first_step(self.step, time.perf_counter() - step_start)
                    self.notes.append(note)
                    self.events.append(event)
                    self._first_step_fields["compile_s"] = event["first_step_s"]
                window_tokens += t.global_batch_size * t.seq_len
                progress.update()
                rows, recipe_notes = self.recipe.drain()
                self.notes += recipe_notes
                events.write(self.events)
                self.events = []
                if self._rolled_back:  # the rows after the checkpoint will be written again (events stay: history)
                    self._rolled_back = False
                    metrics.truncate(self.step)
                    numerics.truncate(self.step)
                    show_notes()
                    continue
                numerics.write(rows)
                show_notes()
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
                        **self.recipe.log_fields(),  # what the recipe reports, e.g. its QAF phase
                        **self._first_step_fields,
                    }
                    self._first_step_fields = {}
                    if not math.isfinite(loss_value):
                        progress.note(f"warning: non-finite loss {loss_value} at step {self.step}")
                    if do_eval:
                        val_loss = self.evaluate()
                        row["val_loss"] = val_loss
                    row.update({f"mem_{k}": v for k, v in self.device.memory_stats().items()})
                    metrics.log(row)
                    progress.show(row)
                    window_start, window_tokens = time.perf_counter(), 0
                stop = self.stop_signals.requested(self._reduce_max(), self.device.torch_device)
                if is_last or stop or (t.checkpoint_every and self.step % t.checkpoint_every == 0):
                    save_start = time.perf_counter()
                    self.train_seconds = train_seconds_before + save_start - run_start
                    ckpt = self.save_checkpoint()
                    window_start += time.perf_counter() - save_start  # saving is not training time
                if stop and not is_last:
                    raise Preempted(f"stopped by {self.stop_signals.name} after step {self.step} with checkpoint "
                                    f"{ckpt}; run the same command to resume")
        finally:
            self.stop_signals.uninstall()
            self.memory.finish()
            progress.close()
            metrics.close()
            events.close()
            if self.events and self.main:  # e.g. the stop event of a run that ends with an error
                with open(self.run_dir / "events.jsonl", "a", encoding="utf-8") as f:
                    f.write("".join(encode_row(e) for e in self.events))
            numerics.close()
        return TrainResult(self.run_dir, self.step, self.tokens, loss_value, val_loss, ckpt,
                           train_seconds_before + time.perf_counter() - run_start)


def train(cfg: Config) -> TrainResult:
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
    except Preempted:
        trainer.engine.shutdown()  # every rank stopped after the same step, with its checkpoint shards written
        raise
    except RuntimeError as e:
        if trainer.dist.world_size == 1:
            raise
        if trainer.stop_signals.received is not None:  # the job is being stopped and another rank went first
            raise Preempted(f"stopped by {trainer.stop_signals.name} at step {trainer.step} while another rank had "
                            f"already stopped; last checkpoint: {trainer.checkpoints.latest()}") from None
        if not is_collective_timeout(e):
            raise
        raise UserError(
            f"rank {trainer.dist.rank}: a collective did not complete within parallel.timeout_s = "
            f"{cfg.parallel.timeout_s:g} s at step {trainer.step}; behind: {trainer.heartbeats.behind()}. "
            f"A rank is hung or dead; the job stops (last checkpoint: {trainer.checkpoints.latest()})"
        ) from None
    # Only a run that ended well leaves the process group with a barrier: after a failure the other
    # ranks may never arrive, and the launcher ends them.
    trainer.engine.shutdown()
    return result
