"""The table and plot of docs/results.md "Does the probe's plan close the fp4 gap?": validation loss
of bf16, fp4, fp4 + the probe's plan and fp4 + the naive plan, per seed directory written by
scripts/probe_plan_experiment.sh (and its repeats), and the share of the fp4-bf16 gap each plan closes.

    python scripts/probe_plan_results.py OUT_SEED1 [OUT_SEED2 ...] --plot docs/img/probe_plan_gap.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

RUNS = ("bf16", "fp4", "fp4-probe-plan", "fp4-naive-plan")


def val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None}


def seed(d: Path) -> int:
    return yaml.safe_load((d / "bf16" / "config.yaml").read_text())["run"]["seed"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args()
    table = {d: {n: val_losses(d / n) for n in RUNS} for d in args.dirs}
    print("| seed | step | " + " | ".join(RUNS) + " | gap fp4-bf16 | closed by probe plan | by naive plan |")
    print("|---" * (len(RUNS) + 5) + "|")
    for d, runs in table.items():
        for step in sorted(runs["bf16"]):
            v = {n: runs[n][step] for n in RUNS}
            gap = v["fp4"] - v["bf16"]
            closed = [(v["fp4"] - v[n]) / gap if gap else float("nan") for n in ("fp4-probe-plan", "fp4-naive-plan")]
            print(f"| {seed(d)} | {step} | " + " | ".join(f"{v[n]:.4f}" for n in RUNS)
                  + f" | {gap:+.4f} | {100 * closed[0]:+.0f}% | {100 * closed[1]:+.0f}% |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(table), figsize=(4.5 * len(table), 3.6), dpi=110, squeeze=False)
        for ax, (d, runs) in zip(axes[0], table.items(), strict=True):
            last = max(runs["bf16"])
            gaps = [runs[n][last] - runs["bf16"][last] for n in RUNS[1:]]
            ax.bar(range(len(gaps)), gaps, color=["tab:red", "tab:green", "tab:gray"])
            ax.set_xticks(range(len(gaps)), ["fp4", "fp4 +\nprobe plan", "fp4 +\nnaive plan"], fontsize=8)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylabel(f"val loss - bf16 at step {last}", fontsize=8)
            ax.set_title(f"seed {seed(d)}", fontsize=9)
            for i, g in enumerate(gaps):
                ax.text(i, g, f"{g:+.4f}", ha="center", va="bottom", fontsize=8)
        fig.suptitle("fp4 validation gap to bf16, with 10% of the GEMM FLOPs in BF16", fontsize=9)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
