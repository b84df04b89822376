"""Property tests (hypothesis) over what users and files throw at us: command lines and dataset
files. Whatever comes in, the outcome is success or one clear error (exit status 2 / UserError),
never a traceback, and an existing run directory is never touched."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from megatron_lowp import cli
from megatron_lowp.data.indexed import IndexedDataset, IndexedDatasetWriter
from megatron_lowp.errors import UserError
from tests.conftest import examples
from tests.test_config_fuzz import KEYS, SCALARS

WORDS = st.one_of(st.text(max_size=30), st.sampled_from(
    ["train", "config", "prepare", "tokenizer", "--help-me", "-x", "recipes/quickstart.yaml", "missing.yaml", "=", "a=b",
     "run.resume=never", "--input", "--output-prefix", "--vocab-size", "-1", "1e309", "\udcff"]))


def override():
    return st.builds(lambda k, v: f"{k}={v}", st.sampled_from([k for k in KEYS if k not in ("run.overwrite",)]),
                     SCALARS.map(str))


def tree_digest(path: Path) -> str:
    """Names, sizes and contents of everything under path."""
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, repo):
    """A run directory with results, as a user would have one."""
    out = tmp_path_factory.mktemp("runs")
    run = out / "precious"
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 8.0}\n')
    (run / "config.yaml").write_text("run: {name: precious}\n")
    (run / "checkpoints" / "step_1" / "meta.json").write_text("{}")
    return out, run


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(WORDS, max_size=6))
@example(argv=["-", "\udcff"])  # found by a random search: argparse's error path could not print it
def test_any_command_line_ends_in_a_status_not_a_traceback(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative recipe paths resolve to nothing here: no accidental training run
    try:
        status = cli.main(argv)
    except SystemExit as e:  # argparse's own usage errors: status 2 with a usage line
        status = e.code
    assert status in (0, 2), (argv, status)
    capsys.readouterr()


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(override(), max_size=4))
def test_train_with_any_overrides_never_touches_an_existing_run(overrides, existing_run, repo, capsys):
    out, run = existing_run
    before = tree_digest(run)
    argv = ["train", str(repo / "recipes/quickstart.yaml"), *overrides, f"run.out_dir={out}", "run.name=precious",
            "run.resume=never", "train.steps=1"]
    status = cli.main(argv)
    assert status == 2  # either the override is bad, or the run directory exists and overwrite is off
    assert tree_digest(run) == before
    assert sorted(p.name for p in out.iterdir()) == ["precious"]  # nothing created next to it either
    capsys.readouterr()


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(idx=st.binary(max_size=200), bin_=st.binary(max_size=200))
def test_random_bytes_as_an_indexed_dataset_are_a_clear_error(idx, bin_, tmp_path):
    prefix = tmp_path / "junk"
    Path(f"{prefix}.idx").write_bytes(idx)
    Path(f"{prefix}.bin").write_bytes(bin_)
    with pytest.raises(UserError, match="junk"):
        IndexedDataset(prefix)


@settings(max_examples=examples(40), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=60), where=st.sampled_from(["idx", "bin"]), flip=st.booleans())
def test_a_damaged_real_dataset_is_detected_and_named(cut, where, flip, tmp_path):
    prefix = tmp_path / "real"
    with IndexedDatasetWriter(prefix, np.uint16) as writer:
        for n in (5, 17, 9):
            writer.add_document(np.arange(n) % 4096)
    path = Path(f"{prefix}.{where}")
    data = bytearray(path.read_bytes())
    if flip and where == "idx":
        data[min(cut, len(data) - 1)] ^= 0xFF  # corrupt the header/dtype/sizes rather than truncate
        path.write_bytes(bytes(data))
        try:
            ds = IndexedDataset(prefix)
        except UserError as e:
            assert "real" in str(e)
            return
        # a flipped byte inside the pointer table can still describe a valid layout: then reads stay in bounds
        for i in range(len(ds)):
            assert len(ds[i]) >= 0
        return
    path.write_bytes(bytes(data[: max(len(data) - cut, 0)]))
    with pytest.raises(UserError, match="real"):
        IndexedDataset(prefix)
