"""The probe's outputs: summary.json (every number), report.md (the ranked table, the worst roles,
the SwiGLU alignment, the plans) and heatmap.png (linears x roles: operand errors, GEMM output
errors against BF16, and the damage share a linear is responsible for)."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

from megatron_lowp.precision.plan import Plan
from megatron_lowp.precision.probe import GEMMS, ROLES, LinearReading, ProbeResult

logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no font-cache chatter (as eval/plots.py)


def _finite(x):
    return x if not isinstance(x, float) or math.isfinite(x) else None


def _clean(tree):
    if isinstance(tree, dict):
        return {k: _clean(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_clean(v) for v in tree]
    return _finite(tree)


def summary(result: ProbeResult, plans: dict[str, Plan], info: dict) -> dict:
    ranked = [r.name for r in result.ranked(info.get("rank_by", "damage"))]
    linears = [{**asdict(r), "damage": r.damage, "flops_per_token": r.flops_per_token, "rank": ranked.index(r.name) + 1}
               for r in result.linears]
    return _clean({
        **info, "tokens": result.tokens, "loss": result.loss, "loss_bf16": result.loss_bf16,
        "forward_kl": result.forward_kl, "gradient_error": result.gradient_error,
        "grad_noise_ratio": result.grad_noise_ratio, "ranking": ranked, "linears": linears,
        "alignment": [asdict(a) for a in result.alignment],
        "plans": {k: asdict(p) for k, p in plans.items()},
    })


def _num(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1e4 else f"{x:.3g}"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _worst_role(r: LinearReading) -> tuple[str, object]:
    role = max(r.roles, key=lambda k: r.roles[k].rel_error)
    return role, r.roles[role]


def report_markdown(result: ProbeResult, plans: dict[str, Plan], info: dict, top: int = 40) -> str:
    rank_by = info.get("rank_by", "damage")
    ranked = result.ranked(rank_by)
    lines = [
        f"# Probe: {info['source']}",
        "",
        f"Recipe `{info['recipe']}`, one batch of {result.tokens:,} tokens. With every linear quantized the batch's "
        f"loss is {result.loss:.4f} against {result.loss_bf16:.4f} with every linear in BF16; the output's mean "
        f"per-token KL divergence from the BF16 model is {result.forward_kl:.3g} and the gradient's relative "
        f"error against the BF16 gradient {result.gradient_error:.3g}"
        + (f"; gradient-noise ratio {result.grad_noise_ratio:.3g} (the sqrt(3) rule warns below 1.73)."
           if result.grad_noise_ratio is not None else "."),
        "",
        f"## Linears ranked by {rank_by}",
        "",
        "damage = the mean of the two shares: this linear's part of the output's KL divergence from the BF16 model "
        "and of the gradient's squared error, each measured with only this linear quantized, over the sum of all "
        "linears' (what keeping it in BF16 buys, if the errors add up). GEMM columns: mean per-row relative error "
        "of the GEMM's output against the BF16 GEMM. Worst role: the operand with the largest quantization error, "
        "with its clipped / overflow / underflow shares. docs/probe.md explains each column.",
        "",
        "| rank | linear | FLOPs | damage | fwd share | grad share | fprop | dgrad | wgrad | worst role (error; clip/over/under) "
        "| x max/RMS | x kurt | dy kurt | grad noise |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    total = sum(r.flops_per_token for r in result.linears)
    for i, r in enumerate(ranked[:top], 1):
        role, rr = _worst_role(r)
        x, dy = r.operands.get("x"), r.operands.get("dy")
        lines.append(
            f"| {i} | `{r.name}` | {100 * r.flops_per_token / total:.1f}% | {_pct(r.damage)} | {_pct(r.forward_share)} "
            f"| {_pct(r.gradient_share)} | {_num(r.gemm_error.get('fprop'))} | {_num(r.gemm_error.get('dgrad'))} "
            f"| {_num(r.gemm_error.get('wgrad'))} | {role} {rr.fmt} {_num(rr.rel_error)}; "
            f"{_num(rr.clipped, 2)}/{_num(rr.overflow, 2)}/{_num(rr.underflow, 2)} "
            f"| {_num(x.max_over_rms if x else None)} | {_num(x.kurtosis if x else None)} "
            f"| {_num(dy.kurtosis if dy else None)} | {_num(r.grad_noise_ratio)} |")
    if len(ranked) > top:
        lines.append(f"\n({len(ranked) - top} more in summary.json)")
    lines += ["", "## Operands by role (the top 5)", "",
              "| linear | role | format | rel. error | clipped | overflow | underflow |", "|---|---|---|---|---|---|---|"]
    for r in ranked[:5]:
        for role in ROLES:
            if role in r.roles:
                q = r.roles[role]
                lines.append(f"| `{r.name}` | {role} | {q.fmt} | {_num(q.rel_error)} | {_num(q.clipped, 2)} "
                             f"| {_num(q.overflow, 2)} | {_num(q.underflow, 2)} |")
    if result.alignment:
        lines += ["", "## SwiGLU alignment (the FP8 paper's mechanism, docs/papers.md §1.3)", "",
                  "max cos: the largest |cos(w_gate[i], w_up[i])| over FFN channels. The largest down-projection input, "
                  "its channel and that channel's cos; outlier ratio: its max over the median channel's.", "",
                  "| MLP | max cos (channel) | largest down input (channel) | its cos | outlier ratio | warns |",
                  "|---|---|---|---|---|---|"]
        for a in result.alignment:
            warn = f"channel {a.hazard_channel}" if a.hazard_channel is not None else "no"
            lines.append(f"| `{a.layer}` | {a.max_cos:.3f} ({a.max_cos_channel}) | {_num(a.down_input_max)} "
                         f"({a.down_input_channel}) | {_num(a.down_input_cos)} | {_num(a.outlier_ratio)} | {warn} |")
    lines += ["", f"## Plans (budget {100 * info['budget']:g}% of the quantized GEMM FLOPs)", ""]
    for kind, p in plans.items():
        file = "plan.yaml" if kind == "probe" else "naive_plan.yaml"
        chosen = ", ".join(f"`{n}`" for n in p.chosen) or "nothing"
        first = f" (flagged by the alignment watch, taken first: {', '.join(f'`{n}`' for n in p.flagged)})" \
            if p.flagged else ""
        lines.append(f"- **{kind}** (`{file}`, {100 * p.flops_fraction:.1f}% of the FLOPs): {chosen}{first}")
    lines += ["", f"Train with the plan: `{info['train_command']}`", ""]
    return "\n".join(lines)


def draw_heatmap(result: ProbeResult, out: Path, title: str = "") -> Path:
    """Linears (rows, model order) x roles: operand errors | GEMM errors | damage share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    names = [r.name for r in result.linears]
    operand = [[r.roles[k].rel_error if k in r.roles else float("nan") for k in ROLES] for r in result.linears]
    gemm = [[r.gemm_error.get(k, float("nan")) for k in GEMMS] for r in result.linears]
    damage = [[r.damage] for r in result.linears]
    height = max(3.0, 0.28 * len(names) + 1.5)
    fig, axes = plt.subplots(1, 3, figsize=(11, height), dpi=110, gridspec_kw={"width_ratios": [6, 3, 1.3]})
    positive = [v for row in operand + gemm for v in row if v == v and v > 0]
    norm = LogNorm(vmin=max(min(positive, default=1e-4), 1e-4), vmax=max(max(positive, default=1.0), 1e-3))
    panels = [(axes[0], operand, list(ROLES), "operand rel. error", norm, "viridis"),
              (axes[1], gemm, list(GEMMS), "GEMM output error vs BF16", norm, "viridis"),
              (axes[2], damage, ["damage"], "damage share", None, "magma")]
    for ax, values, columns, label, n, cmap in panels:
        image = ax.imshow(values, aspect="auto", norm=n, cmap=cmap)
        ax.set_xticks(range(len(columns)), columns, fontsize=8)
        ax.set_yticks(range(len(names)), names if ax is axes[0] else [""] * len(names), fontsize=7)
        ax.set_title(label, fontsize=9)
        if len(names) <= 40:
            for i, row in enumerate(values):
                for j, v in enumerate(row):
                    if v == v:  # dark text on the bright end of the damage column
                        dark = ax is axes[2] and v > 0.6 * max(max(r) for r in values)
                        ax.text(j, i, f"{100 * v:.0f}%" if ax is axes[2] else f"{v:.2g}", ha="center", va="center",
                                fontsize=6, color="black" if dark else "white")
        fig.colorbar(image, ax=ax, fraction=0.08, pad=0.02)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


__all__ = ["draw_heatmap", "report_markdown", "summary"]
