"""`megatron-lowp memory RECIPE [overrides] [--measured RUN_DIR]`: the ledger's prediction as a table,
beside a run's measurement (RUN_DIR/memory.json) where one is given, with the ratio per category."""

from __future__ import annotations

from pathlib import Path

from megatron_lowp.config import Config
from megatron_lowp.errors import UserError
from megatron_lowp.memory.ledger import CATEGORIES, Ledger, ledger_table
from megatron_lowp.memory.measure import MEMORY_JSON, read_measured
from megatron_lowp.memory.predict import predict_from_config

TOLERANCE = 0.10  # the ledger's promise: each measured category within 10% of the prediction


def _ratio(predicted: int | None, measured: int | None) -> float | None:
    if predicted is None or measured is None or (predicted == 0 and measured == 0):
        return None if predicted is None or measured is None else 1.0
    return predicted / measured if measured else float("inf")


def memory_report(cfg: Config, world_size: int = 1, measured_dir: Path | None = None) -> tuple[str, dict]:
    """(markdown, JSON-able dict) of the prediction for one rank, and of a measurement beside it."""
    if world_size < 1:
        raise UserError(f"memory: --world-size {world_size}: allowed an integer >= 1")
    predicted = predict_from_config(cfg, world_size)
    columns = {"predicted": predicted}
    result: dict = {"recipe": cfg.precision.recipe, "world_size": world_size, "predicted": predicted.as_dict()}
    if measured_dir is not None:
        record = read_measured(Path(measured_dir))
        if record is None:
            raise UserError(f"memory --measured {measured_dir}: no readable {MEMORY_JSON} there (a run directory "
                            "of a run with logging.memory: true that finished its first step)")
        measured = Ledger.from_dict(record["measured"])
        columns["measured"] = measured
        ratios = {c: _ratio(predicted.categories.get(c), measured.categories.get(c)) for c in CATEGORIES}
        ratios["linear_inputs"] = _ratio(predicted.linear_inputs(), measured.linear_inputs())
        result.update(measured=measured.as_dict(), predicted_over_measured=ratios)
    text = (f"Memory ledger of {cfg.run.name} ({cfg.precision.recipe}, engine {cfg.parallel.engine}, one rank of "
            f"{world_size}; one micro-batch of {cfg.train.micro_batch_size} x {cfg.train.seq_len} tokens; "
            f"activation checkpointing {cfg.train.activation_checkpointing})\n\n" + ledger_table(columns))
    if measured_dir is not None:
        off = [f"{c} {r:.3f}" for c, r in result["predicted_over_measured"].items()
               if r is not None and abs(r - 1) > TOLERANCE]
        text += ("\npredicted / measured: every measured category within 10%\n" if not off else
                 f"\npredicted / measured outside 10%: {', '.join(off)}\n")
    return text, result
