"""Loss fidelity of the recipes on one GPU without network: bf16, fp8, fp4 (with QAF), ngpt_bf16 and
ngpt_fp4 trained on the same data for the same tokens, compared against their BF16 baselines.

    python scripts/device_fidelity.py --out DIR [--budget 510]   # on the GPU (DIR defaults to $OUT)
    python scripts/device_fidelity.py --dry-run --out DIR        # the same steps on the CPU, tiny shapes

1. corpus     text nobody here wrote that the machine already holds: the source and documentation
              files of installed Python packages (--packages), one document per file, as JSONL
2. tokenizer  megatron-lowp tokenizer train (sentencepiece BPE, --vocab) on a sample of it
3. prepare    megatron-lowp prepare with every core, 2% of the documents held out for validation
              (20% in a dry run: a tiny corpus)
4. calibrate  each run's trainer built in one child, a few steps timed (and one evaluation): the
              step count is chosen so that all five runs fit in the time left (a multiple of 20, so
              that validation lands on the step before QAF starts at 95%)
5. runs       megatron-lowp train, one run after another (tokens/s comparable): the tiny recipes
              with model.preset=125m (ngpt: init std 1/sqrt(d_model)), the same seed and data; fp8
              with native FP8 GEMMs where the chip has them; fp4 with QAF over the last 5%
6. compare    megatron-lowp compare: fp8 and fp4 against bf16, ngpt_fp4 against ngpt_bf16

Writes DIR/report.md (the targets as met / missed, the gap before and after the QAF switch, both
comparisons), DIR/summary.json, DIR/loss.png and DIR/loss_ngpt.png, and DIR/fidelity.tar.gz with
each run's metrics.jsonl, numerics.jsonl, events.jsonl and config.yaml, the comparisons and every log.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
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
    run_steps,
)

PACKAGES = ("transformers", "jax", "scipy", "numpy", "sympy", "matplotlib")
DRY_PACKAGES = ("yaml", "tqdm")
SUFFIXES = (".py", ".md", ".rst", ".txt")
RUNS = {  # name -> recipe file; each tiny recipe differs from its baseline only in what its recipe changes
    "bf16": "recipes/tiny/bf16.yaml",
    "fp8": "recipes/tiny/fp8.yaml",
    "fp4": "recipes/tiny/fp4.yaml",
    "ngpt_bf16": "recipes/tiny/ngpt_bf16.yaml",
    "ngpt_fp4": "recipes/tiny/ngpt_fp4.yaml",
}
PAIRS = {"llama": ("bf16", ["fp8", "fp4"]), "ngpt": ("ngpt_bf16", ["ngpt_fp4"])}
QAF_FRACTION = 0.95
EVALS = 20  # validation points per run; the one at 95% is the gap before QAF
REPORT_RESERVE_S = 30  # compare, report and bundle
MIN_STEPS = 20


# --- 1. corpus --------------------------------------------------------------------------------------

def package_root(name: str) -> Path | None:
    """The folder of an installed package (found without importing it), or None."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def build_corpus(packages: list[str], out: Path, max_bytes: int, max_file_bytes: int = 256_000) -> dict:
    """One JSONL document per source/doc file of each package, each package up to an equal share of
    max_bytes (a share one package leaves unused passes to the next). Files are taken in the order
    of a hash of their path: a fixed, spread-out sample (sorted order would take one package's
    first few folders only). Skips
    files that are not UTF-8, larger than max_file_bytes (generated tables) or nearly empty, and this
    repository's own files (a virtual environment inside it is fine)."""
    stats: dict = {"packages": {}, "missing": [], "documents": 0, "bytes": 0}
    roots = {}
    for name in packages:
        root = package_root(name)
        if root is None or (REPO in root.parents and "site-packages" not in root.parts):
            stats["missing"].append(name)
        else:
            roots[name] = root
    left = max_bytes
    with open(out, "w", encoding="utf-8") as f:
        for i, (name, root) in enumerate(roots.items()):
            quota, taken, docs = left / (len(roots) - i), 0, 0
            files = [p for p in root.rglob("*") if p.suffix in SUFFIXES and "__pycache__" not in p.parts]
            for path in sorted(files, key=lambda p: hashlib.blake2b(str(p.relative_to(root)).encode()).digest()):
                try:
                    size = path.stat().st_size
                    if not 64 <= size <= max_file_bytes or taken + size > quota:
                        continue
                    text = path.read_bytes().decode("utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                f.write(json.dumps({"text": text, "source": f"{name}/{path.relative_to(root)}"}) + "\n")
                taken, docs = taken + size, docs + 1
            left -= taken
            try:
                version = importlib.metadata.version(name if name != "yaml" else "pyyaml")
            except importlib.metadata.PackageNotFoundError:
                version = None
            stats["packages"][name] = {"version": version, "documents": docs, "bytes": taken}
            stats["documents"] += docs
            stats["bytes"] += taken
    return stats


# --- 4. calibration (a child process: python scripts/device_fidelity.py --calibrate-child SPEC) --------

def run_overrides(name: str, common: list[str], steps: int, d_model: int, quantized_every: int) -> list[str]:
    """The command-line overrides of one run: common ones, then what this run needs."""
    own = [*common, f"run.name={name}", f"train.steps={steps}", f"train.eval_every={max(1, steps // EVALS)}"]
    if name in ("bf16", "fp8", "fp4"):
        own.append(f"optim.warmup_steps={max(1, steps // 20)}")
    if name.startswith("ngpt"):
        own.append(f"model.init_std={1 / math.sqrt(d_model):.6g}")
    if name in ("fp8", "fp4", "ngpt_fp4"):
        own.append(f"precision.telemetry_every={quantized_every}")
    if name == "fp4":
        own += [f"precision.qaf.start_fraction={QAF_FRACTION}", f"precision.qaf.warmup_steps={max(1, steps // 100)}",
                f"precision.grad_noise.every={quantized_every}"]
    return own


def calibrate_child(spec_path: Path) -> int:
    """Build each run's trainer, time warm-up steps, steady steps and one evaluation; results are
    written after every run, so a time box that ends this child still leaves the runs measured so far."""
    started = time.perf_counter()
    import megatron_lowp.train.loop  # noqa: F401  (the imports a training process pays for)

    spec = json.loads(spec_path.read_text())
    result = {"import_s": time.perf_counter() - started, "runs": {}}
    for name, (recipe_file, overrides) in spec["runs"].items():
        try:
            result["runs"][name] = calibrate_one(REPO / recipe_file, overrides, spec["warmup"], spec["steps"])
        except Exception as e:  # one recipe that cannot run must not cost the others their runs
            result["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
        Path(spec["out"]).write_text(json.dumps(result, indent=1))
        print(name, json.dumps(result["runs"][name]), flush=True)
        gc.collect()
    return 0


def calibrate_one(recipe_file: Path, overrides: list[str], warmup: int, steps: int) -> dict:
    from megatron_lowp.config import load_config
    from megatron_lowp.precision import available_recipes
    from megatron_lowp.train.loop import Trainer

    t0 = time.perf_counter()
    cfg = load_config(recipe_file, [*overrides, "run.resume=never", "run.overwrite=true"],
                      extra_choices={"precision.recipe": available_recipes()})
    trainer = Trainer(cfg)
    t1 = time.perf_counter()
    for _ in range(warmup):
        loss, _ = trainer.train_step()
    loss.item()
    trainer.device.synchronize()
    t2 = time.perf_counter()
    for _ in range(steps):
        loss, _ = trainer.train_step()
    loss.item()
    trainer.device.synchronize()
    t3 = time.perf_counter()
    trainer.evaluate()
    trainer.device.synchronize()
    t4 = time.perf_counter()
    return {"build_s": t1 - t0, "warmup_s": t2 - t1, "step_s": (t3 - t2) / steps, "eval_s": t4 - t3,
            "params": trainer.model.num_params(), "tokens_per_step": cfg.train.global_batch_size * cfg.train.seq_len}


def predicted_seconds(run: dict, steps: int, import_s: float, warmup_steps: int) -> float:
    """Wall time of one training process: start-up (import, build, the first steps' compilation),
    steps, evaluations and the final checkpoint (16 bytes per parameter at a conservative 0.5 GB/s)."""
    startup = import_s + run["build_s"] + max(0.0, run["warmup_s"] - warmup_steps * run["step_s"]) + 5.0
    return startup + steps * run["step_s"] + (EVALS + 1) * run["eval_s"] + 16 * run["params"] / 0.5e9


def choose_steps(calibration: dict, seconds: float, warmup_steps: int, max_steps: int | None = None) -> int:
    """The largest multiple of 20 steps whose predicted total over all runs fits in seconds (at least
    MIN_STEPS: a run shorter than that says nothing about QAF)."""
    runs, import_s = calibration["runs"].values(), calibration["import_s"]
    fixed = sum(predicted_seconds(r, 0, import_s, warmup_steps) for r in runs)
    per_step = sum(r["step_s"] for r in runs)
    steps = int((seconds - fixed) / per_step) // 20 * 20 if per_step > 0 else MIN_STEPS
    steps = max(MIN_STEPS, steps)
    return min(steps, max_steps) if max_steps else steps


# --- 6. checks ----------------------------------------------------------------------------------------

def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def val_at(rows: list[dict]) -> dict[int, float]:
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def gap_pct(run: dict[int, float], base: dict[int, float], step: int) -> float | None:
    if step in run and step in base:
        return 100 * (run[step] - base[step]) / base[step]
    return None


def fidelity_checks(vals: dict[str, dict[int, float]], steps: int) -> tuple[list[dict], dict]:
    """The issue's targets at equal tokens (final validation loss) and the QAF gap before/after."""
    before = int(QAF_FRACTION * steps)  # the last step before QAF (start_fraction: steps > floor(f * steps))
    gaps = {name: gap_pct(vals.get(name, {}), vals.get(base, {}), steps)
            for base, runs in PAIRS.values() for name in runs}
    qaf = {"step_before": before, "gap_before_pct": gap_pct(vals.get("fp4", {}), vals.get("bf16", {}), before),
           "gap_after_pct": gaps["fp4"]}
    fmt = "{:+.2f}%".format
    checks = [check_row("fp8 vs bf16, final validation loss", "within 0.5%", gaps["fp8"],
                        gaps["fp8"] is not None and gaps["fp8"] <= 0.5, fmt(gaps["fp8"] or 0)),
              check_row("fp4 vs bf16 after QAF", "within 1.5%", gaps["fp4"],
                        gaps["fp4"] is not None and gaps["fp4"] <= 1.5, fmt(gaps["fp4"] or 0))]
    closed = (qaf["gap_before_pct"] - qaf["gap_after_pct"]
              if None not in (qaf["gap_before_pct"], qaf["gap_after_pct"]) else None)
    checks.append(check_row("QAF closes part of fp4's gap", "gap after < gap before", closed,
                            closed is not None and closed > 0,
                            f"{fmt(qaf['gap_before_pct'] or 0)} at step {before} -> {fmt(qaf['gap_after_pct'] or 0)}"))
    checks.append(check_row("ngpt_fp4 vs ngpt_bf16", "within 1.5%", gaps["ngpt_fp4"],
                            gaps["ngpt_fp4"] is not None and gaps["ngpt_fp4"] <= 1.5, fmt(gaps["ngpt_fp4"] or 0)))
    smaller = None if None in (gaps["ngpt_fp4"], gaps["fp4"]) else gaps["ngpt_fp4"] < gaps["fp4"]
    checks.append(check_row("ngpt_fp4's gap smaller than fp4's", "ngpt_fp4 gap < fp4 gap",
                            None if smaller is None else gaps["ngpt_fp4"], smaller,
                            f"{fmt(gaps['ngpt_fp4'] or 0)} vs {fmt(gaps['fp4'] or 0)}"))
    return checks, {"final_gap_pct": gaps, "qaf": qaf}


def gap_table(vals: dict[str, dict[int, float]], steps: int) -> str:
    """Validation gap (%) to the baseline at five points of the run."""
    points = sorted({max(1, steps // EVALS) * round(EVALS * f) for f in (0.25, 0.5, 0.75, QAF_FRACTION, 1.0)})
    rows = []
    for base, runs in PAIRS.values():
        for name in runs:
            rows.append({"run": f"{name} - {base}", **{str(s): gap_pct(vals.get(name, {}), vals.get(base, {}), s)
                                                        for s in points}})
    return markdown_table(rows, [("run", "gap % at step"), *[(str(s), str(s), "+.2f") for s in points]])


# --- the script -------------------------------------------------------------------------------------

def write_report(out: Path, work: Path, ctx: dict, steps_done: list[Step], budget: Budget) -> dict:
    vals = {name: val_at(read_rows(work / "runs" / name)) for name in RUNS}
    checks, numbers = fidelity_checks(vals, ctx.get("steps", 0))
    runs = []
    for name in RUNS:
        rows = [r for r in read_rows(work / "runs" / name) if "loss" in r]
        step = next((s for s in steps_done if s.name == f"run-{name}"), None)
        speeds = sorted(r["tokens_per_s"] for r in rows[1:] or rows)
        runs.append({"run": name, "status": step.status if step else "not run", "steps": rows[-1]["step"] if rows else 0,
                     "tokens": rows[-1]["tokens"] if rows else 0,
                     "final_val_loss": vals[name][max(vals[name])] if vals[name] else None,
                     "tokens_per_s": speeds[len(speeds) // 2] if speeds else None,
                     "wall_s": step.seconds if step else None,
                     "predicted_s": step.extra.get("predicted_s") if step else None})
    corpus = ctx.get("corpus", {})
    md = ["# Fidelity at equal tokens" + (" (DRY RUN on the CPU, tiny shapes: the numbers mean nothing)"
                                          if ctx["dry_run"] else ""), "",
          f"{ctx['machine'].get('device', '?')}; torch {ctx['machine'].get('torch', '?')}; budget {budget.seconds:.0f} s, "
          f"used {budget.elapsed():.0f} s.", "",
          f"Corpus: {corpus.get('documents', 0):,} files ({corpus.get('bytes', 0) / 1e6:.1f} MB) from "
          + ", ".join(f"{k} {v['version']} ({v['documents']:,})" for k, v in corpus.get("packages", {}).items())
          + (f"; not installed: {', '.join(corpus['missing'])}" if corpus.get("missing") else "")
          + f". Tokenizer: sentencepiece BPE, {ctx.get('vocab')} pieces. Tokens: {ctx.get('train_tokens', 0):,} train, "
          f"{ctx.get('valid_tokens', 0):,} validation.", "",
          f"Every run: {ctx.get('steps', 0)} steps x {ctx.get('tokens_per_step', 0):,} tokens = "
          f"{ctx.get('steps', 0) * ctx.get('tokens_per_step', 0):,} tokens ({ctx.get('epochs', 0):.2f} epochs of the "
          f"train split), seed 1234, validation every {max(1, ctx.get('steps', 0) // EVALS)} steps; fp4's QAF from step "
          f"{int(QAF_FRACTION * ctx.get('steps', 0)) + 1}. Shared overrides: `{' '.join(ctx.get('common', []))}`.", "",
          "## Targets (final validation loss, equal tokens)", "", markdown_table(checks, CHECK_COLUMNS),
          "## Validation gap over the run", "", gap_table(vals, ctx.get("steps", 0)),
          "## Runs", "", markdown_table(runs, [("run", "run"), ("status", "status"), ("steps", "steps"),
                                               ("tokens", "tokens"), ("final_val_loss", "final val loss", ".4f"),
                                               ("tokens_per_s", "tokens/s (median)", ",.0f"), ("wall_s", "wall (s)", ".0f"),
                                               ("predicted_s", "predicted (s)", ".0f")])]
    for pair in PAIRS:
        path = work / f"compare-{pair}" / "report.md"
        if path.is_file():
            md += [f"## megatron-lowp compare: {pair}", "", path.read_text().replace("# Comparison", "### Comparison")]
    md += ["## Steps", "", markdown_table([s.row() for s in steps_done], [("name", "step"), ("status", "status"),
                                                                          ("seconds", "seconds", ".1f"),
                                                                          ("timeout_s", "time box (s)", ".0f"),
                                                                          ("note", "note")])]
    for s in steps_done:
        if s.status in ("failed", "timed out"):
            md += [f"## {s.name}: {s.status}, last lines of its log", "", "```", log_tail(s), "```", ""]
    (out / "report.md").write_text("\n".join(md))
    summary = {"dry_run": ctx["dry_run"], "machine": ctx["machine"], "budget_s": budget.seconds,
               "elapsed_s": budget.elapsed(), "corpus": corpus, "vocab": ctx.get("vocab"), "steps": ctx.get("steps"),
               "tokens_per_run": ctx.get("steps", 0) * ctx.get("tokens_per_step", 0),
               "calibration": ctx.get("calibration"), "runs": runs, "targets": checks, **numbers,
               "validation": {k: {str(s): v for s, v in d.items()} for k, d in vals.items()},
               "compare": {pair: _read_json(work / f"compare-{pair}" / "summary.json") for pair in PAIRS},
               "process_steps": [s.row() for s in steps_done]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return summary


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def prepared_tokens(prefix: Path) -> tuple[int, int]:
    """Train and validation tokens from PREFIX_prepare.json (0 where it is missing)."""
    splits = ((_read_json(Path(f"{prefix}_prepare.json")) or {}).get("summary") or {}).get("splits") or {}
    return tuple(int((splits.get(name) or {}).get("tokens", 0)) for name in ("train", "valid"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else bench/fidelity-<time>)")
    parser.add_argument("--budget", type=float, default=510.0, help="wall-clock seconds for everything (default 510)")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU: tiny model, tiny corpus")
    parser.add_argument("--work", default=None, help="folder for the corpus, datasets and runs (default: a temp folder)")
    parser.add_argument("--packages", nargs="+", default=None, help=f"corpus sources (default: {' '.join(PACKAGES)})")
    parser.add_argument("--corpus-mb", type=float, default=None, help="corpus size cap in MB (default 64; dry run 0.4)")
    parser.add_argument("--vocab", type=int, default=None, help="tokenizer pieces (default 8192; dry run 512)")
    parser.add_argument("--max-steps", type=int, default=None, help="at most this many steps per run (dry run: 20)")
    parser.add_argument("--parallel", type=int, default=None,
                        help="training runs at once (default 1: comparable tokens/s; dry run 2)")
    parser.add_argument("--calibrate-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calibrate_child is not None:
        return calibrate_child(args.calibrate_child)
    dry = args.dry_run
    budget = Budget(args.budget)
    out = output_folder(args.out, "fidelity")
    work = Path(args.work or tempfile.mkdtemp(prefix="device-fidelity-"))
    (work / "data").mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    env = child_env(dry, {"CUDA_VISIBLE_DEVICES": ""} if dry else None)
    cores = 1 if dry else (os.cpu_count() or 1)
    print(f"fidelity{' (dry run)' if dry else ''}: budget {args.budget:.0f} s, output {out}, work {work}")
    info, machine = machine_info(logs, env)
    done = [machine]
    ctx: dict = {"dry_run": dry, "machine": info, "vocab": args.vocab or (512 if dry else 8192)}

    t0 = time.monotonic()
    corpus_file = work / "data" / "corpus.jsonl"
    ctx["corpus"] = build_corpus(list(args.packages or (DRY_PACKAGES if dry else PACKAGES)), corpus_file,
                                 int(1e6 * (args.corpus_mb or (0.4 if dry else 64))))
    done.append(Step("corpus", [], status="ok" if ctx["corpus"]["documents"] else "failed",
                     seconds=time.monotonic() - t0, note=f"{ctx['corpus']['documents']:,} files"))
    print(f"[       ok] corpus: {done[-1].seconds:.1f} s ({done[-1].note}, {ctx['corpus']['bytes'] / 1e6:.1f} MB)")
    tok, prefix = work / "data" / "tok.model", work / "data" / "corpus"
    mlp = [*python(), "-m", "megatron_lowp"]
    sample = ["--sample-docs", "300", "--max-doc-chars", "2000"] if dry else ["--sample-docs", "4000",
                                                                              "--max-doc-chars", "4000"]
    for step, timeout in ((Step("tokenizer", [*mlp, "tokenizer", "train", "--input", str(corpus_file), "--vocab-size",
                                              str(ctx["vocab"]), "--output", str(tok), *sample, "--threads", str(cores)]), 150),
                          (Step("prepare", [*mlp, "prepare", "--input", str(corpus_file), "--tokenizer", str(tok),
                                            "--output-prefix", str(prefix), "--valid-fraction", "0.2" if dry else "0.02", "--workers",
                                            str(0 if dry else cores), "--no-progress", "--overwrite"]), 150)):
        if done[-1].status != "ok":
            step.status, step.note = "skipped", f"{done[-1].name} did not succeed"
            done.append(step)
            continue
        done.append(run_step(step, min(timeout, budget.left() - REPORT_RESERVE_S), logs, env))
    ctx["train_tokens"], ctx["valid_tokens"] = prepared_tokens(prefix)

    shape = (["model.preset=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
              "model.ffn_hidden_size=128", "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4",
              "train.eval_samples=8", "train.eval_batch_size=8", "device.type=cpu"] if dry else
             ["model.preset=125m", "train.seq_len=1024", "train.micro_batch_size=32", "train.global_batch_size=32",
              "device.type=cuda"])
    d_model = 64 if dry else 768
    common = [*shape, f"data.train={prefix}_train", f"data.valid={prefix}_valid", f"data.tokenizer={tok}",
              f"run.out_dir={work / 'runs'}", "run.seed=1234", "train.log_every=5", "train.checkpoint_every=0",
              "logging.progress=false"]
    native = bool(info.get("native_fp8_gemm")) and not dry
    ctx["common"] = common

    def overrides(name: str, steps: int) -> list[str]:
        own = run_overrides(name, common, steps, d_model, max(1, steps // 10))
        return own + (["precision.backend=native"] if name == "fp8" and native else [])

    warmup = 1 if dry else 2
    spec = {"runs": {name: [RUNS[name], [*overrides(name, 1000), f"run.out_dir={work / 'calibration'}"]]
                     for name in RUNS},
            "warmup": warmup, "steps": 1 if dry else 3, "out": str(work / "calibration.json")}
    (work / "calibration_spec.json").write_text(json.dumps(spec, indent=1))
    calibrate = Step("calibrate", [*python(), str(Path(__file__).resolve()), "--calibrate-child",
                                   str(work / "calibration_spec.json")])
    if done[-1].status == "ok":
        run_step(calibrate, min(150, budget.left() - REPORT_RESERVE_S), logs, env)
    else:
        calibrate.status, calibrate.note = "skipped", "no prepared data"
    done.append(calibrate)
    calibration = _read_json(work / "calibration.json") or {"import_s": 0.0, "runs": {}}
    ctx["calibration"] = calibration
    measured = {name: r for name, r in calibration["runs"].items() if "error" not in r}
    for name in RUNS:
        if name not in measured:
            error = calibration["runs"].get(name, {}).get("error", "not measured by the calibration")
            done.append(Step(f"run-{name}", [], status="failed", note=f"calibration: {error}"[:300]))
    if measured:
        # 10% kept back for what the calibration does not time: telemetry and gradient-noise steps
        train_budget = 0.9 * (budget.left() - REPORT_RESERVE_S)
        steps = choose_steps({**calibration, "runs": measured}, train_budget, warmup,
                             args.max_steps or (MIN_STEPS if dry else None))
        ctx["tokens_per_step"] = next(iter(measured.values()))["tokens_per_step"]
    else:
        steps, ctx["tokens_per_step"] = 0, 0
        print("the calibration measured no run: no training runs")
    ctx["steps"] = steps
    ctx["epochs"] = steps * ctx["tokens_per_step"] / max(ctx["train_tokens"], 1)
    runs = [Step(f"run-{name}", [*mlp, "train", RUNS[name], *overrides(name, steps)],
                 extra={"predicted_s": predicted_seconds(measured[name], steps, calibration["import_s"], warmup)})
            for name in (RUNS if steps else []) if name in measured]
    parallel = args.parallel or (2 if dry else 1)  # one at a time on a GPU: tokens/s stay comparable
    done += run_steps(runs, lambda s: min(1.3 * s.extra["predicted_s"] * parallel + 30, budget.left() - REPORT_RESERVE_S),
                      parallel, logs, env)
    compares = []
    for pair, (base, names) in PAIRS.items():
        dirs = [str(work / "runs" / r) for r in names if (work / "runs" / r / "metrics.jsonl").is_file()]
        if dirs and (work / "runs" / base / "metrics.jsonl").is_file():
            compares.append(Step(f"compare-{pair}", [*mlp, "compare", *dirs, "--baseline", str(work / "runs" / base),
                                                     "--out", str(work / f"compare-{pair}")]))
    done += run_steps(compares, lambda s: min(60, max(budget.left() - 5, 10)), 2, logs, env)
    summary = write_report(out, work, ctx, done, budget)
    for pair, name in (("llama", "loss.png"), ("ngpt", "loss_ngpt.png")):
        if (work / f"compare-{pair}" / "loss.png").is_file():
            shutil.copy(work / f"compare-{pair}" / "loss.png", out / name)
    keep = [work / "logs", work / "calibration.json", work / f"{prefix.name}_prepare.json",
            *[work / f"compare-{p}" for p in PAIRS]]
    for name in RUNS:
        keep += [work / "runs" / name / f for f in ("metrics.jsonl", "numerics.jsonl", "events.jsonl", "config.yaml")]
    shutil.copy(out / "report.md", work / "report.md")
    keep.append(work / "report.md")
    if Path(f"{prefix}_prepare.json").is_file():
        shutil.copy(f"{prefix}_prepare.json", work / f"{prefix.name}_prepare.json")
    bundle(out, "fidelity", work, keep)
    check_file_count(out)
    print()
    print((out / "report.md").read_text())
    print(f"wrote {out}/report.md, summary.json, loss.png, loss_ngpt.png and fidelity.tar.gz")
    failed = [s for s in summary["process_steps"] if s["status"] in ("failed", "timed out")]
    return 1 if failed or not steps else 0


if __name__ == "__main__":
    raise SystemExit(main())
