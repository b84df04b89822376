"""Compare training runs against a baseline run: a markdown table, a JSON file and a loss plot.

    python scripts/compare_recipes.py runs/tiny-fp8 runs/tiny-fp4 --baseline runs/tiny-bf16 --out docs/results

Per run: final train loss (mean of the last 5 logged), final validation loss, the gap of each to the
baseline (absolute and %), median tokens/s and the baseline's step time over this run's (runs
measured one after another on the same machine; for side-by-side timings use a benchmark), the
optimizer state's bytes per parameter (from the newest checkpoint) and the QAF switch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_lowp.eval.plots import plot_loss
from megatron_lowp.eval.summary import run_summary
from megatron_lowp.run.logs import read_jsonl


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def compare(runs: list[Path], baseline: Path) -> list[dict]:
    base = run_summary(baseline)
    out = []
    for run in [baseline, *runs]:
        s = run_summary(run)
        for key in ("final_train_loss", "final_val_loss"):
            if key in s and key in base:
                s[f"{key}_gap"] = s[key] - base[key]
                s[f"{key}_gap_pct"] = 100 * (s[key] - base[key]) / base[key]
        if "tokens_per_s" in s and "tokens_per_s" in base:
            s["step_time_ratio"] = base["tokens_per_s"] / s["tokens_per_s"]
        s["baseline"] = base["run"]
        out.append(s)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| run | recipe | tokens | train loss | val loss | val gap | val gap % | step time vs base | "
             "optim bytes/param | QAF from step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['recipe']} | {r['tokens']:,} | {_fmt(r.get('final_train_loss'))} | "
            f"{_fmt(r.get('final_val_loss'))} | {_fmt(r.get('final_val_loss_gap'), '+.4f')} | "
            f"{_fmt(r.get('final_val_loss_gap_pct'), '+.2f')} | {_fmt(r.get('step_time_ratio'), '.2f')}x | "
            f"{_fmt(r.get('optim_bytes_per_param'), '.2f')} | {r.get('qaf_start_step', '-')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--baseline", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output prefix: PREFIX.json, PREFIX.png")
    args = parser.parse_args()
    rows = compare(args.runs, args.baseline)
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1))
    curves = {r["run"]: read_jsonl(p / "metrics.jsonl") for r, p in zip(rows, [args.baseline, *args.runs], strict=True)}
    plot_loss(curves, Path(f"{args.out}.png"), title=f"against {rows[0]['run']}")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
