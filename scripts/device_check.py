"""One command for a GPU machine without network: install, GPU tests, numerics and training benchmarks,
a profile, and a report of the targets met and missed.

    python scripts/device_check.py --out DIR [--budget 240]   # on the GPU (DIR defaults to $OUT)
    python scripts/device_check.py --dry-run --out DIR        # the same steps on the CPU, tiny shapes

Steps, each a child process with its own time box (its share of --budget plus what earlier steps
left unused), so one hung step cannot eat the rest:

  machine    versions, the GPU as the package sees it (name, native FP8/FP4 GEMMs, BF16 peak)
  install    pip install --no-deps --no-build-isolation --no-index -e . (offline; the children use
             PYTHONPATH whatever it says, so a failed install costs nothing)
  wheels     with --wheels DIR only: pip install --no-index pytest and its dependencies from DIR, for
             an image without pytest (make DIR where there is network: pip download -d DIR pytest)
  tests      pytest -m cuda tests/test_cuda.py
  numerics   scripts/bench_numerics.py: quantizer GB/s against a device-to-device copy
  train-1b   scripts/bench_train.py, 1b preset at seq 2048: bf16, fp8 (precision.backend native),
             fp4 (emulated GEMMs, Triton quantizers) taking turns in one process
  train-350m the same on the 350m preset, plus bf16 with device.deterministic false (its cost), fp8
             with E4M3 copies of W and X for backward (so dgrad and wgrad run on FP8 tensor cores
             too), and each recipe with train.compile where the schema has that key
  profile    torch.profiler over two steps per recipe (350m): the share of GEMMs, attention,
             quantization, optimizer, other kernels and GPU idle (host overhead), syncs per step

Writes DIR/report.md, DIR/summary.json and DIR/device_check.tar.gz (every log, JSON and table).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import re
import shutil
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_common import (  # noqa: E402
    CHECK_COLUMNS,
    REPO,
    Budget,
    Step,
    bundle,
    check_file_count,
    check_row,
    child_env,
    log_tail,
    machine_info,
    markdown_table,
    output_folder,
    python,
    run_step,
)

# Planned seconds per step; a step may also use what the steps before it left unused.
SHARES = {"install": 15, "wheels": 10, "tests": 75, "numerics": 25, "train-1b": 75, "train-350m": 45, "profile": 25}
REPORT_RESERVE_S = 10  # kept back for the report and the bundle
MIN_STEP_S = 10  # a step with less time than this is skipped rather than started

# The model shapes of the training benchmarks: preset, sequence length, micro-batch (one micro-batch
# per step, sized for an 80-141 GB GPU with three recipes' weights and optimizer states resident).
GPU_SHAPES = {"train-1b": ("1b", 2048, 4), "train-350m": ("350m", 2048, 8)}
TINY = ["model.preset=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
        "model.ffn_hidden_size=128", "train.seq_len=32", "train.micro_batch_size=2", "train.global_batch_size=2"]
BASE_RECIPE = "recipes/tiny/bf16.yaml"
FP8_NATIVE = ("fp8", "precision.backend=native")


def load_bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", REPO / "scripts/bench_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def shape_overrides(step: str, dry_run: bool) -> list[str]:
    if dry_run:
        return [*TINY, "device.type=cpu"]
    preset, seq, micro = GPU_SHAPES[step]
    return [f"model.preset={preset}", f"train.seq_len={seq}", f"train.micro_batch_size={micro}",
            f"train.global_batch_size={micro}", "device.type=cuda"]


def train_variants(step: str, compile_key: bool) -> tuple[list[str], list[list[str]]]:
    """--recipes entries and --set pairs for bench_train."""
    recipes, sets = ["bf16", "fp8", "fp4"], [list(FP8_NATIVE)]
    if step == "train-350m":
        recipes.append("bf16-nondeterministic=bf16")
        sets.append(["bf16-nondeterministic", "device.deterministic=false"])
        # The fp8 recipe saves W and X as E5M2 for backward, so dgrad and wgrad are E5M2 x E5M2, which
        # has no FP8 tensor-core GEMM: only fprop runs natively. With E4M3 copies all three do.
        recipes.append("fp8-e4m3-saved=fp8")
        sets += [["fp8-e4m3-saved", FP8_NATIVE[1]], ["fp8-e4m3-saved", "precision.w_t.format=fp8_e4m3"],
                 ["fp8-e4m3-saved", "precision.x_t.format=fp8_e4m3"]]
        if compile_key:
            for name in ("bf16", "fp8", "fp4"):
                recipes.append(f"{name}-compile={name}")
                sets.append([f"{name}-compile", "train.compile=true"])
            sets.append(["fp8-compile", "precision.backend=native"])
    return recipes, sets


def plan(work: Path, dry_run: bool, compile_key: bool, wheels: Path | None = None) -> list[Step]:
    py = python()
    pip = [*py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
    steps = [Step("install", pip + (["--dry-run"] if dry_run else []))]
    if wheels is not None:
        steps.append(Step("wheels", [*py, "-m", "pip", "install", "--no-index", "--find-links", str(wheels.resolve()),
                                     "pytest", *(["--dry-run"] if dry_run else [])]))
    steps.append(Step("tests", [*py, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-v", "-rfEs",
                                "-p", "no:cacheprovider", "--junitxml", str(work / "tests.xml")]))
    numerics = [*py, "scripts/bench_numerics.py", "--out", str(work / "bench_numerics.json")]
    numerics += (["--device", "cpu", "--elements", "16384", "--repeats", "1", "--sizes", "64x64x64"] if dry_run
                 else ["--device", "cuda", "--elements", str(64 * 2**20), "--repeats", "3"])
    steps.append(Step("numerics", numerics))
    rounds = ["--warmup", "1", "--steps", "1", "--rounds", "1"] if dry_run else ["--warmup", "2", "--steps", "3",
                                                                                   "--rounds", "3"]
    for name in ("train-1b", "train-350m"):
        recipes, sets = train_variants(name, compile_key and not dry_run)
        command = [*py, "scripts/bench_train.py", BASE_RECIPE, *shape_overrides(name, dry_run),
                   "--recipes", *recipes, *[a for pair in sets for a in ("--set", *pair)], *rounds,
                   "--out", str(work / name)]
        steps.append(Step(name, command))
    spec = {"recipe_file": BASE_RECIPE, "overrides": shape_overrides("train-350m", dry_run),
            "variants": {"bf16": ["bf16", []], "fp8": ["fp8", [FP8_NATIVE[1]]], "fp4": ["fp4", []]},
            "warmup": 1 if dry_run else 2, "steps": 1 if dry_run else 2, "out": str(work / "profile.json")}
    if dry_run:
        del spec["variants"]["fp8"]  # the same code path as the other two; a dry run only proves it runs
    (work / "profile_spec.json").write_text(json.dumps(spec, indent=1))
    steps.append(Step("profile", [*py, str(Path(__file__).resolve()), "--profile-child", str(work / "profile_spec.json")]))
    return steps


def run_all(steps: list[Step], budget: Budget, work: Path, env: dict, only: set[str] | None) -> None:
    """Each step gets its share of the time left (SHARES scaled to it) plus whatever the steps before it
    left unused; a step that would get less than MIN_STEP_S is skipped."""
    chosen = [s for s in steps if only is None or s.name in only]
    start = budget.elapsed()
    scale = max(budget.left() - REPORT_RESERVE_S, 0) / sum(SHARES[s.name] for s in chosen) if chosen else 0
    planned_end = start
    for step in steps:
        if step not in chosen:
            step.status, step.note = "skipped", "not in --only"
            print(f"[  skipped] {step.name} (not in --only)")
            continue
        share = SHARES[step.name] * scale
        unused = max(0.0, planned_end - budget.elapsed())
        planned_end += share
        timeout = min(share + unused, budget.left() - REPORT_RESERVE_S)
        if timeout < MIN_STEP_S:
            step.status, step.note = "skipped", f"{max(timeout, 0):.0f} s left in the budget"
            print(f"[  skipped] {step.name} ({step.note})")
            continue
        if step.name.startswith("train-"):
            step.command += ["--time-limit", f"{0.8 * timeout:.0f}"]  # fewer rounds rather than no table
        run_step(step, timeout, work / "logs", env)


# --- the profile (a child process: python scripts/device_check.py --profile-child SPEC) -------------

RANGE_QUANTIZE, RANGE_ATTENTION, RANGE_OPTIMIZER = "lowp::quantize", "lowp::attention", "lowp::optimizer"
GEMM = re.compile(r"gemm|cutlass|xmma|nvjet|cublas|wgmma|^aten::(mm|addmm|bmm|matmul|_scaled_mm)$", re.I)
ATTENTION = re.compile(r"flash|fmha|attention|scaled_dot_product", re.I)
TRITON_QUANTIZERS = re.compile(r"_fp8_kernel|_nvfp4_kernel")  # megatron_lowp/numerics/triton_kernels.py
SYNC_EVENTS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}
CATEGORIES = ("gemm", "attention", "quantization", "optimizer", "other kernels")


def annotate_library():
    """Name the ranges the profile attributes time to (this process only; the library is unchanged).
    Returns the wrapper, for the optimizer step of each trainer."""
    import torch
    import torch.nn.functional as F

    from megatron_lowp.precision.spec import QuantSpec

    def ranged(fn, name):
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(name):
                return fn(*args, **kwargs)
        return wrapper

    QuantSpec.quantize = ranged(QuantSpec.quantize, RANGE_QUANTIZE)
    QuantSpec.fake_quantize = ranged(QuantSpec.fake_quantize, RANGE_QUANTIZE)
    F.scaled_dot_product_attention = ranged(F.scaled_dot_product_attention, RANGE_ATTENTION)
    return ranged


def _ancestors(event) -> list[str]:
    names, node = [], getattr(event, "cpu_parent", None)
    while node is not None:
        names.append(node.name)
        node = getattr(node, "cpu_parent", None)
    return names


def category(name: str, ancestors: list[str]) -> str:
    """Where one kernel (or, on the CPU, one op's own time) belongs."""
    if ATTENTION.search(name) or any(RANGE_ATTENTION == a or ATTENTION.search(a) for a in ancestors):
        return "attention"
    if GEMM.search(name) or any(GEMM.search(a) for a in ancestors[:2]):
        return "gemm"
    if TRITON_QUANTIZERS.search(name) or RANGE_QUANTIZE in ancestors:
        return "quantization"
    if RANGE_OPTIMIZER in ancestors:
        return "optimizer"
    return "other kernels"


def _on_gpu(event) -> bool:
    return getattr(getattr(event, "device_type", None), "name", "") == "CUDA"


def attribute(events, wall_s: float, steps: int, on_device: bool) -> dict:
    """Seconds per step by category from profiler events: GPU kernels on a GPU (classified with the
    launching op's ranges where the profiler links one, by name otherwise, e.g. Triton launches), each
    op's own CPU time on the CPU; 'idle' is the wall time no kernel ran."""
    seconds: dict[str, float] = defaultdict(float)
    linked: dict[str, float] = defaultdict(float)  # kernel name -> microseconds claimed by a CPU op
    on_gpu: dict[str, float] = defaultdict(float)  # kernel name -> microseconds seen on the GPU
    syncs = 0
    for e in events:
        if e.name in SYNC_EVENTS or (not on_device and e.name == "aten::_local_scalar_dense"):
            syncs += 1
        if _on_gpu(e):
            on_gpu[e.name] += e.time_range.end - e.time_range.start
        elif on_device:
            chain = [e.name, *_ancestors(e)]
            for k in getattr(e, "kernels", []):
                seconds[category(k.name, chain)] += k.duration / 1e6
                linked[k.name] += k.duration
        elif e.name not in (RANGE_QUANTIZE, RANGE_ATTENTION, RANGE_OPTIMIZER) and not e.name.startswith("ProfilerStep"):
            seconds[category(e.name, _ancestors(e))] += e.self_cpu_time_total / 1e6
    for name, us in on_gpu.items():  # kernels no CPU op claimed
        if us - linked.get(name, 0.0) > 1e-3:
            seconds[category(name, [])] += (us - linked.get(name, 0.0)) / 1e6
    busy = sum(seconds.values())
    row = {"step_s": wall_s / steps, "busy_s": busy / steps, "syncs_per_step": syncs / steps}
    for c in CATEGORIES:
        row[f"{c}_s"] = seconds[c] / steps
        row[f"{c}_pct"] = 100 * seconds[c] / max(wall_s, 1e-12)
    row["idle_pct"] = max(0.0, 100 * (wall_s - busy) / max(wall_s, 1e-12)) if on_device else None
    return row


def profile_child(spec_path: Path) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    spec = json.loads(spec_path.read_text())
    bench = load_bench_train()
    ranged = annotate_library()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (recipe, own) in spec["variants"].items():
            trainer = bench.build(Path(REPO / spec["recipe_file"]), label, recipe, [*spec["overrides"], *own], tmp)
            trainer.engine.step = ranged(trainer.engine.step, RANGE_OPTIMIZER)
            bench.timed_steps(trainer, spec["warmup"])
            on_device = trainer.device.type != "cpu"
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
            with profile(activities=activities) as prof:
                step_s = bench.timed_steps(trainer, spec["steps"])
            row = attribute(prof.events(), step_s * spec["steps"], spec["steps"], on_device)
            rows.append({"label": label, "recipe": recipe, "device": trainer.device.capabilities.name,
                         "kernels": "device kernels" if on_device else "CPU op self time", **row})
            print(json.dumps(rows[-1]), flush=True)
            del trainer, prof
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    Path(spec["out"]).write_text(json.dumps(rows, indent=1))
    return 0


# --- the report -----------------------------------------------------------------------------------

def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def counts_from_log(log: Path) -> dict:
    """What pytest -v printed before it was ended (it writes the JUnit file only at the end)."""
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return {}
    outcome = {}
    for line in lines:
        found = re.match(r"(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED)", line)
        if found:
            outcome[found.group(1)] = found.group(2)
    if not outcome:
        return {}
    n = {k: sum(v == k for v in outcome.values()) for k in ("PASSED", "FAILED", "ERROR", "SKIPPED")}
    return {"tests": len(outcome), "passed": n["PASSED"], "failures": n["FAILED"], "errors": n["ERROR"],
            "skipped": n["SKIPPED"], "failed_tests": [t for t, v in outcome.items() if v in ("FAILED", "ERROR")],
            "skip_reasons": [], "partial": True}


def test_counts(xml_path: Path, log: Path | None = None) -> dict:
    """Counts from the JUnit file, else (a step that was ended) from the log."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return counts_from_log(log) if log is not None else {}
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = []
    for case in suite.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:  # its name and the first line of what went wrong
            message = (problem.get("message") or problem.text or "").strip().splitlines()[:1]
            counts["failed_tests"].append(f"{case.get('name')}: {message[0][:300] if message else '?'}")
    skips = [c.find("skipped").get("message", "") for c in suite.iter("testcase") if c.find("skipped") is not None]
    counts["skip_reasons"] = sorted(set(skips))
    return counts


def _row(rows: list[dict] | None, label: str) -> dict | None:
    """The measured row of an entry (None where it was not run or failed)."""
    return next((r for r in rows or [] if r["label"] == label and "error" not in r), None)


def targets(results: dict) -> list[dict]:
    checks = []
    kernels = {(r["op"], r["rounding"]): r for r in (results.get("numerics") or {}).get("kernels", [])}
    for fmt in ("fp8_e4m3", "fp8_e5m2", "nvfp4"):
        r = kernels.get((f"triton {fmt}", "nearest"))
        v = r["vs_copy"] if r else None
        checks.append(check_row(f"RTN {fmt} quantizer bandwidth", ">= 70% of copy", v, v is not None and v >= 0.7,
                                f"{100 * v:.0f}% ({r['GB_per_s']:,.0f} GB/s)" if r else ""))
    for step in ("train-1b", "train-350m"):
        rows = results.get(step)
        bf16, fp8, fp4 = (_row(rows, k) for k in ("bf16", "fp8", "fp4"))
        size = step.split("-")[1]
        if step == "train-1b":
            mfu = bf16["mfu"] if bf16 else None
            checks.append(check_row(f"bf16 MFU, {size}", ">= 40%", mfu, mfu is not None and mfu >= 0.4,
                                    f"{100 * mfu:.1f}%" if mfu is not None else ""))
        for row, name, goal in ((fp8, "fp8 (native) tokens/s", 1.25), (fp4, "fp4 (emulated) tokens/s", 0.8)):
            v = row["tokens_per_s"] / bf16["tokens_per_s"] if row and bf16 else None
            checks.append(check_row(f"{name} vs bf16, {size}", f">= {goal}x", v, v is not None and v >= goal,
                                    f"{v:.2f}x" if v is not None else ""))
    tests = results.get("tests") or {}
    if tests:
        ok = tests["failures"] + tests["errors"] == 0 and tests["passed"] > 0 and not tests.get("partial")
        checks.append(check_row("GPU tests (pytest -m cuda)", "all pass", tests["passed"], ok,
                                f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                                f"{tests['skipped']} skipped"))
    return checks


def costs(results: dict) -> list[str]:
    """Determinism, compile and the per-step non-finite check, in words, from what was measured."""
    lines = []
    rows = results.get("train-350m")
    bf16, nondet = _row(rows, "bf16"), _row(rows, "bf16-nondeterministic")
    if bf16 and nondet:
        lines.append(f"- device.deterministic: true costs {100 * (bf16['step_s'] / nondet['step_s'] - 1):+.1f}% step "
                     f"time on bf16 350m ({bf16['step_s']:.3f} s vs {nondet['step_s']:.3f} s). Both ran in one process, "
                     "so the cuBLAS workspace setting that the first deterministic trainer exported applied to both; "
                     "the measured part is torch.use_deterministic_algorithms and cudnn.benchmark.")
    fp8, all_native = _row(rows, "fp8"), _row(rows, "fp8-e4m3-saved")
    if bf16 and fp8 and all_native:
        lines.append(f"- fp8 350m: {fp8['tokens_per_s'] / bf16['tokens_per_s']:.2f}x bf16 tokens/s with the recipe's "
                     "E5M2 copies of W and X for backward (dgrad and wgrad are E5M2 x E5M2: no FP8 GEMM, emulated), "
                     f"{all_native['tokens_per_s'] / bf16['tokens_per_s']:.2f}x with E4M3 copies (all three GEMMs native).")
    for name in ("bf16", "fp8", "fp4"):
        compiled, eager = _row(rows, f"{name}-compile"), _row(rows, name)
        if compiled and eager:
            lines.append(f"- train.compile on {name} 350m: {eager['step_s'] / compiled['step_s']:.2f}x the eager tokens/s.")
    if not any(r["label"].endswith("-compile") for r in rows or [] if "error" not in r):
        lines.append("- train.compile: not measured (the schema has no train.compile key in this checkout, or dry run).")
    prof = results.get("profile") or []
    if prof:
        syncs = ", ".join(f"{r['label']} {r['syncs_per_step']:.0f}" for r in prof)
        idle = ", ".join(f"{r['label']} {r['idle_pct']:.0f}%" for r in prof if r.get("idle_pct") is not None)
        lines.append("- The per-step non-finite check (one host sync after clip_grad_norm) cannot be switched off by "
                     "configuration, so its cost was not measured directly. Blocking syncs per step "
                     f"(all causes): {syncs}." + (f" GPU idle share of the step: {idle}; removing syncs can "
                                                  "recover at most that." if idle else ""))
    return lines


def fixes(results: dict) -> list[str]:
    """What the profile says to fix first, per recipe."""
    lines = []
    for r in results.get("profile") or []:
        shares = {c: r[f"{c}_pct"] for c in CATEGORIES}
        if r.get("idle_pct") is not None:
            shares["GPU idle (host overhead)"] = r["idle_pct"]
        top = max(shares, key=shares.get)
        lines.append(f"- {r['label']}: largest share {top} ({shares[top]:.0f}% of the step); "
                     f"{r['syncs_per_step']:.0f} blocking syncs per step")
    return lines


def report(out: Path, work: Path, steps: list[Step], info: dict, dry_run: bool, budget: Budget) -> dict:
    results = {"numerics": read_json(work / "bench_numerics.json"),
               "tests": test_counts(work / "tests.xml", work / "logs" / "tests.log"),
               "train-1b": read_json(work / "train-1b" / "bench_train.json"),
               "train-350m": read_json(work / "train-350m" / "bench_train.json"),
               "profile": read_json(work / "profile.json")}
    checks = targets(results)
    md = ["# Device check" + (" (DRY RUN on the CPU, tiny shapes: the numbers mean nothing)" if dry_run else ""), "",
          f"{info.get('device', '?')}; torch {info.get('torch', '?')} (CUDA {info.get('torch_cuda')}), triton "
          f"{info.get('triton')}, python {info.get('python', '?')}; {info.get('nvidia_smi', '')}", "",
          f"Budget {budget.seconds:.0f} s, used {budget.elapsed():.0f} s.", "", "## Steps", "",
          markdown_table([s.row() for s in steps], [("name", "step"), ("status", "status"), ("seconds", "seconds", ".1f"),
                                                    ("timeout_s", "time box (s)", ".0f"), ("note", "note")]),
          "## Targets", "", markdown_table(checks, CHECK_COLUMNS)]
    tests = results["tests"]
    if tests:
        md += ["## GPU tests", "", f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
               f"{tests['skipped']} skipped" + (" (before the step was ended; from its log)." if tests.get("partial")
                                                else "."), *[f"- failed: {t}" for t in tests["failed_tests"]],
               *[f"- skipped: {s}" for s in tests["skip_reasons"]], ""]
    numerics = results["numerics"]
    if numerics:
        cols = [("op", "op"), ("rounding", "rounding"), ("GB_per_s", "GB/s"), ("vs_copy", "vs copy")]
        md += ["## Quantizer bandwidth", "", "End to end (`fake_quantize`: input checks, scale, quantize, dequantize):",
               "", markdown_table(numerics["quantizers"], cols)]
        if numerics.get("kernels"):
            md += ["The fused Triton kernels alone (bytes read + written):", "", markdown_table(numerics["kernels"], cols)]
    for name in ("train-1b", "train-350m"):
        table = work / name / "bench_train.md"
        if table.is_file():
            md += [f"## Training throughput, {name[6:]}", "", table.read_text()]
    if results["profile"]:
        cols = [("label", "recipe"), ("step_s", "step (s)", ".3f"), *[(f"{c}_pct", f"{c} %", ".1f") for c in CATEGORIES],
                ("idle_pct", "GPU idle %", ".1f"), ("syncs_per_step", "syncs/step", ".0f")]
        md += ["## Profile (350m, share of the step's wall time)", "", markdown_table(results["profile"], cols),
               "What to fix first:", "", *fixes(results), ""]
    md += ["## Costs", "", *costs(results), ""]
    tests_step = next((s for s in steps if s.name == "tests"), None)
    if tests_step is not None and "No module named pytest" in log_tail(tests_step):
        md += ["pytest is not installed here: make a folder of its wheels where there is network "
               "(`pip download -d bench/wheels pytest`), bring it along and pass `--wheels bench/wheels`.", ""]
    failed = [s for s in steps if s.status in ("failed", "timed out")]
    for s in failed:
        md += [f"## {s.name}: {s.status}, last lines of its log", "", "```", log_tail(s), "```", ""]
    text = "\n".join(md)
    (out / "report.md").write_text(text)
    summary = {"dry_run": dry_run, "machine": info, "budget_s": budget.seconds, "elapsed_s": budget.elapsed(),
               "steps": [s.row() for s in steps], "targets": checks, "results": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else bench/device-check-<time>)")
    parser.add_argument("--budget", type=float, default=240.0, help="wall-clock seconds for everything (default 240)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    parser.add_argument("--only", nargs="+", default=None, choices=list(SHARES), help="run only these steps")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="a folder of wheels to install pytest from, offline (for an image without pytest)")
    parser.add_argument("--work", default=None, help="folder for logs and intermediate files (default: a temp folder)")
    parser.add_argument("--profile-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile_child is not None:
        return profile_child(args.profile_child)
    budget = Budget(args.budget)
    out = output_folder(args.out, "device-check")
    work = Path(args.work or tempfile.mkdtemp(prefix="device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(args.dry_run, {"CUDA_VISIBLE_DEVICES": ""} if args.dry_run else None)
    print(f"device check{' (dry run)' if args.dry_run else ''}: budget {args.budget:.0f} s, output {out}, work {work}")
    info, machine = machine_info(work / "logs", env)
    compile_key = load_bench_train().compile_key_exists()
    steps = plan(work, args.dry_run, compile_key, args.wheels)
    run_all(steps, budget, work, env, set(args.only) if args.only else None)
    steps.insert(0, machine)
    summary = report(out, work, steps, info, args.dry_run, budget)
    shutil.copy(out / "report.md", work / "report.md")
    bundle(out, "device_check", work.parent, [work])
    check_file_count(out)
    print()
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, summary.json and device_check.tar.gz")
    # a failed install costs nothing (the children import the checkout through PYTHONPATH)
    return 0 if not any(s["status"] in ("failed", "timed out") for s in summary["steps"] if s["name"] != "install") else 1


if __name__ == "__main__":
    raise SystemExit(main())
