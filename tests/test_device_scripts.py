"""The GPU scripts (scripts/device_check.py, scripts/device_fidelity.py) cannot rot: their dry runs
go through every step on the CPU with tiny shapes, and the parts that decide things (time boxes,
step counts, profile attribution, the targets' met/missed) are checked on numbers given here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


common = load("device_common")
check = load("device_check")
fidelity = load("device_fidelity")
bench_train = load("bench_train")


# --- time boxes ------------------------------------------------------------------------------------

def test_a_hung_step_is_ended_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    hang = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    start = time.monotonic()
    step = common.run_step(common.Step("hang", [sys.executable, "-c", hang]), 2, tmp_path, dict(os.environ), echo=False)
    assert step.status == "timed out" and 2 <= step.seconds < 20 and time.monotonic() - start < 20
    assert "started" in Path(step.log).read_text()
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # the whole process group was ended, not just the direct child
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"grandchild {grandchild} still runs")
    ok = common.run_step(common.Step("ok", [sys.executable, "-c", "print(42)"]), 30, tmp_path, dict(os.environ), echo=False)
    bad = common.run_step(common.Step("bad", [sys.executable, "-c", "raise SystemExit(3)"]), 30, tmp_path,
                          dict(os.environ), echo=False)
    assert (ok.status, ok.returncode, bad.status, bad.returncode) == ("ok", 0, "failed", 3)
    assert common.run_step(common.Step("none", ["false"]), 0, tmp_path, {}, echo=False).status == "skipped"


def test_steps_share_the_budget_and_pass_on_unused_time(tmp_path, monkeypatch):
    monkeypatch.setattr(check, "SHARES", {"a": 10, "b": 10, "c": 80})
    monkeypatch.setattr(check, "REPORT_RESERVE_S", 0)
    monkeypatch.setattr(check, "MIN_STEP_S", 5)
    quick = [sys.executable, "-c", "pass"]
    steps = [common.Step("a", quick), common.Step("b", quick), common.Step("c", quick)]
    check.run_all(steps, common.Budget(100), tmp_path, dict(os.environ), None)
    assert [s.status for s in steps] == ["ok", "ok", "ok"]
    assert 9 < steps[0].timeout_s <= 10  # its share
    assert 19 < steps[1].timeout_s <= 20  # its share plus what a left unused
    assert 95 < steps[2].timeout_s <= 100
    steps = [common.Step("a", quick), common.Step("b", quick), common.Step("c", quick)]
    check.run_all(steps, common.Budget(40), tmp_path, dict(os.environ), {"a", "b"})  # 20 s each
    assert [s.status for s in steps] == ["ok", "ok", "skipped"] and 19 < steps[0].timeout_s <= 20
    steps = [common.Step("a", quick), common.Step("c", quick)]
    check.run_all(steps, common.Budget(4), tmp_path, dict(os.environ), {"a", "c"})
    assert [s.status for s in steps] == ["skipped", "skipped"]  # shares below MIN_STEP_S: not started


# --- profile attribution ----------------------------------------------------------------------------

def event(name, parent=None, kernels=(), self_us=0.0):
    return SimpleNamespace(name=name, cpu_parent=parent, kernels=[SimpleNamespace(name=k, duration=d) for k, d in kernels],
                           self_cpu_time_total=self_us, device_type=SimpleNamespace(name="CPU"))


def kernel(name, us):
    return SimpleNamespace(name=name, device_type=SimpleNamespace(name="CUDA"), time_range=SimpleNamespace(start=5.0, end=5.0 + us))


def test_profile_attributes_kernels_by_name_and_enclosing_range():
    step = event("ProfilerStep")
    quant = event(check.RANGE_QUANTIZE, step)
    opt = event(check.RANGE_OPTIMIZER, step)
    attn = event(check.RANGE_ATTENTION, step)
    launched = [  # (name, microseconds, the CPU op the profiler links it to)
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 400.0, event("aten::mm", step)),
        ("vectorized_elementwise_kernel", 50.0, event("aten::abs", quant)),
        ("pytorch_flash::flash_fwd_kernel", 150.0, event("aten::_scaled_dot_product_flash_attention", attn)),
        ("multi_tensor_apply_kernel", 80.0, event("aten::_foreach_add_", opt)),
        ("elementwise_kernel", 20.0, event("aten::add", step)),
    ]
    events = [step, quant, opt, attn]
    for name, us, op in launched:
        op.kernels.append(SimpleNamespace(name=name, duration=us))
        events += [op, kernel(name, us)]
    events += [kernel("_nvfp4_kernel", 100.0)]  # a Triton launch: on the GPU, claimed by no CPU op
    events += [event("cudaStreamSynchronize", step) for _ in range(3)]
    row = check.attribute(events, wall_s=2e-3, steps=2, on_device=True)  # 2 steps, 1 ms each
    assert row["gemm_s"] == pytest.approx(200e-6) and row["gemm_pct"] == pytest.approx(20.0)
    assert row["quantization_pct"] == pytest.approx(7.5) and row["attention_pct"] == pytest.approx(7.5)
    assert row["optimizer_pct"] == pytest.approx(4.0) and row["other kernels_pct"] == pytest.approx(1.0)
    assert row["idle_pct"] == pytest.approx(60.0) and row["syncs_per_step"] == 1.5
    cpu = check.attribute([event("aten::mm", step, self_us=300.0), event("aten::floor", quant, self_us=100.0),
                           event("aten::_local_scalar_dense", step, self_us=0.0)], 1e-3, 1, on_device=False)
    assert (cpu["gemm_pct"], cpu["quantization_pct"], cpu["idle_pct"], cpu["syncs_per_step"]) == (30.0, 10.0, None, 1)


# --- targets -----------------------------------------------------------------------------------------

def bench_row(label, tokens_per_s, mfu=None):
    return {"label": label, "tokens_per_s": tokens_per_s, "mfu": mfu, "step_s": 1000 / tokens_per_s}


def test_device_check_targets_say_met_missed_and_not_measured():
    results = {
        "numerics": {"kernels": [{"op": "triton fp8_e4m3", "rounding": "nearest", "vs_copy": 0.8, "GB_per_s": 3000.0},
                                 {"op": "triton nvfp4", "rounding": "nearest", "vs_copy": 0.5, "GB_per_s": 2000.0}]},
        "train-1b": [bench_row("bf16", 1000.0, 0.45), bench_row("fp8", 1300.0), bench_row("fp4", 700.0)],
        "train-350m": None,
        "tests": {"passed": 18, "failures": 1, "errors": 0, "skipped": 0},
    }
    status = {c["check"]: c["status"] for c in check.targets(results)}
    assert status == {
        "RTN fp8_e4m3 quantizer bandwidth": "met", "RTN fp8_e5m2 quantizer bandwidth": "n/a",
        "RTN nvfp4 quantizer bandwidth": "missed", "bf16 MFU, 1b": "met",
        "fp8 (native) tokens/s vs bf16, 1b": "met", "fp4 (emulated) tokens/s vs bf16, 1b": "missed",
        "fp8 (native) tokens/s vs bf16, 350m": "n/a", "fp4 (emulated) tokens/s vs bf16, 350m": "n/a",
        "GPU tests (pytest -m cuda)": "missed",
    }


def test_gpu_test_counts_and_failures_come_from_the_junit_file(tmp_path):
    xml = tmp_path / "tests.xml"
    xml.write_text('<testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
                   '<testcase classname="t" name="ok"/>'
                   '<testcase classname="t" name="bits"><failure message="assert 3 == 4&#10;detail">tb</failure></testcase>'
                   '<testcase classname="t" name="boom"><error message="RuntimeError: CUDA error">tb</error></testcase>'
                   '<testcase classname="t" name="gpu"><skipped message="needs an NVIDIA GPU"/></testcase>'
                   '</testsuite></testsuites>')
    counts = check.test_counts(xml)
    assert (counts["passed"], counts["failures"], counts["errors"], counts["skipped"]) == (1, 1, 1, 1)
    assert counts["failed_tests"] == ["bits: assert 3 == 4", "boom: RuntimeError: CUDA error"]
    assert counts["skip_reasons"] == ["needs an NVIDIA GPU"] and check.test_counts(tmp_path / "missing.xml") == {}
    log = tmp_path / "tests.log"  # a run ended by its time box leaves no JUnit file, only what -v printed
    log.write_text("tests/test_cuda.py::test_a[x] PASSED                 [ 10%]\n"
                   "tests/test_cuda.py::test_b FAILED                    [ 20%]\n"
                   "tests/test_cuda.py::test_c PASSED                    [ 30%]\n")
    partial = check.test_counts(tmp_path / "missing.xml", log)
    assert (partial["passed"], partial["failures"], partial["partial"]) == (2, 1, True)
    assert partial["failed_tests"] == ["tests/test_cuda.py::test_b"]


def test_fidelity_checks_and_the_qaf_gap():
    vals = {"bf16": {95: 4.00, 100: 3.90}, "fp8": {100: 3.91}, "fp4": {95: 4.08, 100: 3.95},
            "ngpt_bf16": {100: 4.20}, "ngpt_fp4": {100: 4.26}}
    checks, numbers = fidelity.fidelity_checks(vals, 100)
    assert numbers["qaf"]["step_before"] == 95
    assert numbers["qaf"]["gap_before_pct"] == pytest.approx(2.0)
    assert numbers["qaf"]["gap_after_pct"] == pytest.approx(100 * 0.05 / 3.9)
    assert numbers["final_gap_pct"]["fp8"] == pytest.approx(100 * 0.01 / 3.9)
    assert [c["status"] for c in checks] == ["met", "met", "met", "met", "missed"]  # ngpt 1.43% > fp4 1.28%
    vals["fp8"][100] = 3.93  # +0.77%
    del vals["ngpt_fp4"]
    assert [c["status"] for c in fidelity.fidelity_checks(vals, 100)[0]] == ["missed", "met", "met", "n/a", "n/a"]


def test_step_count_fits_the_budget():
    run = {"build_s": 2.0, "warmup_s": 5.0, "step_s": 0.1, "eval_s": 0.5, "params": 10**8}
    cal = {"import_s": 3.0, "runs": {"a": run, "b": {**run, "step_s": 0.4}}}
    steps = fidelity.choose_steps(cal, 300.0, warmup_steps=2)
    total = sum(fidelity.predicted_seconds(r, steps, 3.0, 2) for r in cal["runs"].values())
    over = sum(fidelity.predicted_seconds(r, steps + 20, 3.0, 2) for r in cal["runs"].values())
    assert steps % 20 == 0 and total <= 300.0 < over
    assert fidelity.choose_steps(cal, 300.0, 2, max_steps=40) == 40
    assert fidelity.choose_steps(cal, 10.0, 2) == fidelity.MIN_STEPS


# --- corpus and variants -------------------------------------------------------------------------------

def test_corpus_takes_text_files_of_installed_packages(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "somepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__pycache__").mkdir()
    (pkg / "__init__.py").write_text("'''A package.'''\n" + "x = 1\n" * 20)
    (pkg / "sub" / "doc.md").write_text("# Title\n" + "Some words. " * 20)
    (pkg / "tiny.py").write_text("y = 2\n")  # under 64 bytes
    (pkg / "big.py").write_text("z = 3\n" * 1000)  # over max_file_bytes
    (pkg / "latin1.txt").write_bytes(b"caf\xe9 " * 50)  # not UTF-8
    (pkg / "data.bin").write_bytes(b"\0" * 500)
    (pkg / "__pycache__" / "cached.py").write_text("w = 4\n" * 30)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "corpus.jsonl"
    stats = fidelity.build_corpus(["somepkg", "no_such_package_here"], out, max_bytes=10_000, max_file_bytes=2_000)
    docs = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(d["source"] for d in docs) == ["somepkg/__init__.py", "somepkg/sub/doc.md"]
    assert {d["source"]: d["text"] for d in docs}["somepkg/__init__.py"].startswith("'''A package.")
    assert stats["missing"] == ["no_such_package_here"]
    assert stats["documents"] == 2 and stats["bytes"] == sum(len(d["text"].encode()) for d in docs)
    first = out.read_bytes()
    fidelity.build_corpus(["somepkg"], out, max_bytes=10_000, max_file_bytes=2_000)
    assert out.read_bytes() == first  # the same files in the same order
    fidelity.build_corpus(["somepkg"], out, max_bytes=200, max_file_bytes=2_000)
    assert len(out.read_text().splitlines()) == 1  # the byte cap


def test_bench_train_variants_take_labels_and_their_own_overrides():
    variants = bench_train.parse_variants(["bf16", "fp8", "nd=bf16"], [["fp8", "precision.backend=native"],
                                                                      ["nd", "device.deterministic=false"]])
    assert variants == {"bf16": ("bf16", []), "fp8": ("fp8", ["precision.backend=native"]),
                        "nd": ("bf16", ["device.deterministic=false"])}
    with pytest.raises(SystemExit, match="twice"):
        bench_train.parse_variants(["bf16", "bf16"], [])
    with pytest.raises(SystemExit, match="no such entry"):
        bench_train.parse_variants(["bf16"], [["fp8", "precision.backend=native"]])


def test_bench_train_reports_an_entry_that_fails_and_times_the_others(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRON_LOWP_CPU_COMPILE", "0")
    out = tmp_path / "bench"
    rc = bench_train.main([str(REPO / "recipes/tiny/bf16.yaml"), *check.TINY, "device.type=cpu", "--recipes", "bf16",
                           "broken=bf16", "--set", "broken", "model.n_heads=3", "--warmup", "1", "--steps", "1",
                           "--rounds", "1", "--out", str(out)])
    rows = json.loads((out / "bench_train.json").read_text())
    assert rc == 1 and [r["label"] for r in rows] == ["bf16", "broken"]
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["tokens_per_s_vs_first"] == 1.0 and "error" not in rows[0]
    assert "n_heads" in rows[1]["error"] and "| broken | bf16 | failed:" in (out / "bench_train.md").read_text()


# --- the dry runs ----------------------------------------------------------------------------------------
# Both scripts start at once, as the commands a person types: on 2 cores their child processes
# (mostly start-up, one thread each) overlap, which halves the wait.


def _start_dry_run(root: Path, script: str):
    folder = root / script
    folder.mkdir()
    log = open(folder / "stdout.log", "w")
    command = [sys.executable, str(REPO / "scripts" / f"{script}.py"), "--dry-run", "--out", str(folder / "out"),
               "--work", str(folder / "work"), "--budget", "400"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), folder, log


def finished(started, timeout: int = 600) -> tuple[Path, str]:
    proc, folder, log = started
    try:
        returncode = proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    output = (folder / "stdout.log").read_text()
    assert returncode == 0, output[-3000:]
    return folder / "out", output


def tar_names(path: Path) -> list[str]:
    with tarfile.open(path) as tar:
        return tar.getnames()


@pytest.mark.slow  # about 3 minutes on 2 cores; the fidelity dry run below stays in the default run
def test_device_check_dry_run_goes_through_every_step(tmp_path):
    out, printed = finished(_start_dry_run(tmp_path, "device_check"))
    summary = json.loads((out / "summary.json").read_text())
    status = {s["name"]: s["status"] for s in summary["steps"]}
    # pip may refuse an offline editable install (no `wheel` for an older setuptools): harmless,
    # the children import the checkout through PYTHONPATH, which every other step here proves
    assert status.pop("install") in ("ok", "failed")
    assert status == dict.fromkeys(["machine", "tests", "numerics", "train-1b", "train-350m", "profile"], "ok")
    results = summary["results"]
    n_cuda_tests = results["tests"]["tests"]
    assert n_cuda_tests >= 15 and results["tests"]["skipped"] == n_cuda_tests  # no CUDA here: every one skips
    assert [r["label"] for r in results["train-1b"]] == ["bf16", "fp8", "fp4"]
    assert [r["label"] for r in results["train-350m"]][:5] == ["bf16", "fp8", "fp4", "bf16-nondeterministic",
                                                              "fp8-e4m3-saved"]
    assert results["train-350m"][3]["deterministic"] is False and results["train-1b"][1]["backend"] == "native"
    assert "precision.x_t.format=fp8_e4m3" in results["train-350m"][4]["overrides"]
    assert all(r["tokens_per_s"] > 0 and r["device"] == "cpu" for r in results["train-1b"] + results["train-350m"])
    assert len(results["numerics"]["quantizers"]) == 11 and results["numerics"]["kernels"] == []
    profile = {r["label"]: r for r in results["profile"]}
    assert set(profile) == {"bf16", "fp4"}
    assert profile["bf16"]["gemm_pct"] > 0 and profile["fp4"]["quantization_pct"] > profile["bf16"]["quantization_pct"]
    assert len(summary["targets"]) == 9
    report = (out / "report.md").read_text()
    for heading in ("## Steps", "## Targets", "## Quantizer bandwidth", "## Training throughput, 1b", "## Profile", "## Costs"):
        assert heading in report and heading in printed  # the report is printed too
    assert sorted(p.name for p in out.iterdir()) == ["device_check.tar.gz", "report.md", "summary.json"]
    names = tar_names(out / "device_check.tar.gz")
    assert {f"work/logs/{s}.log" for s in ("tests", "numerics", "train-1b", "profile")} <= set(names)


def test_device_fidelity_dry_run_trains_five_runs_on_equal_tokens(tmp_path):
    out, printed = finished(_start_dry_run(tmp_path, "device_fidelity"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["corpus"]["documents"] > 20 and summary["vocab"] == 512
    runs = {r["run"]: r for r in summary["runs"]}
    assert set(runs) == {"bf16", "fp8", "fp4", "ngpt_bf16", "ngpt_fp4"}
    assert {r["status"] for r in runs.values()} == {"ok"}
    assert len({r["tokens"] for r in runs.values()}) == 1 and runs["bf16"]["tokens"] == 20 * 4 * 32
    assert all(r["final_val_loss"] < 7 for r in runs.values())  # from ln(512) = 6.24 uniform: they learned
    assert summary["qaf"]["step_before"] == 19 and summary["qaf"]["gap_before_pct"] is not None
    assert [c["status"] in ("met", "missed") for c in summary["targets"]] == [True] * 5
    assert summary["compare"]["llama"]["baseline"] == "bf16" and summary["compare"]["ngpt"]["baseline"] == "ngpt_bf16"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["fidelity.tar.gz", "loss.png", "loss_ngpt.png", "report.md", "summary.json"]
    names = set(tar_names(out / "fidelity.tar.gz"))
    for run in runs:
        assert f"runs/{run}/metrics.jsonl" in names and f"runs/{run}/config.yaml" in names
    assert {"runs/fp4/numerics.jsonl", "runs/ngpt_fp4/numerics.jsonl", "compare-llama/report.md"} <= names
    report = (out / "report.md").read_text()
    assert "## Targets" in report and "QAF closes part of fp4's gap" in report and "## megatron-lowp compare: ngpt" in report
    assert "| fp4 vs bf16 after QAF |" in printed
