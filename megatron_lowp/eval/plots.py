"""Loss curves as pictures: train loss (raw and smoothed) and validation loss against tokens seen.

`plot_loss({"name": rows, ...}, out)` draws any number of runs on one figure, so the same function
serves a single run's `loss.png` and comparisons between runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

# The CLI logs at INFO; matplotlib's own INFO lines (building its font cache on a first import) are
# not our users' business. Set before the import, which is when it logs.
logging.getLogger("matplotlib").setLevel(logging.WARNING)
import matplotlib  # noqa: E402

matplotlib.use("Agg")  # files only: no display needed, no GUI toolkit imported
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402


def ema(values: list[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to zero."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_figure(runs: dict[str, list[dict]], title: str = "") -> plt.Figure:
    """Train loss (raw + EMA) and validation loss of each run against tokens, one colour per run."""
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for index, (name, rows) in enumerate(runs.items()):
        color = f"C{index}"
        # non-finite values are logged as null (run/logs.py): leave them out of the curve
        train = [(r["tokens"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and r["loss"] == r["loss"]]
        valid = [(r["tokens"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
        if train:
            tokens, losses = zip(*train, strict=True)
            # Smooth over ~5% of the points: enough to read a noisy curve, too little to lag it.
            window = max(1, len(losses) // 20)
            if window > 1:
                ax.plot(tokens, losses, color=color, alpha=0.25, linewidth=0.8)
            label = f"{name} train" + (f" (EMA over {window} points)" if window > 1 else "")
            ax.plot(tokens, ema(list(losses), 1 - 1 / window), color=color, linewidth=1.6, label=label)
        if valid:
            tokens, losses = zip(*valid, strict=True)
            ax.plot(tokens, losses, color=color, linestyle="--", marker="o", markersize=3, label=f"{name} validation")
    ax.xaxis.set_major_formatter(EngFormatter())  # 400k, 2.5M rather than 400000
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss(runs: dict[str, list[dict]], out: Path, title: str = "") -> Path:
    """`loss_figure` written to `out` (PNG) atomically."""
    fig = loss_figure(runs, title)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)  # a reader never sees a half-written picture
    return out
