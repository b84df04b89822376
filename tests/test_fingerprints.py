"""Refactors do not move a number: the first 20 training losses of the shipped recipes, as exact floats.

Each case trains a shipped recipe exactly as a user would (`python -m megatron_lowp train`, one
intra-op thread so the float sums run in one order), stopping after step 20 while the LR schedule
still follows the recipe's `train.steps`. The losses must equal tests/fingerprints.json bit for bit.
The default run checks every recipe on a small model (`small_*`); `-m slow` the shipped sizes, the
quickstart and a 2-rank FSDP run. CPUs with other kernels (AVX2, AVX512) sum in other orders, so
the file holds one table per CPU kind; a kind without a table skips, saying how to record one.

A change that is *meant* to move numbers (a numerics fix) regenerates the file, and says so in its
commit message:

    OMP_NUM_THREADS=1 python tests/test_fingerprints.py --update [CASE ...]
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FINGERPRINTS = Path(__file__).with_name("fingerprints.json")
STEPS = 20
COMMON = [f"train.stop_at_step={STEPS}", "train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0",
          "logging.progress=false"]
# The same recipes on a model small enough for every default test run (same code paths, other sizes).
SMALL = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
         "model.ffn_hidden_size=128", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8"]
SHIPPED = {
    "quickstart": ("recipes/quickstart.yaml", (), 1),
    "tiny_bf16": ("recipes/tiny/bf16.yaml", (), 1),
    "tiny_fp8": ("recipes/tiny/fp8.yaml", (), 1),
    "tiny_fp4": ("recipes/tiny/fp4.yaml", (), 1),
    "tiny_ngpt_bf16": ("recipes/tiny/ngpt_bf16.yaml", (), 1),
    "tiny_ngpt_fp4": ("recipes/tiny/ngpt_fp4.yaml", (), 1),
    "quickstart_fsdp2": ("recipes/quickstart.yaml", ("parallel.engine=fsdp", "train.micro_batch_size=8"), 2),
}
# name -> (recipe, extra overrides, processes); "small_*" run in the default suite, the shipped sizes with -m slow
CASES: dict[str, tuple[str, tuple[str, ...], int]] = {
    **SHIPPED,
    # (the quickstart differs from tiny_bf16 in seq_len only, which SMALL sets: no small twin)
    **{f"small_{name}": (recipe, tuple(SMALL), 1) for name, (recipe, _, nproc) in SHIPPED.items()
       if nproc == 1 and name != "quickstart"},
    "small_quickstart_fsdp2": ("recipes/quickstart.yaml", (*SMALL, "parallel.engine=fsdp"), 2),
}


def cpu_kind() -> str:
    """Float results of the same program differ between CPU kernels (AVX2, AVX512, ...): one table each."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(case: str, out: Path, timeout: float | None = 3600) -> list[float]:
    recipe, extra, nproc = CASES[case]
    args = ["train", str(REPO / recipe), *COMMON, *extra, f"run.out_dir={out}", f"run.name={case}"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(_free_port()), "-m", "megatron_lowp", *args]
    else:
        cmd = [sys.executable, "-m", "megatron_lowp", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / case / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def _check(case: str, tmp_path: Path) -> None:
    table = json.loads(FINGERPRINTS.read_text()).get(cpu_kind(), {})
    if case not in table:
        pytest.skip(f"no fingerprint of {case} recorded on a {cpu_kind()} CPU (record: see tests/test_fingerprints.py)")
    expected = table[case]
    got = losses(case, tmp_path)
    assert len(got) == STEPS
    first = next((i for i, (a, b) in enumerate(zip(got, expected, strict=True)) if a != b), None)
    assert first is None, (f"{case}: step {first + 1} loss {got[first]!r} != fingerprint {expected[first]!r} "
                           f"(a refactor moved a number; a deliberate numerics change regenerates "
                           f"tests/fingerprints.json, see this file's docstring)")


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("small_")])
def test_first_losses_equal_the_fingerprint(case, tmp_path):
    _check(case, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SHIPPED))
def test_first_losses_of_the_shipped_recipes_equal_the_fingerprint(case, tmp_path):
    _check(case, tmp_path)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--update"]:
        sys.exit(__doc__)
    chosen = sys.argv[2:] or list(CASES)
    tables = json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.is_file() else {}
    table = tables.setdefault(cpu_kind(), {})
    with tempfile.TemporaryDirectory() as tmp:
        for name in chosen:
            table[name] = losses(name, Path(tmp), timeout=None)
            print(name, table[name][:3], "...", table[name][-1], flush=True)
            FINGERPRINTS.write_text(json.dumps(tables, indent=1) + "\n")
