"""A precision plan: which quantized linears to keep in BF16 within a FLOPs budget, as a recipe overlay.

The budget is a fraction of the training GEMM FLOPs of the linears the recipe quantizes (per linear
6 x in x out per token: fprop, dgrad, wgrad; the token count cancels). The probe's plan takes the
linears in the order of their measured damage (precision/probe.py), the most damaging first,
skipping any that would overshoot the budget and any whose damage is not positive. Down projections
of MLPs that the alignment watch flags (precision/alignment.py) come before the ranking: keeping
w3 in BF16 is the FP8 paper's own remedy for that mechanism ("SwiGLU output BF16",
docs/papers.md §1.1, §1.3), and on one batch the hazard's damage spreads over gate, up and down
alike (the gate's and up's relative errors multiply the outlier channel too), so the ranking alone
would not single the down projection out. The naive plan
of the same budget takes linears from the end of the model backwards (the usual "last layers in
BF16"), for comparison.

A plan is whole linears: the schema keeps a role's format the same for every quantized linear, so
a per-layer, per-role override cannot be expressed; `precision.high_precision` globs (fnmatch on the
linear's name, e.g. "layers.3.mlp.down", as precision/quantized.py matches them) can.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import yaml

from megatron_lowp.precision.probe import LinearReading


@dataclass
class Plan:
    kind: str  # "probe" or "naive"
    chosen: list[str]  # linear names moved to BF16, in the order chosen
    flops_fraction: float  # their share of the quantized GEMM FLOPs
    budget: float
    flagged: list[str] = field(default_factory=list)  # the down projections taken first (alignment watch)

    def high_precision(self, recipe_high_precision: list[str]) -> list[str]:
        """The recipe's own globs followed by the chosen linears (the overlay replaces the list)."""
        return list(recipe_high_precision) + [n for n in self.chosen if n not in recipe_high_precision]


def _total(linears: list[LinearReading]) -> int:
    return sum(r.flops_per_token for r in linears)


def _fill(ordered: list[LinearReading], total: int, budget: float) -> tuple[list[str], float]:
    chosen, used = [], 0
    for r in ordered:
        if (used + r.flops_per_token) <= budget * total:
            chosen.append(r.name)
            used += r.flops_per_token
    return chosen, used / total if total else 0.0


def probe_plan(linears: list[LinearReading], budget: float, rank_by: str = "damage",
               flagged: list[str] = ()) -> Plan:
    """`flagged`: linear names to take before the ranking (the down projections of flagged MLPs)."""
    first = [r for name in flagged for r in linears if r.name == name]
    ranked = sorted((r for r in linears if r.score(rank_by) > 0 and r.name not in flagged),
                    key=lambda r: r.score(rank_by), reverse=True)
    chosen, fraction = _fill(first + ranked, _total(linears), budget)
    return Plan("probe", chosen, fraction, budget, [n for n in flagged if n in chosen])


def naive_plan(linears: list[LinearReading], budget: float) -> Plan:
    """`linears` in model order; the last ones first."""
    chosen, fraction = _fill(list(reversed(linears)), _total(linears), budget)
    return Plan("naive", chosen, fraction, budget)


def plan_yaml(plan: Plan, recipe_high_precision: list[str], header: list[str]) -> str:
    """The overlay file: `megatron-lowp train RECIPE.yaml --plan plan.yaml` (or `extends:` it)."""
    comments = "".join(f"# {line}\n" for line in header)
    body = yaml.safe_dump({"precision": {"high_precision": plan.high_precision(recipe_high_precision)}},
                          sort_keys=False)
    return comments + body


__all__ = ["Plan", "naive_plan", "plan_yaml", "probe_plan"]
