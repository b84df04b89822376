"""The memory ledger: bytes per category, predicted before a run (predict.py) and measured during one
(measure.py, saved.py), in the stored formats of the recipe (stored.py); docs/memory.md."""
