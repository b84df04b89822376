"""Like-for-like comparisons and a smooth first hour: the validation set does not depend on the batch
layout, a mismatched tokenizer is an error, compare refuses runs validated on other data, short runs
say what their schedule cannot do, user errors under torchrun are one line, CPU threads are chosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_lowp import cli
from megatron_lowp.config import load_config
from megatron_lowp.config.schema import OptimConfig, QafConfig
from megatron_lowp.device.threads import choose_cpu_threads
from megatron_lowp.errors import UserError
from megatron_lowp.optim import qaf_warnings, schedule_warnings
from megatron_lowp.precision import available_recipes
from megatron_lowp.train.loop import Trainer
from tests.test_distributed import _free_port
from tests.test_train import SMALL, small_cfg

REPO = Path(__file__).resolve().parents[1]


def _trainer(tmp_path: Path, name: str, *overrides: str) -> Trainer:
    return Trainer(small_cfg(REPO, tmp_path, f"run.name={name}", "train.eval_samples=12", "train.eval_batch_size=4",
                             *overrides))


# --- the validation set ------------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["bf16", "fp4"])
def test_validation_loss_is_the_same_at_any_micro_batch(tmp_path, recipe):
    """Same weights (step 0, same seed), micro-batch 1, 2 and 8: bit-identical validation loss, also for
    NVFP4, whose per-tensor scale would see other operands in batches of another size."""
    values = [_trainer(tmp_path, f"mb{mb}", f"train.micro_batch_size={mb}", f"precision.recipe={recipe}").evaluate()
              for mb in (1, 2, 8)]
    assert values[0] == values[1] == values[2], values


def test_validation_partial_sums_of_any_world_size_add_up_to_one_process(tmp_path):
    trainer = _trainer(tmp_path, "ranks", "train.eval_samples=13", "train.eval_batch_size=3")
    trainer.recipe.autocast_dtype = None  # FP32

    def losses_of(batch):
        from megatron_lowp.data import sequence_losses
        with torch.no_grad():
            return sequence_losses(trainer.model(batch[:, :-1]), batch[:, 1:])

    vset = trainer.valid_data
    one = vset.partial_sums(losses_of)
    for world in (2, 3, 4, 7):
        total = sum(vset.partial_sums(losses_of, r, world) for r in range(world))
        assert torch.equal(total, one), world  # disjoint shards, exactly the same sequences and chunks
    assert one.ne(0).all() and vset.tokens == 13 * vset.seq_len


DRIVER = """
import json, sys
from megatron_lowp.config import load_config
from megatron_lowp.precision import available_recipes
from megatron_lowp.train.loop import Trainer
cfg = load_config(sys.argv[1], sys.argv[2:], extra_choices={"precision.recipe": available_recipes()})
trainer = Trainer(cfg)
trainer.recipe.autocast_dtype = None  # FP32: only the reduction order may differ
value = trainer.evaluate()
if trainer.dist.rank == 0:
    print(json.dumps({"val_loss": value}))
trainer.engine.shutdown()
"""


@pytest.mark.parametrize("engine", ["fsdp", pytest.param("ddp", marks=pytest.mark.slow)])
def test_validation_loss_under_torchrun_equals_one_process(tmp_path, engine):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    args = [str(REPO / "recipes/quickstart.yaml"), *SMALL, "train.eval_samples=12", "train.eval_batch_size=4",
            "logging.progress=false", f"run.out_dir={tmp_path}", "parallel.fsdp_param_dtype=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def run(cmd):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])["val_loss"]

    single = run([sys.executable, str(driver), *args, "run.name=one"])
    two = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(driver), *args, "run.name=two", f"parallel.engine={engine}",
               "train.micro_batch_size=2"])
    assert abs(two - single) <= 1e-6 * abs(single), (single, two)


def test_eval_command_reproduces_the_training_val_loss_exactly(tmp_path, capsys):
    assert cli.main(["train", str(REPO / "recipes/quickstart.yaml"), *SMALL, f"run.out_dir={tmp_path}", "run.name=r",
                     "train.steps=4", "train.eval_every=4", "train.checkpoint_every=4", "train.eval_samples=12",
                     "train.eval_batch_size=4", "logging.progress=false"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    trained = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    from megatron_lowp.eval.evaluate import evaluate

    result = evaluate(tmp_path / "r", bf16=False)
    assert result["trained_precision"]["loss"] == trained
    record = json.loads((tmp_path / "r" / "validation.json").read_text())
    assert record["fingerprint"] == result["trained_precision"]["validation"]["fingerprint"]
    assert record["samples"] == 12 and record["tokens"] == 12 * 32


def test_the_removed_eval_iters_key_names_its_replacement():
    with pytest.raises(UserError, match="'train.eval_iters' was removed: set train.eval_samples"):
        load_config(REPO / "recipes/quickstart.yaml", ["train.eval_iters=3"],
                    extra_choices={"precision.recipe": available_recipes()})


# --- tokenizers ------------------------------------------------------------------------------------
def test_data_prepared_with_another_tokenizer_is_an_error_with_an_override(tmp_path):
    from megatron_lowp.data.prepare import PrepareConfig, prepare
    from megatron_lowp.data.tokenizer_train import TokenizerTrainConfig, train_tokenizer

    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i} about hackers and jargon {i * 7}"}) + "\n"
                            for i in range(400)))
    other = tmp_path / "other.model"
    train_tokenizer(TokenizerTrainConfig(inputs=[str(text)], vocab_size=300, output=str(other), threads=1,
                                         model_type="bpe"))
    prepare(PrepareConfig(inputs=[str(text)], tokenizer=str(other), output_prefix=str(tmp_path / "d"),
                          valid_fraction=0.1, workers=0, progress=False))
    data = [f"data.train={tmp_path}/d_train", f"data.valid={tmp_path}/d_valid"]
    with pytest.raises(UserError, match=r"d_train was prepared with the tokenizer .*other\.model.*but data\.tokenizer "
                                         r"is embedded.*data\.allow_tokenizer_mismatch=true"):
        Trainer(small_cfg(REPO, tmp_path, *data))
    Trainer(small_cfg(REPO, tmp_path, *data, "run.name=meant", "data.allow_tokenizer_mismatch=true"))
    Trainer(small_cfg(REPO, tmp_path, *data, "run.name=right", f"data.tokenizer={other}"))


# --- compare ---------------------------------------------------------------------------------------
def test_compare_refuses_runs_validated_on_other_sequences_and_flags_them_when_asked(tmp_path, capsys):
    def train(name, *extra):
        assert cli.main(["train", str(REPO / "recipes/quickstart.yaml"), *SMALL, f"run.out_dir={tmp_path}",
                         f"run.name={name}", "train.steps=4", "train.eval_every=4", "train.checkpoint_every=0",
                         "train.eval_samples=8", "logging.progress=false", *extra]) == 0

    train("base")
    train("same", "train.micro_batch_size=2")  # another layout, the same validation set
    train("other", "train.eval_samples=12")
    capsys.readouterr()
    assert cli.main(["compare", str(tmp_path / "same"), "--baseline", str(tmp_path / "base"),
                     "--out", str(tmp_path / "ok")]) == 0
    report = (tmp_path / "ok" / "report.md").read_text()
    assert "last train" in report and "train (mean of last 5 logs)" in report and "NOT comparable" not in report
    capsys.readouterr()
    status = cli.main(["compare", str(tmp_path / "other"), "--baseline", str(tmp_path / "base"),
                       "--out", str(tmp_path / "no")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "other was validated on something else than the baseline base: validation set (samples 12 vs 8)" in err
    assert cli.main(["compare", str(tmp_path / "other"), "--baseline", str(tmp_path / "base"),
                     "--out", str(tmp_path / "flagged"), "--allow-different-validation"]) == 0
    summary = json.loads((tmp_path / "flagged" / "summary.json").read_text())
    [other] = [r for r in summary["runs"] if r["run"] == "other"]
    assert other["validation_differs"] and "NOT comparable" in (tmp_path / "flagged" / "report.md").read_text()
    rows = [json.loads(line) for line in (tmp_path / "base" / "metrics.jsonl").read_text().splitlines()]
    [base] = [r for r in summary["runs"] if r["run"] == "base"]
    assert base["last_train_loss"] == rows[-1]["loss"]
    assert base["mean_train_loss_last_n"] == pytest.approx(sum(r["loss"] for r in rows[-4:]) / 4)


# --- short runs --------------------------------------------------------------------------------------
def test_schedules_that_cannot_fit_are_warned_about():
    optim = OptimConfig(warmup_steps=30, schedule="cosine")
    qaf = QafConfig(start_fraction=0.96, warmup_steps=40)
    assert any("optim.warmup_steps (30) >= train.steps (30): the LR warms up and never decays" in w
               for w in schedule_warnings(optim, steps=30))
    assert any("QAF starts at step 29 with 2 steps left, fewer than precision.qaf.warmup_steps (40)" in w
               for w in qaf_warnings(optim, qaf, steps=30, tokens_per_step=4096))
    assert schedule_warnings(optim, steps=3000) == qaf_warnings(optim, qaf, steps=3000, tokens_per_step=4096) == []
    assert qaf_warnings(optim, QafConfig(start_fraction=1.0), steps=300, tokens_per_step=4096) == []


def test_a_short_fp4_run_prints_its_warnings(tmp_path, capsys):
    """The quickstart in fp4 at 30 steps: the package's QAF (last 4%, 40-step re-warmup) cannot fit."""
    assert cli.main(["train", str(REPO / "recipes/quickstart.yaml"), *SMALL, f"run.out_dir={tmp_path}",
                     "precision.recipe=fp4", "train.steps=30", "optim.warmup_steps=30", "train.stop_at_step=1",
                     "train.eval_every=0", "logging.progress=false"]) == 0
    out = capsys.readouterr().out
    assert "the LR warms up and never decays" in out and "QAF starts at step 29 with 2 steps left" in out


# --- one line per user error under torchrun ---------------------------------------------------------------
def test_a_recipe_mistake_under_torchrun_is_one_line_per_rank_and_names_itself_to_torchrun(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "megatron_lowp", "train", str(REPO / "recipes/tiny/bf16.yaml"), "train.steps=10",
           f"run.out_dir={tmp_path}"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("megatron-lowp: error:")]
    assert proc.returncode != 0 and 1 <= len(ours) <= 2, proc.stderr[-3000:]
    assert all("optim.warmup_steps: 30 exceeds train.steps (10)" in line for line in ours)
    assert "megatron_lowp/" not in proc.stderr  # no traceback through our code on any rank
    # torchrun's own failure report names our message (through its error file), not its docs link
    assert "error_file" in proc.stderr and proc.stderr.count("optim.warmup_steps: 30 exceeds train.steps") >= 2


def test_the_launcher_checks_the_recipe_once_before_starting_ranks(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "launch/torchrun.sh"), str(REPO / "recipes/tiny/bf16.yaml"),
                           "train.steps=10"], env={**os.environ, "NPROC_PER_NODE": "2", "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"megatron-lowp: error: {REPO}/recipes/tiny/bf16.yaml: optim.warmup_steps: 30 exceeds train.steps (10)"]


# --- CPU threads ----------------------------------------------------------------------------------------
def test_cpu_threads_follow_the_setting_then_the_environment_then_the_cores(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_cpu_threads(5) == (5, "device.cpu_threads")
    assert choose_cpu_threads(None) == (3, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("megatron_lowp.device.threads.usable_cores", lambda: 16)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert choose_cpu_threads(None) == (4, "16 usable cores / 4 local ranks")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert choose_cpu_threads(None)[0] == 1


def test_training_logs_its_thread_count(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        assert cli.main(["train", str(REPO / "recipes/quickstart.yaml"), *SMALL, f"run.out_dir={tmp_path}",
                         "train.steps=2", "train.eval_every=0", "device.cpu_threads=1", "logging.progress=false"]) == 0
        assert "CPU threads: 1 per process (device.cpu_threads)" in capsys.readouterr().out
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
