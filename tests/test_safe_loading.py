"""Loading never runs code: three crafted-checkpoint attacks against every reader.

Each attack would write a marker file if anything unpickled its payload. The attacker also
regenerates manifest.json (it is a checksum, not a signature). Every reader must end with exit
status 2 and one line naming the checkpoint entry, and the marker must not exist.

1. bytes: a pickle stored as a DCP *bytes* entry (`optim.param_groups.0.lr`), which DCP's default
   planner would read with torch.load(weights_only=False);
2. relabel: a model tensor (`model.norm.weight`) re-labelled as a bytes entry pointing at a pickle;
3. dotted: a `.metadata` index whose global is an allowed module plus a dotted attribute chain
   (protocol 4 resolves `module` + `a.b.c` through getattr), reaching `subprocess.Popen`.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

from megatron_lowp import cli
from megatron_lowp.errors import UserError
from megatron_lowp.run.checkpoint import verify
from megatron_lowp.run.safe_load import ALLOWED_GLOBALS, load_metadata, read_metadata
from tests.test_train import small_cfg

ATTACKS = ("bytes", "relabel", "dotted")


class _WriteMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _regenerate_manifest(checkpoint: Path) -> None:
    files = {f.name: {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
             for f in sorted(checkpoint.iterdir()) if f.name != "manifest.json"}
    (checkpoint / "manifest.json").write_text(json.dumps({"files": files}))


def _unsafe_metadata(checkpoint: Path):
    # The attacker's side: read the index with plain pickle (it is their own file).
    with open(checkpoint / ".metadata", "rb") as f:
        return pickle.load(f)


def _add_bytes_entry(checkpoint: Path, key: str, marker: Path) -> None:
    payload = pickle.dumps(_WriteMarker(marker))
    (checkpoint / "evil.distcp").write_bytes(payload)
    metadata = _unsafe_metadata(checkpoint)
    metadata.state_dict_metadata[key] = BytesStorageMetadata()
    for index in [i for i in metadata.storage_data if i.fqn == key]:
        del metadata.storage_data[index]
    metadata.storage_data[MetadataIndex(key)] = _StorageInfo("evil.distcp", 0, len(payload))
    with open(checkpoint / ".metadata", "wb") as f:
        pickle.dump(metadata, f)


def dotted_global_pickle(module: str, name: str, args: tuple) -> bytes:
    """A protocol-4 pickle calling module:name(*args), with `name` a dotted attribute chain."""
    body = pickle.dumps(args, protocol=2)[2:-1]  # the argument tuple's opcodes, without header and STOP
    return b"\x80\x04c" + module.encode() + b"\n" + name.encode() + b"\n" + body + b"R."


POPEN_CHAIN = ("torch.distributed.checkpoint.filesystem", "torch._strobelight.cli_function_profiler.subprocess.Popen")


def _popen_chain() -> tuple[str, str]:
    """The issue's chain from a DCP module to subprocess.Popen (it must resolve, or the attack is moot)."""
    import importlib

    obj = importlib.import_module(POPEN_CHAIN[0])
    for part in POPEN_CHAIN[1].split("."):
        obj = getattr(obj, part, None)
    if obj is None:
        pytest.skip("this torch has no such attribute chain")
    return POPEN_CHAIN


def tamper(checkpoint: Path, attack: str, marker: Path) -> None:
    if attack == "bytes":
        _add_bytes_entry(checkpoint, "optim.param_groups.0.lr", marker)
    elif attack == "relabel":
        _add_bytes_entry(checkpoint, "model.norm.weight", marker)
    else:
        module, name = _popen_chain()
        payload = dotted_global_pickle(module, name, ([sys.executable, "-c", f"open({str(marker)!r}, 'w')"],))
        (checkpoint / ".metadata").write_bytes(payload)
    _regenerate_manifest(checkpoint)


@pytest.fixture(scope="module")
def trained(repo, tmp_path_factory):
    """A small finished fp8 run with a checkpoint at step 4 (and at step 2)."""
    from megatron_lowp.train import train

    out = tmp_path_factory.mktemp("safe")
    train(small_cfg(repo, out, "run.name=victim", "precision.recipe=fp8", "train.steps=4",
                    "train.checkpoint_every=2", "train.eval_every=0"))
    return out / "victim"


@pytest.fixture
def victim(trained, tmp_path):
    run = tmp_path / "victim"
    shutil.copytree(trained, run)
    return run


def _no_marker(marker: Path) -> None:
    time.sleep(0.3)  # a spawned process would have written by now
    assert not marker.exists(), "the payload ran"


def _one_line_error(capsys, status: int, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("megatron-lowp: error:"), err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def _expected(attack: str) -> tuple[str, ...]:
    return {"bytes": ("optim.param_groups.0.lr", "bytes"), "relabel": ("model.norm.weight", "bytes"),
            "dotted": ("refusing to load",)}[attack]


def _reader_argv(reader: str, run: Path, repo: Path, tmp_path: Path) -> list[str]:
    if reader == "resume":
        from tests.test_train import SMALL
        return ["train", str(repo / "recipes/quickstart.yaml"), *SMALL, f"run.out_dir={run.parent}",
                f"run.name={run.name}", "precision.recipe=fp8", "train.steps=6", "train.checkpoint_every=2",
                "train.eval_every=0"]
    if reader == "eval":
        return ["eval", str(run), "--samples", "4"]
    if reader == "generate":
        return ["generate", str(run), "--prompt", "The hacker", "--max-new-tokens", "2"]
    if reader == "export":
        return ["export", str(run), "--out", str(tmp_path / "hf")]
    if reader == "compare":
        return ["compare", str(run), "--baseline", str(run), "--out", str(tmp_path / "cmp")]
    raise AssertionError(reader)


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("reader", ["resume", "eval", "generate", "export", "compare"])
def test_crafted_checkpoint_never_runs_code(reader, attack, victim, repo, tmp_path, capsys):
    if reader == "export":
        pytest.importorskip("safetensors")
    marker = tmp_path / "pwned"
    tamper(victim / "checkpoints" / "step_4", attack, marker)
    status = cli.main(_reader_argv(reader, victim, repo, tmp_path))
    _no_marker(marker)
    _one_line_error(capsys, status, "step_4", *_expected(attack))


@pytest.mark.parametrize("attack", ATTACKS)
def test_lm_eval_adapter_refuses_crafted_checkpoints(attack, victim, tmp_path):
    pytest.importorskip("lm_eval")
    from megatron_lowp.eval.harness import HarnessLM

    marker = tmp_path / "pwned"
    tamper(victim / "checkpoints" / "step_4", attack, marker)
    with pytest.raises(UserError) as info:
        HarnessLM(pretrained=str(victim))
    _no_marker(marker)
    assert all(text in str(info.value) for text in _expected(attack)) and "\n" not in str(info.value)


@pytest.mark.parametrize("attack", ATTACKS)
def test_verify_refuses_before_anything_runs(attack, victim, tmp_path):
    marker = tmp_path / "pwned"
    checkpoint = victim / "checkpoints" / "step_4"
    tamper(checkpoint, attack, marker)
    with pytest.raises(UserError):
        verify(checkpoint)
    _no_marker(marker)


def test_checkpoints_hold_only_tensors_and_json(trained):
    """What we write needs no pickle to read: no bytes entries, non-tensor state in state.json."""
    checkpoint = trained / "checkpoints" / "step_4"
    metadata = read_metadata(checkpoint)
    assert not [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    leaves = {".".join(map(str, path)): value for path, value in json.loads((checkpoint / "state.json").read_text())}
    groups = leaves["optim.param_groups"]
    assert all(g["lr"] > 0 and g["betas"] == [0.9, 0.95] for g in groups)
    assert any("layers.0.attn.qkv.weight" in g["params"] for g in groups)
    assert "state.json" in json.loads((checkpoint / "manifest.json").read_text())["files"]


def test_allow_list_is_exact_names():
    assert all("." not in name for _, name in ALLOWED_GLOBALS)
    # an allowed module with a dotted name, even one ending in an allowed class, is refused
    for module, name in [("torch.distributed.checkpoint.filesystem", "metadata.Metadata"),
                         ("torch.distributed.checkpoint.metadata", "Metadata.__init__"),
                         ("torch.distributed.checkpoint.metadata", "dataclasses"),
                         ("torch.distributed.checkpoint.state_dict", "StateDictOptions")]:
        with pytest.raises(UserError, match="refusing to load"):
            load_metadata(dotted_global_pickle(module, name, ()), "x")


@pytest.mark.slow
def test_deepspeed_resume_refuses_crafted_checkpoints(tmp_path):
    """The DeepSpeed engine resumes through the same loader (ZeRO-2, two ranks)."""
    pytest.importorskip("deepspeed")
    from tests.test_deepspeed import launch

    run, _ = launch(tmp_path, "ds", 2, "parallel.engine=deepspeed", "parallel.zero_stage=2", "train.stop_at_step=3")
    marker = tmp_path / "pwned"
    tamper(run / "checkpoints" / "step_3", "bytes", marker)
    _, output = launch(tmp_path, "ds", 2, "parallel.engine=deepspeed", "parallel.zero_stage=2", expect_rc=2)
    _no_marker(marker)
    assert "megatron_lowp/" not in output  # no traceback through our code (torchrun prints its own report)
    errors = [line for line in output.splitlines() if line.startswith("megatron-lowp: error:")]
    assert errors and all("step_3" in e and "optim.param_groups.0.lr" in e for e in errors), output[-2000:]
