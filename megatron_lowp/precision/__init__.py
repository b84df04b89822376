"""Precision: recipes (GEMM role -> format) and the linear factory the model builds layers with."""

from megatron_lowp.precision import bf16 as _bf16  # noqa: F401  (registers the recipe)
from megatron_lowp.precision.recipe import (
    LinearFactory,
    PrecisionRecipe,
    available_recipes,
    build_recipe,
    register_recipe,
)

__all__ = ["LinearFactory", "PrecisionRecipe", "available_recipes", "build_recipe", "register_recipe"]
