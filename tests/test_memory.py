"""The memory ledger (megatron_lowp/memory/): stored sizes equal what the formats really return, the
prediction (`megatron-lowp memory`) is within 10% of what the trainer measures (memory.json) in every
category, low-precision recipes keep their linear inputs in fewer bytes (fp8 <= 0.55x, fp4 <= 0.30x of
bf16), and `compare` shows the measurements side by side."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megatron_lowp.memory.ledger import CATEGORIES, Ledger
from megatron_lowp.memory.measure import read_measured
from megatron_lowp.memory.report import memory_report
from megatron_lowp.memory.stored import stored_bytes
from megatron_lowp.numerics import SRGenerator
from megatron_lowp.precision.spec import QuantSpec
from megatron_lowp.train import train
from tests.test_train import small_cfg

SPECS = [
    QuantSpec("fp8_e4m3"),
    QuantSpec("fp8_e5m2", "stochastic"),
    QuantSpec("fp8_e4m3", options=(("scaling", "channel"),)),
    QuantSpec("nvfp4"),
    QuantSpec("nvfp4", "stochastic", options=(("tile", True),)),
    QuantSpec("mxfp4"),
    QuantSpec("mxfp8"),
]


def _nbytes(qt) -> int:
    return sum(t.numel() * t.element_size() for t in (qt.data, qt.scale, qt.tensor_scale) if t is not None)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.fmt}-{s.rounding}-{dict(s.options)}")
@pytest.mark.parametrize("axis", [0, 1])
def test_stored_bytes_are_those_of_the_quantized_tensor(spec, axis):
    t = torch.randn(64, 96)
    qt = spec.quantize(t, axis, SRGenerator(0))
    assert stored_bytes(spec, tuple(t.shape), axis, t.dtype) == _nbytes(qt)


def test_a_high_precision_role_is_stored_as_itself():
    assert stored_bytes(None, (64, 96), 0, torch.bfloat16) == 64 * 96 * 2


# One step of the small model; the warmup fits the single step the measurement needs.
ONE_STEP = ["train.stop_at_step=1", "train.eval_every=0", "train.checkpoint_every=0"]


@pytest.fixture(scope="module")
def measured(repo, tmp_path_factory):
    """recipe -> (config, measured ledger) of a one-step run of the small model."""
    out, runs = tmp_path_factory.mktemp("mem"), {}

    def get(recipe: str, *overrides: str):
        key = (recipe, overrides)
        if key not in runs:
            cfg = small_cfg(repo, out, f"run.name={recipe}{len(runs)}", f"precision.recipe={recipe}", *ONE_STEP,
                            *overrides)
            result = train(cfg)
            record = read_measured(result.run_dir)
            assert record is not None and record["step"] == 1
            runs[key] = (small_cfg(repo, out, f"precision.recipe={recipe}", *ONE_STEP, *overrides),
                         Ledger.from_dict(record["measured"]), result.run_dir)
        return runs[key]

    return get


@pytest.mark.parametrize("recipe, overrides", [
    ("bf16", ()), ("fp8", ()), ("fp4", ()),
    ("fp8", ("train.activation_checkpointing=full",)),
    ("fp4", ("train.activation_checkpointing=selective",)),
])
def test_prediction_is_within_10_percent_of_the_measurement(measured, recipe, overrides):
    cfg, ledger, run_dir = measured(recipe, *overrides)
    _, report = memory_report(cfg, measured_dir=run_dir)
    predicted = Ledger.from_dict(report["predicted"])
    for c in CATEGORIES:
        if c == "largest_transient":  # an estimate; the CPU allocator keeps no peak to measure it against
            continue
        p, m = predicted.categories[c], ledger.categories[c]
        assert m is not None and p == pytest.approx(m, rel=0.10, abs=1024), (c, p, m)
    assert predicted.linear_inputs() == pytest.approx(ledger.linear_inputs(), rel=0.10)
    # per layer and role, too: the rows name the same places with the same stored formats
    keyed = lambda ledger: {(r.where, r.role, r.fmt) for r in ledger.rows if r.bytes}  # noqa: E731
    assert keyed(predicted) == keyed(ledger)


def test_low_precision_keeps_linear_inputs_in_fewer_bytes(measured):
    bf16 = measured("bf16")[1].linear_inputs(blocks_only=True)
    fp8 = measured("fp8")[1].linear_inputs(blocks_only=True)
    fp4 = measured("fp4")[1].linear_inputs(blocks_only=True)
    assert fp8 <= 0.55 * bf16 and fp4 <= 0.30 * bf16, (fp8 / bf16, fp4 / bf16)


def test_full_checkpointing_keeps_only_the_block_inputs(measured):
    ledger = measured("fp8", "train.activation_checkpointing=full")[1]
    blocks = [r for r in ledger.rows if r.where.startswith("layers.")]
    assert blocks and {r.role for r in blocks} == {"held"}
    cfg = measured("fp8", "train.activation_checkpointing=full")[0]
    one_input = cfg.train.micro_batch_size * cfg.train.seq_len * cfg.model.d_model * 4  # FP32 residual stream
    held = {r.where: r.bytes for r in blocks}
    # every block keeps its input; the first also the RoPE tables all blocks share (counted once)
    assert held == {**{f"layers.{i}": one_input for i in range(1, cfg.model.n_layers)}, "layers.0": held["layers.0"]}
    assert one_input < held["layers.0"] <= 4 * one_input


def test_memory_command_prints_the_ledger_and_a_bad_run_dir_is_one_line(repo, measured, tmp_path, capsys):
    from megatron_lowp.cli import main

    _, _, run_dir = measured("fp8")
    args = ["memory", str(repo / "recipes/quickstart.yaml"), "precision.recipe=fp8", *small_cfg_overrides()]
    assert main([*args, "--measured", str(run_dir), "--json", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert "| activations |" in out and "predicted (MiB) | measured (MiB)" in out
    assert "every measured category within 10%" in out
    assert json.loads((tmp_path / "m.json").read_text())["predicted_over_measured"]["gradients"] == pytest.approx(1)
    assert main([*args, "--measured", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--measured" in err[0] and "memory.json" in err[0]
    assert main([*args, "--world-size", "0"]) == 2
    assert "--world-size 0: allowed an integer >= 1" in capsys.readouterr().err


def small_cfg_overrides() -> list[str]:
    from tests.test_train import SMALL

    return [o for o in SMALL if not o.startswith("train.steps")] + ["train.steps=8", *ONE_STEP]


def test_compare_shows_the_measured_ledgers_side_by_side(measured, tmp_path):
    from megatron_lowp.eval.compare import write_comparison

    base, runs = measured("bf16")[2], [measured("fp8")[2], measured("fp4")[2]]
    summary = write_comparison(runs, base, tmp_path / "cmp")
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert "## Memory" in report and f"{base.name} (MiB)" in report and f"{runs[1].name} (MiB)" in report
    by_run = {r["run"]: r for r in summary["runs"]}
    fp8 = by_run[runs[0].name]["memory"]
    assert fp8["linear_inputs_vs_baseline"] == pytest.approx(
        measured("fp8")[1].linear_inputs() / measured("bf16")[1].linear_inputs())
    assert math.isfinite(fp8["categories"]["activations"])


def test_first_calls_count_the_memory_they_keep_not_their_outputs():
    """cpu_compile.first_call_measured: what a first call keeps resident (a compiler's caches and code)
    counts; its outputs and every later call of the same key do not."""
    from megatron_lowp.numerics import cpu_compile

    if cpu_compile.resident_bytes() is None:
        pytest.skip("no /proc/self/statm here")
    kept = []
    before = dict(cpu_compile.COMPILED)
    out = cpu_compile.first_call_measured(("test", "keeps"), lambda: (kept.append(torch.ones(2**24)), torch.ones(2**24))[1])
    grown = cpu_compile.COMPILED["rss_bytes"] - before["rss_bytes"]
    assert cpu_compile.COMPILED["graphs"] == before["graphs"] + 1
    assert 0.9 * 2**26 <= grown <= 1.5 * 2**26  # the kept 64 MiB, not the 64 MiB returned
    cpu_compile.first_call_measured(("test", "keeps"), lambda: kept.append(torch.ones(2**24)))
    assert cpu_compile.COMPILED == {"graphs": before["graphs"] + 1, "rss_bytes": before["rss_bytes"] + grown}
    assert out.numel() == 2**24 and len(kept) == 2


def test_the_cpu_ledger_notes_what_compiling_kept(tmp_path, monkeypatch):
    """On the CPU, memory.json names the resident memory compiling took, outside every category; the
    side-by-side table names the runs a note belongs to."""
    from megatron_lowp.device import get_device
    from megatron_lowp.memory.ledger import ledger_table
    from megatron_lowp.memory.measure import MemoryWatch
    from megatron_lowp.numerics import cpu_compile

    monkeypatch.setitem(cpu_compile.COMPILED, "graphs", 3)
    monkeypatch.setitem(cpu_compile.COMPILED, "rss_bytes", 81 * 2**20)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    watch = MemoryWatch(model, opt, get_device("cpu"), tmp_path, enabled=True, meta={"recipe": "fp8"})
    with watch.saved_tensors(1, 0):
        loss = model(torch.randn(4, 8)).square().sum()
    loss.backward()
    watch.after_backward(1)
    opt.step()
    watch.after_step(1)
    record = read_measured(tmp_path)
    assert record["compiled_numerics"] == {"graphs": 3, "rss_bytes": 81 * 2**20}
    note = [n for n in record["measured"]["notes"] if n.startswith("outside every category")]
    assert len(note) == 1 and "81.0 MiB" in note[0] and "3 numerics graph(s)" in note[0]
    plain = Ledger.from_dict(record["measured"])
    plain.notes = [n for n in plain.notes if not n.startswith("outside")]
    table = ledger_table({"bf16": plain, "fp8": Ledger.from_dict(record["measured"])})
    assert f"- fp8: {note[0]}" in table  # only fp8's ledger has it: named
    assert "\n- largest_transient: not measured" in table  # both have it: once, unnamed
