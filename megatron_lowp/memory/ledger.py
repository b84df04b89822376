"""The memory ledger: bytes per category for one rank, predicted (memory/predict.py) or measured
(memory/measure.py), as a table and as JSON.

Categories:
  parameters         the model's parameters as stored (FP32: they are also the master weights)
  master_weights     a separate master copy, where one exists (none here: see the note)
  gradients          .grad of every trainable parameter after backward
  optimizer_state    Adam moments (FP8 moments: 1 byte per value + an FP32 scale per tensor), step counters
  activations        what one micro-batch's forward keeps for backward: linear inputs (x_t, in their
                     stored format), checkpointed regions' inputs and every other op's saved tensors
  weight_copies      the weight each linear keeps for dgrad (w_t: an FP8/FP4 copy, or autocast's BF16 cast)
  largest_transient  the largest short-lived working set on top of the above (an estimate; measured
                     only where the device's allocator reports a peak)
Activation rows: per layer (or "layers.N" for a block's non-linear ops, "loss", "embed"...) and role.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from megatron_lowp.memory.saved import SavedRow

CATEGORIES = ("parameters", "master_weights", "gradients", "optimizer_state", "activations", "weight_copies",
              "largest_transient")
_BLOCK = re.compile(r"^layers\.\d+(?=\.|$)")


@dataclass
class Ledger:
    categories: dict[str, int | None]
    rows: list[SavedRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def from_saved(cls, rows: list[SavedRow], **categories) -> Ledger:
        """A ledger whose activations and weight copies are the sums of `rows`."""
        weights = sum(r.bytes for r in rows if r.role == "w_t")
        activations = sum(r.bytes for r in rows if r.role != "w_t")
        return cls({**categories, "activations": activations, "weight_copies": weights}, rows)

    @property
    def total(self) -> int:
        return sum(v for v in self.categories.values() if v)

    def linear_inputs(self, blocks_only: bool = False) -> int:
        """Bytes of the inputs linears keep for wgrad (x_t), of every linear or only the blocks' ones."""
        return sum(r.bytes for r in self.rows if r.role == "x_t" and (not blocks_only or _BLOCK.match(r.where)))

    def as_dict(self) -> dict:
        return {"categories": dict(self.categories), "total": self.total,
                "linear_inputs": self.linear_inputs(), "block_linear_inputs": self.linear_inputs(blocks_only=True),
                "rows": [r.as_dict() for r in self.rows], "notes": list(self.notes)}

    @classmethod
    def from_dict(cls, d: dict) -> Ledger:
        rows = [SavedRow(r["where"], r["role"], r["format"], r["bytes"]) for r in d.get("rows", [])]
        return cls(dict(d["categories"]), rows, list(d.get("notes", [])))


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.2f}"


def grouped_rows(rows: list[SavedRow]) -> list[tuple[str, str, str, int, int]]:
    """(where with block indices as N, role, format, blocks, bytes) summed over the blocks."""
    groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for r in rows:
        groups[(_BLOCK.sub("layers.N", r.where), r.role, r.fmt)].append(r.bytes)
    return sorted(((w, role, fmt, len(b), sum(b)) for (w, role, fmt), b in groups.items()), key=lambda g: -g[4])


def ledger_table(columns: dict[str, Ledger]) -> str:
    """Markdown: categories (MiB) for each named ledger side by side, then the activation rows."""
    names = list(columns)
    lines = ["| category | " + " | ".join(f"{n} (MiB)" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for c in CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(mib(columns[n].categories.get(c)) for n in names) + " |")
    lines.append("| **total** | " + " | ".join(f"**{mib(columns[n].total)}**" for n in names) + " |")
    lines.append("| linear inputs (x_t, all linears) | " + " | ".join(mib(columns[n].linear_inputs()) for n in names) + " |")
    lines.append("| linear inputs (x_t, block linears) | "
                 + " | ".join(mib(columns[n].linear_inputs(blocks_only=True)) for n in names) + " |")
    first = columns[names[0]]
    lines += ["", f"Saved for backward, one micro-batch ({names[0]}; N = every block, summed):", "",
              "| where | role | stored as | blocks | MiB |", "|---|---|---|---|---|"]
    for where, role, fmt, blocks, nbytes in grouped_rows(first.rows):
        lines.append(f"| {where} | {role} | {fmt} | {blocks} | {mib(nbytes)} |")
    holders: dict[str, list[str]] = {}  # each note once, naming its ledgers unless every one has it
    for name, ledger in columns.items():
        for n in ledger.notes:
            holders.setdefault(n, []).append(name)
    if holders:
        lines += ["", *[f"- {n}" if len(who) == len(names) else f"- {', '.join(who)}: {n}"
                        for n, who in holders.items()]]
    return "\n".join(lines) + "\n"
