"""`megatron-lowp compare RUN ... --baseline RUN --out DIR`: runs against a BF16 baseline, on one page.

Writes DIR/summary.json, DIR/report.md and DIR/loss.png (train and validation loss against tokens,
and a panel with each run's validation gap to the baseline). Per run: final and minimum losses, the
gap to the baseline (absolute and %), tokens/s and its ratio to the baseline, **time to target**
(the tokens and training seconds a run needed to reach the baseline's final validation loss, or
"not reached": the fair measure of a speed-up, since a faster step that needs more steps can
lose), peak memory, optimizer bytes per parameter, non-finite/rollback events and the numerics the
recipes log (the gradient-noise ratio, the QAF switch). Runs of different lengths, a run still in
progress or missing metrics give notes in the report, not a crash.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_lowp.errors import UserError
from megatron_lowp.eval.plots import ema
from megatron_lowp.eval.summary import run_summary
from megatron_lowp.memory.ledger import Ledger, ledger_table
from megatron_lowp.memory.measure import read_measured
from megatron_lowp.run.logs import read_jsonl


def time_to_target(rows: list[dict], target: float) -> dict | None:
    """Tokens and training seconds at the first validation loss <= target (None: not reached)."""
    for r in rows:
        if "val_loss" in r and r["val_loss"] <= target:
            return {"step": r["step"], "tokens": r["tokens"], "seconds": r.get("elapsed_s")}
    return None


def _events(run_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in read_jsonl(run_dir / "events.jsonl"):
        counts[e.get("event", "?")] = counts.get(e.get("event", "?"), 0) + 1
    return counts


def _validation_differences(base: dict, s: dict) -> list[str]:
    """How run s's validation set or tokenizer differs from the baseline's ([] if the same)."""
    a, b = base.get("validation"), s.get("validation")
    if a is None or b is None:
        missing = [x["run"] for x, v in ((base, a), (s, b)) if v is None]
        return [f"no validation.json in {', '.join(missing)}"]
    out = []
    if a.get("tokenizer_sha256") != b.get("tokenizer_sha256"):
        out.append(f"tokenizer {b.get('tokenizer')} vs {a.get('tokenizer')}")
    if a.get("fingerprint") != b.get("fingerprint"):
        keys = [k for k in ("data", "samples", "seq_len", "batch_size") if a.get(k) != b.get(k)]
        detail = ", ".join(f"{k} {b.get(k)} vs {a.get(k)}" for k in keys) or "other tokens"
        out.append(f"validation set ({detail})")
    return out


def compare_runs(runs: list[Path], baseline: Path, allow_different_validation: bool = False) -> dict:
    """Summaries of `runs` against `baseline`. Runs validated on another set of sequences or with
    another tokenizer than the baseline are refused (their losses are not comparable), unless
    allow_different_validation, which keeps them flagged in the report."""
    for path in [baseline, *runs]:
        if not (Path(path) / "metrics.jsonl").is_file():
            raise UserError(f"{path}: not a run directory (no metrics.jsonl)")
    base = run_summary(baseline)
    base_rows = read_jsonl(Path(baseline) / "metrics.jsonl")
    target = base.get("final_val_loss")
    notes = []
    if target is None:
        notes.append(f"the baseline {base['run']} has no validation loss: no gaps or time to target")
    out = []
    base_memory = read_measured(Path(baseline))
    for path in [baseline, *runs]:
        s = run_summary(path)
        s["memory"] = _memory_summary(read_measured(Path(path)), base_memory)
        rows = read_jsonl(Path(path) / "metrics.jsonl")
        peaks = [v for r in rows for k, v in r.items() if k.startswith("mem_")]
        s["peak_memory_bytes"] = max(peaks) if peaks else None
        s["events"] = _events(Path(path))
        differences = _validation_differences(base, s) if path != baseline else []
        if differences and base.get("validation") is not None and s.get("validation") is not None:
            if not allow_different_validation:
                raise UserError(f"compare: {s['run']} was validated on something else than the baseline "
                                f"{base['run']}: {'; '.join(differences)}; its losses are not comparable "
                                "(retrain or re-evaluate on the same data, or pass --allow-different-validation "
                                "to see it flagged)")
            s["validation_differs"] = differences
            notes.append(f"{s['run']}: NOT comparable with {base['run']}: {'; '.join(differences)}")
        elif differences:
            notes.append(f"{s['run']}: cannot confirm the same validation set as {base['run']} ({differences[0]})")
        for key in ("last_train_loss", "mean_train_loss_last_n", "final_val_loss", "min_val_loss"):
            if key in s and key in base:
                s[f"{key}_gap"] = s[key] - base[key]
                s[f"{key}_gap_pct"] = 100 * (s[key] - base[key]) / base[key]
        if s.get("tokens_per_s") and base.get("tokens_per_s"):
            s["tokens_per_s_vs_baseline"] = s["tokens_per_s"] / base["tokens_per_s"]
        if target is not None:
            s["time_to_target"] = time_to_target(rows, target)
        if s["tokens"] != base["tokens"]:
            notes.append(f"{s['run']} trained {s['tokens']:,} tokens, the baseline {base['tokens']:,}: final numbers "
                         "are at different points (curves are aligned by tokens)")
        if not (Path(path) / "checkpoints").is_dir() or "optim_bytes_per_param" not in s:
            notes.append(f"{s['run']}: no checkpoint yet (still running, or checkpoints off): no optimizer bytes")
        if s.get("nan_steps"):
            notes.append(f"{s['run']}: non-finite loss at steps {s['nan_steps'][:10]}")
        out.append(s)
        s["_rows"] = rows
    return {"baseline": base["run"], "target_val_loss": target, "runs": out, "notes": notes, "_base_rows": base_rows}


def _memory_summary(record: dict | None, base: dict | None) -> dict | None:
    """The run's measured memory ledger (memory.json), with its linear inputs relative to the baseline's."""
    if record is None:
        return None
    m = record["measured"]
    summary = {"categories": m["categories"], "total": m["total"], "linear_inputs": m["linear_inputs"],
               "block_linear_inputs": m["block_linear_inputs"], "_ledger": m}
    if base is not None and base["measured"]["linear_inputs"]:
        summary["linear_inputs_vs_baseline"] = m["linear_inputs"] / base["measured"]["linear_inputs"]
    return summary


def memory_markdown(result: dict) -> list[str]:
    """The runs' measured ledgers side by side (runs without memory.json are left out, named)."""
    columns = {r["run"]: Ledger.from_dict(r["memory"]["_ledger"]) for r in result["runs"] if r.get("memory")}
    missing = [r["run"] for r in result["runs"] if not r.get("memory")]
    if not columns:
        return []
    lines = ["", "## Memory (measured on each run's first step, one rank; megatron-lowp memory RECIPE predicts it)",
             "", ledger_table(columns).rstrip("\n")]
    ratios = [f"{r['run']} {r['memory']['linear_inputs_vs_baseline']:.2f}x" for r in result["runs"]
              if r.get("memory") and "linear_inputs_vs_baseline" in r["memory"]]
    if ratios:
        lines += ["", f"Linear inputs kept for wgrad, against {result['baseline']}: {', '.join(ratios)}"]
    if missing:
        lines += ["", f"No memory.json (logging.memory off, or an older run): {', '.join(missing)}"]
    return lines


def _fmt(v, spec=".4f") -> str:
    return "-" if v is None else format(v, spec)


def report_markdown(result: dict) -> str:
    lines = [f"# Comparison against {result['baseline']}", "",
             f"Target (the baseline's final validation loss): {_fmt(result['target_val_loss'])}", "",
             "| run | recipe | tokens | last train | train (mean of last 5 logs) | final val | min val | val gap | "
             "val gap % | tokens/s | vs base | time to target (tokens / s) | peak mem (MiB) | optim B/param | events | "
             "grad-noise ratio (last) | QAF from |",
             "|" + "---|" * 17]
    for r in result["runs"]:
        ttt = r.get("time_to_target")
        ttt_text = "not reached" if ttt is None else f"{ttt['tokens']:,} / {_fmt(ttt['seconds'], '.0f')}"
        mem = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**20
        events = ", ".join(f"{k} {v}" for k, v in r["events"].items()) or "-"
        lines.append(
            f"| {r['run']}{' (NOT comparable)' if r.get('validation_differs') else ''} | {r['recipe']} | {r['tokens']:,} | "
            f"{_fmt(r.get('last_train_loss'))} | {_fmt(r.get('mean_train_loss_last_n'))} | "
            f"{_fmt(r.get('final_val_loss'))} | {_fmt(r.get('min_val_loss'))} | {_fmt(r.get('final_val_loss_gap'), '+.4f')} | "
            f"{_fmt(r.get('final_val_loss_gap_pct'), '+.2f')} | {_fmt(r.get('tokens_per_s'), ',.0f')} | "
            f"{_fmt(r.get('tokens_per_s_vs_baseline'), '.2f')}x | {ttt_text} | {_fmt(mem, ',.0f')} | "
            f"{_fmt(r.get('optim_bytes_per_param'), '.2f')} | {events} | {_fmt(r.get('grad_noise_ratio_last'), '.2f')} | "
            f"{r.get('qaf_start_step', '-')} |")
    if result["notes"]:
        lines += ["", "Notes:", *[f"- {n}" for n in result["notes"]]]
    lines += memory_markdown(result)
    return "\n".join(lines) + "\n"


def plot_comparison(result: dict, out: Path) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, (ax, gap_ax) = plt.subplots(2, 1, figsize=(8, 7), dpi=120, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    base_val = {r["tokens"]: r["val_loss"] for r in result["_base_rows"] if "val_loss" in r}
    for i, r in enumerate(result["runs"]):
        rows, color = r["_rows"], f"C{i}"
        train = [(x["tokens"], x["loss"]) for x in rows if isinstance(x.get("loss"), (int, float)) and x["loss"] == x["loss"]]
        if train:
            tokens, losses = zip(*train, strict=True)
            window = max(1, len(losses) // 20)
            ax.plot(tokens, ema(list(losses), 1 - 1 / window), color=color, linewidth=1.4, label=f"{r['run']} train")
        valid = [(x["tokens"], x["val_loss"]) for x in rows if isinstance(x.get("val_loss"), (int, float))]
        if valid:
            tokens, losses = zip(*valid, strict=True)
            ax.plot(tokens, losses, color=color, linestyle="--", marker="o", markersize=3, label=f"{r['run']} val")
            gaps = [(t, v - base_val[t]) for t, v in valid if t in base_val]
            if gaps:
                gt, gv = zip(*gaps, strict=True)
                gap_ax.plot(gt, gv, color=color, marker="o", markersize=3, label=r["run"])
    gap_ax.axhline(0.0, color="black", linewidth=0.8)
    gap_ax.set_ylabel(f"val loss - {result['baseline']}")
    gap_ax.set_xlabel("tokens")
    gap_ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"against {result['baseline']}")
    for a in (ax, gap_ax):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out


def write_comparison(runs: list[Path], baseline: Path, out_dir: Path, allow_different_validation: bool = False) -> dict:
    result = compare_runs(runs, baseline, allow_different_validation)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_comparison(result, out_dir / "loss.png")
    (out_dir / "report.md").write_text(report_markdown(result), encoding="utf-8")
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    public["runs"] = [{k: v for k, v in r.items() if not k.startswith("_")} for r in result["runs"]]
    for r in public["runs"]:
        if r.get("memory"):
            r["memory"] = {k: v for k, v in r["memory"].items() if not k.startswith("_")}
    (out_dir / "summary.json").write_text(json.dumps(public, indent=1), encoding="utf-8")
    return public
