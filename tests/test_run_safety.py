"""A run survives signals, full disks, leftovers of crashes and damaged inputs, and says what happened
in one line: SIGTERM checkpoints and stops (status 143) and resumes exactly; Ctrl-C during a save
waits for the save; a full disk removes the partial save and names the space needed; a read-only
checkpoints/ is refused before training; `latest` cannot lead outside the run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_lowp import cli
from megatron_lowp.run import checkpoint as ckpt_mod
from megatron_lowp.run.checkpoint import CheckpointManager, verify
from megatron_lowp.run.logs import read_jsonl
from tests.test_train import SMALL

REPO = Path(__file__).resolve().parents[1]


def argv(out: Path, name: str, *extra: str) -> list[str]:
    return ["train", str(REPO / "recipes/quickstart.yaml"), *SMALL, f"run.out_dir={out}", f"run.name={name}",
            "train.eval_every=0", *extra]


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(run / "metrics.jsonl")]


def one_error_line(stderr: str, prefix: str = "megatron-lowp: error:") -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr[-3000:]
    return lines[0]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


# --- SIGTERM: checkpoint, one line, status 143, exact resume --------------------------------------------
def test_sigterm_checkpoints_stops_and_resumes_exactly(tmp_path):
    steps = ["train.steps=40", "train.checkpoint_every=0", "train.log_every=1"]
    subprocess.run([sys.executable, "-m", "megatron_lowp", *argv(tmp_path, "straight", *steps)], env=_env(),
                   check=True, capture_output=True, timeout=600)
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_lowp", *argv(tmp_path, "stopped", *steps)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(read_jsonl(run / "metrics.jsonl")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-3000:]
    line = one_error_line(err, "megatron-lowp: stopped by SIGTERM after step")
    stopped_at = int(line.split("after step ")[1].split()[0])
    assert 3 <= stopped_at < 40
    assert CheckpointManager(run).latest() == run / "checkpoints" / f"step_{stopped_at}"
    resumed = subprocess.run([sys.executable, "-m", "megatron_lowp", *argv(tmp_path, "stopped", *steps)], env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(run) == losses(tmp_path / "straight")  # bit-identical


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_after_the_same_step(tmp_path):
    from tests.test_distributed import _free_port

    steps = ["train.steps=60", "train.checkpoint_every=0", "train.log_every=1", "parallel.engine=ddp",
             "train.micro_batch_size=2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "megatron_lowp", *argv(tmp_path, "ddp", *steps)]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "ddp"
    deadline = time.time() + 300
    while len(read_jsonl(run / "metrics.jsonl")) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)  # torchrun passes it on to its workers
    _, err = proc.communicate(timeout=300)
    assert "stopped by SIGTERM after step" in err, err[-3000:]
    assert "Traceback" not in err.split("stopped by SIGTERM")[0][-2000:]
    latest = CheckpointManager(run).latest()
    assert latest is not None and sorted(p.name for p in latest.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    verify(latest)


# --- Ctrl-C during a save -------------------------------------------------------------------------
def test_ctrl_c_during_a_save_waits_for_the_save_then_exits_130(tmp_path, monkeypatch, capsys):
    real_save = ckpt_mod.dcp.save

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C while the shards are being written
        time.sleep(0.05)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt_mod.dcp, "save", interrupted_save)
    # a terminal's Ctrl-C: Python's own handler (a process started with SIGINT ignored, e.g. under
    # nohup, never sees one, and an earlier test may have left the handler changed)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        status = cli.main(argv(tmp_path, "ctrlc", "train.steps=4", "train.checkpoint_every=2"))
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert status == 130 and err.strip() == "megatron-lowp: interrupted", err
    ckpts = tmp_path / "ctrlc" / "checkpoints"
    assert verify(ckpts / "step_2")["step"] == 2  # the save was finished and published
    assert (ckpts / "latest").read_text().strip() == "step_2"
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]


# --- full disks --------------------------------------------------------------------------------------
def _unshare_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_available(), reason="needs `unshare -rm` to mount a small tmpfs (a real full disk)")
def test_a_full_disk_removes_the_partial_save_and_says_how_much_space_is_needed(tmp_path):
    """A 10 MiB tmpfs holds one checkpoint of this model (7.0 MiB) but not two; after the failure,
    growing the disk and rerunning the same command resumes from the first checkpoint."""
    disk = tmp_path / "disk"
    disk.mkdir()
    train = " ".join(f"'{a}'" for a in [sys.executable, "-m", "megatron_lowp",
                                         *argv(disk, "full", "train.steps=4", "train.checkpoint_every=2")])
    script = f"""
mount -t tmpfs -o size=10m tmpfs {disk}
{train} 2> {tmp_path}/first.err; echo "rc=$?" > {tmp_path}/first.rc
ls -a {disk}/full {disk}/full/checkpoints > {tmp_path}/listing
mount -o remount,size=40m {disk}
{train} 2> {tmp_path}/second.err; echo "rc=$?" > {tmp_path}/second.rc
"""
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), timeout=900, check=True)
    assert (tmp_path / "first.rc").read_text().strip() == "rc=2", (tmp_path / "first.err").read_text()[-3000:]
    line = one_error_line((tmp_path / "first.err").read_text())
    assert "no space left on device saving checkpoint step_4" in line and "partial save was removed" in line
    assert "a checkpoint takes about" in line and "MiB" in line and "resume from" in line
    listing = (tmp_path / "listing").read_text().split()
    assert "step_2" in listing and not [n for n in listing if n.startswith((".tmp_step", ".write_probe", ".old_step"))]
    assert (tmp_path / "second.rc").read_text().strip() == "rc=0", (tmp_path / "second.err").read_text()[-3000:]


def test_disk_full_during_a_save_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    """The same path without a real small disk: the shard writer raises ENOSPC."""
    real_save = ckpt_mod.dcp.save

    def full(state, checkpoint_id):
        if Path(checkpoint_id).name == ".tmp_step_4":
            Path(checkpoint_id).mkdir()
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
            raise OSError(28, "No space left on device", str(checkpoint_id))
        return real_save(state, checkpoint_id=checkpoint_id)

    monkeypatch.setattr(ckpt_mod.dcp, "save", full)
    status = cli.main(argv(tmp_path, "full", "train.steps=4", "train.checkpoint_every=2"))
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and "no space left on device saving checkpoint step_4" in line
    assert "resume from" in line and "step_2" in line
    assert not [p for p in (tmp_path / "full" / "checkpoints").iterdir() if p.name.startswith(".")]


@pytest.mark.skipif(not _unshare_available(), reason="needs `unshare -rm` to mount a read-only folder")
def test_a_read_only_checkpoints_folder_is_refused_before_training(tmp_path):
    run = tmp_path / "ro"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("run: {name: ro}\n")
    train = " ".join(f"'{a}'" for a in [sys.executable, "-m", "megatron_lowp", *argv(tmp_path, "ro", "train.steps=4")])
    script = f"mount -t tmpfs -o ro tmpfs {run}/checkpoints\n{train} 2> {tmp_path}/err; echo $? > {tmp_path}/rc"
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=_env(), timeout=600, check=True)
    assert (tmp_path / "rc").read_text().strip() == "2"
    line = one_error_line((tmp_path / "err").read_text())
    assert "checkpoints: cannot write checkpoints there (Read-only file system)" in line
    assert not (run / "metrics.jsonl").exists()  # not a single step trained


# --- leftovers of crashes --------------------------------------------------------------------------
def _state(v: float) -> dict:
    return {"model": {"w": torch.full((2, 3), v)}}


def test_a_crash_between_the_two_renames_is_repaired_on_the_next_save(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, _state(3.0), {})
    ckpts = tmp_path / "checkpoints"
    os.replace(ckpts / "step_3", ckpts / ".old_step_3_999")  # moved aside; its replacement never arrived
    mgr.save(1, _state(1.0), {})  # the next save (of any step) repairs first
    assert verify(ckpts / "step_3")["step"] == 3  # the only copy of step 3 is put back, not deleted
    mgr.save(5, _state(5.0), {})
    shutil.copytree(ckpts / "step_5", ckpts / ".old_step_5_998")  # the replacement did arrive: the old copy goes
    (ckpts / ".write_probe123").write_text("ok")
    mgr.save(6, _state(6.0), {})
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_1", "step_3", "step_5", "step_6"]


# --- `latest` stays inside the run -----------------------------------------------------------------
def test_latest_cannot_point_outside_the_run(tmp_path, capsys):
    other = tmp_path / "other"
    assert cli.main(argv(tmp_path, "other", "train.steps=4", "train.checkpoint_every=2")) == 0
    assert cli.main(argv(tmp_path, "mine", "train.steps=2", "train.checkpoint_every=2")) == 0
    capsys.readouterr()
    mine = tmp_path / "mine"
    rows_before = (mine / "metrics.jsonl").read_text()
    (mine / "checkpoints" / "latest").write_text("../../other/checkpoints/step_4\n")
    status = cli.main(argv(tmp_path, "mine", "train.steps=6", "train.checkpoint_every=2"))
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and "not a checkpoint of this run" in line and "latest" in line
    assert (mine / "metrics.jsonl").read_text() == rows_before  # nothing of this run was overwritten
    # a step_N that is a link to another run's checkpoint is passed over, with the reason given
    (mine / "checkpoints" / "latest").unlink()
    shutil.rmtree(mine / "checkpoints" / "step_2")
    (mine / "checkpoints" / "step_9").symlink_to(other / "checkpoints" / "step_4")
    mgr = CheckpointManager(mine)
    assert mgr.latest() is None and "outside this run's checkpoints" in mgr.skipped[0]


def test_a_skipped_checkpoint_is_reported_with_its_reason(tmp_path, capsys):
    assert cli.main(argv(tmp_path, "run", "train.steps=4", "train.checkpoint_every=2", "train.stop_at_step=4")) == 0
    ckpts = tmp_path / "run" / "checkpoints"
    (ckpts / "step_4" / "manifest.json").unlink()
    capsys.readouterr()
    assert cli.main(argv(tmp_path, "run", "train.steps=6", "train.checkpoint_every=2", "logging.progress=false")) == 0
    out = capsys.readouterr()
    text = out.out + out.err
    assert "step_4: no manifest.json (an interrupted or damaged save); skipped" in text
    assert "resumed from" in text and "step_2" in text


# --- damaged inputs ---------------------------------------------------------------------------------
def test_a_meta_json_missing_a_key_is_one_line(tmp_path, capsys):
    assert cli.main(argv(tmp_path, "run", "train.steps=4", "train.checkpoint_every=2", "train.stop_at_step=2")) == 0
    checkpoint = tmp_path / "run" / "checkpoints" / "step_2"
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["consumed_samples"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    from tests.test_safe_loading import _regenerate_manifest

    _regenerate_manifest(checkpoint)
    capsys.readouterr()
    status = cli.main(argv(tmp_path, "run", "train.steps=4", "train.checkpoint_every=2"))
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and "meta.json: missing key 'consumed_samples'" in line


def test_compare_refuses_a_config_with_a_python_tag_in_one_line(tmp_path, capsys):
    assert cli.main(argv(tmp_path, "base", "train.steps=2", "train.checkpoint_every=0")) == 0
    (tmp_path / "base" / "config.yaml").write_text("run: !!python/object/apply:os.system ['true']\n")
    capsys.readouterr()
    status = cli.main(["compare", str(tmp_path / "base"), "--baseline", str(tmp_path / "base"),
                       "--out", str(tmp_path / "cmp")])
    line = one_error_line(capsys.readouterr().err)
    assert status == 2 and "config.yaml: not a plain YAML recipe" in line


def test_logs_are_strict_json_with_nonfinite_values_flagged(tmp_path, monkeypatch):
    from megatron_lowp.train.loop import Trainer, train
    from tests.test_train import small_cfg

    original = Trainer._loss
    monkeypatch.setattr(Trainer, "_loss", lambda self, b: original(self, b) * (float("nan") if self.step == 3 else 1.0))
    result = train(small_cfg(REPO, tmp_path, "train.nan_policy=skip", "train.eval_every=0"))

    def strict(text: str):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))

    for name in ("metrics.jsonl", "events.jsonl"):
        rows = [strict(line) for line in (result.run_dir / name).read_text().splitlines()]
        [bad] = [r for r in rows if r["step"] == 3]
        assert bad["loss"] is None and "loss" in bad["nonfinite"] and "grad_norm" in bad["nonfinite"]


def test_a_command_line_with_bytes_that_are_not_utf8_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["\udcff"])  # what Python makes of the byte 0xff in argv
    assert e.value.code == 2
    assert "\\udcff" in capsys.readouterr().err
