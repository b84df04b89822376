"""CheckpointManager on its own: atomic publication, verification, safe loading, pruning."""

import hashlib
import json
import os
import pickle

import pytest
import torch

from megatron_lowp.errors import UserError
from megatron_lowp.run.checkpoint import CheckpointManager, verify


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 4), value)}, "rng": {"cpu": torch.get_rng_state()}}


def test_save_load_round_trip_and_latest(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state(1.0), {"consumed_samples": 8})
    path = mgr.save(2, state(2.0), {"consumed_samples": 16})
    assert mgr.latest() == path == tmp_path / "checkpoints" / "step_2"
    target = state(0.0)
    meta = mgr.load(path, target)
    assert meta["step"] == 2 and meta["consumed_samples"] == 16
    assert torch.equal(target["model"]["w"], torch.full((3, 4), 2.0))
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {f.name for f in path.iterdir()} - {"manifest.json"}
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp left


def test_latest_falls_back_to_newest_complete(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state(1.0), {})
    mgr.save(5, state(5.0), {})
    (tmp_path / "checkpoints" / "latest").unlink()
    (tmp_path / "checkpoints" / "step_9").mkdir()  # a directory without manifest is not a checkpoint
    assert mgr.latest() == tmp_path / "checkpoints" / "step_5"
    (tmp_path / "checkpoints" / "latest").write_text("step_9\n")  # pointing at something incomplete
    assert mgr.latest() == tmp_path / "checkpoints" / "step_5"


def test_keep_prunes_oldest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, state(float(step)), {})
    assert [p.name for p in mgr.complete_checkpoints()] == ["step_3", "step_4"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(3, state(1.0), {})
    mgr.save(3, state(7.0), {})
    target = state(0.0)
    mgr.load(mgr.latest(), target)
    assert target["model"]["w"][0, 0].item() == 7.0


def test_missing_rng_state_of_another_device_is_tolerated(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, state(1.0), {})
    target = state(0.0)
    target["rng"]["device"] = torch.zeros(16, dtype=torch.uint8)  # e.g. a CUDA run resuming a CPU checkpoint
    mgr.load(path, target)
    assert "device" not in target["rng"] and torch.equal(target["model"]["w"], torch.full((3, 4), 1.0))


def test_malicious_metadata_pickle_is_refused_without_running(tmp_path):
    mgr = CheckpointManager(tmp_path)
    path = mgr.save(1, state(1.0), {})
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = pickle.dumps(Exploit())
    (path / ".metadata").write_bytes(payload)
    manifest = json.loads((path / "manifest.json").read_text())  # an attacker also fixes the manifest
    manifest["files"][".metadata"] = {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"refusing to load 'posix.system'"):
        mgr.load(path, state(0.0))
    with pytest.raises(UserError, match="refusing"):
        verify(path)
    assert not marker.exists()


def test_incomplete_and_altered(tmp_path):
    mgr = CheckpointManager(tmp_path)
    mgr.save(1, state(1.0), {})
    path = mgr.save(2, state(2.0), {})
    (path / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"incomplete or not a checkpoint.*previous checkpoint is .*step_1"):
        mgr.load(path, state(0.0))
