"""Recipes that live in a file of their own: every module in this folder is imported when
megatron_lowp.precision is, so adding a recipe is one file here (it calls `register_recipe`) plus
its package of defaults in configs/precision/<name>.yaml. Recipes of other installed packages
register through the entry-point group `megatron_lowp.recipes` (each entry a module to import).
See docs/recipes.md, "A recipe of your own"."""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import pkgutil

log = logging.getLogger(__name__)


def load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    for entry in importlib.metadata.entry_points(group="megatron_lowp.recipes"):
        try:
            entry.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the built-in recipes with it
            log.warning("recipe plugin %s (%s) failed to load: %s", entry.name, entry.value, e)
