"""megatron-lowp compare: the report of real runs against a baseline, including awkward cases."""

from __future__ import annotations

import json

import pytest

from megatron_lowp import cli
from megatron_lowp.eval.compare import time_to_target, write_comparison
from megatron_lowp.train import train
from tests.test_train import small_cfg


@pytest.fixture(scope="module")
def runs(repo, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    base = train(small_cfg(repo, out, "run.name=base")).run_dir
    fp8 = train(small_cfg(repo, out, "run.name=fp8", "precision.recipe=fp8")).run_dir
    short = train(small_cfg(repo, out, "run.name=short", "train.steps=4", "train.checkpoint_every=0")).run_dir
    return base, fp8, short


def test_report_summary_and_plot_of_real_runs(runs, tmp_path):
    base, fp8, short = runs
    assert cli.main(["compare", str(fp8), str(short), "--baseline", str(base), "--out", str(tmp_path / "cmp")]) == 0
    summary = json.loads((tmp_path / "cmp/summary.json").read_text())
    by_run = {r["run"]: r for r in summary["runs"]}
    assert set(by_run) == {"base", "fp8", "short"} and summary["baseline"] == "base"
    assert by_run["base"]["final_val_loss_gap"] == 0.0 and by_run["base"]["time_to_target"]["step"] == 8
    assert by_run["fp8"]["optim_bytes_per_param"] == pytest.approx(2.0, abs=0.05)  # FP8 Adam moments
    assert by_run["base"]["optim_bytes_per_param"] == pytest.approx(8.0, abs=0.05)
    assert abs(by_run["fp8"]["final_val_loss_gap"]) < 0.05
    notes = " ".join(summary["notes"])
    assert "short trained" in notes  # different lengths: a note, not a crash
    report = (tmp_path / "cmp/report.md").read_text()
    assert "| fp8 | fp8 |" in report and "time to target" in report
    png = (tmp_path / "cmp/loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_time_to_target_and_not_reached():
    rows = [{"step": 1, "tokens": 10, "val_loss": 3.0, "elapsed_s": 1.0},
            {"step": 2, "tokens": 20, "val_loss": 2.0, "elapsed_s": 2.0}]
    assert time_to_target(rows, 2.5) == {"step": 2, "tokens": 20, "seconds": 2.0}
    assert time_to_target(rows, 1.0) is None


def test_a_directory_without_metrics_is_a_clear_error(runs, tmp_path, capsys):
    base, *_ = runs
    (tmp_path / "empty").mkdir()
    assert cli.main(["compare", str(tmp_path / "empty"), "--baseline", str(base), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory (no metrics.jsonl)" in capsys.readouterr().err
    with pytest.raises(Exception, match="no metrics.jsonl"):
        write_comparison([tmp_path / "empty"], base, tmp_path / "o2")
