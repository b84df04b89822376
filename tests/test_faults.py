"""Numerical faults: a NaN/Inf gradient is caught on its step and handled by train.nan_policy (skip,
rollback, stop); loss spikes are logged as events (events.jsonl)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_lowp.errors import UserError
from megatron_lowp.run.logs import read_jsonl
from megatron_lowp.train.loop import Trainer
from tests.test_train import small_cfg


def poison(monkeypatch, bad):
    """Make the loss NaN whenever bad(trainer) is true (a stand-in for a bad batch or a blow-up)."""
    original = Trainer._loss

    def loss(self, batch):
        value = original(self, batch)
        return value * float("nan") if bad(self) else value

    monkeypatch.setattr(Trainer, "_loss", loss)


def events(run_dir):
    return read_jsonl(run_dir / "events.jsonl")


def test_skip_policy_skips_the_update_and_counts_it(repo, tmp_path, monkeypatch):
    poison(monkeypatch, lambda tr: tr.step == 3)
    trainer = Trainer(small_cfg(repo, tmp_path, "train.nan_policy=skip"))
    result = trainer.fit()
    assert result.step == 8 and trainer.nonfinite.skipped_steps == 1
    [event] = events(result.run_dir)
    assert event["step"] == 3 and event["event"] == "nonfinite" and event["action"] == "skip"
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    steps = [r["step"] for r in read_jsonl(result.run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 9))
    meta = json.loads((result.run_dir / "checkpoints/step_8/meta.json").read_text())
    assert meta["skipped_steps"] == 1


def test_rollback_reloads_the_last_checkpoint_and_skips_the_bad_data(repo, tmp_path, monkeypatch):
    bad_position = 5 * 8  # the global batch of step 6 (global batch 8): bad data, NaN whenever it is trained on
    poison(monkeypatch, lambda tr: tr.consumed_samples == bad_position)
    trainer = Trainer(small_cfg(repo, tmp_path, "train.nan_policy=rollback", "train.checkpoint_every=2"))
    result = trainer.fit()
    assert result.step == 8
    [event] = events(result.run_dir)
    assert event["action"] == "rollback" and event["step"] == 6 and event["skipped_samples_at"] == bad_position
    assert event["rolled_back_to"].endswith("step_4")
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))  # steps 5-6 redone, not duplicated
    assert all(math.isfinite(r["loss"]) for r in rows)
    meta = json.loads((result.run_dir / "checkpoints/step_8/meta.json").read_text())
    assert meta["skip_batches"] == [bad_position]
    # the skipped batch's samples are not trained on: the run consumed one extra global batch
    assert meta["consumed_samples"] == 8 * 8 + 8


def test_stop_policy_stops_on_the_step_with_a_clear_error(repo, tmp_path, monkeypatch):
    poison(monkeypatch, lambda tr: tr.step == 5)
    trainer = Trainer(small_cfg(repo, tmp_path, "train.nan_policy=stop"))
    with pytest.raises(UserError, match=r"step 5: non-finite gradient norm .*the last checkpoint is .*step_4"):
        trainer.fit()
    assert [e["action"] for e in events(trainer.run_dir)] == ["stop"]
    assert (trainer.run_dir / "checkpoints/step_4/manifest.json").is_file()  # the good checkpoint is intact


def test_too_many_nonfinite_steps_in_a_row_stop_even_when_skipping(repo, tmp_path, monkeypatch):
    poison(monkeypatch, lambda tr: tr.step >= 2)
    trainer = Trainer(small_cfg(repo, tmp_path, "train.nan_policy=skip", "train.max_nonfinite_steps=3"))
    with pytest.raises(UserError, match="4 non-finite steps in a row > train.max_nonfinite_steps"):
        trainer.fit()
    assert [e["action"] for e in events(trainer.run_dir)] == ["skip", "skip", "skip", "stop"]


def test_a_loss_spike_is_an_event(repo, tmp_path, monkeypatch):
    original = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, b: original(self, b) * (4.0 if self.step == 24 else 1.0))
    result = Trainer(small_cfg(repo, tmp_path, "train.steps=26", "train.eval_every=0", "train.log_every=13",
                               "train.checkpoint_every=0")).fit()
    spikes = [e for e in events(result.run_dir) if e["event"] == "loss_spike"]
    assert [e["step"] for e in spikes] == [24] and spikes[0]["loss"] > 2 * spikes[0]["running_mean"]


def test_rollbacks_remember_every_bad_batch_and_every_event(repo, tmp_path, monkeypatch):
    """Two bad global batches after the same checkpoint (samples 48 and 80, met at steps 7 and 10 of 12, checkpoints every 6): the
    second rollback reloads step 6, whose skip list predates both; the first bad batch must stay
    skipped, or the run would loop between them."""
    bad_positions, hits = {6 * 8, 10 * 8}, []

    def bad(trainer):
        if trainer.consumed_samples in bad_positions:
            hits.append(trainer.consumed_samples)  # once per micro-batch: 2 per step
            assert hits.count(trainer.consumed_samples) <= 2, f"a bad batch was trained on again: {hits}"
            return True
        return False

    poison(monkeypatch, bad)
    result = Trainer(small_cfg(repo, tmp_path, "train.nan_policy=rollback", "train.steps=12",
                               "train.checkpoint_every=6")).fit()
    assert result.step == 12 and hits == [48, 48, 80, 80]
    rollbacks = [e for e in events(result.run_dir) if e["action"] == "rollback"]
    assert [(e["step"], e["skipped_samples_at"]) for e in rollbacks] == [(7, 48), (10, 80)]
    meta = json.loads((result.run_dir / "checkpoints/step_12/meta.json").read_text())
    assert meta["skip_batches"] == [48, 80]
    rows = read_jsonl(result.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13)) and all(math.isfinite(r["loss"]) for r in rows)
