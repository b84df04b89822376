"""Precision: recipes (GEMM role -> format) and the linear factory the model builds layers with."""

from megatron_lowp.precision import bf16 as _bf16  # noqa: F401  (registers the recipe)
from megatron_lowp.precision import quantized as _quantized  # noqa: F401  (registers "custom")
from megatron_lowp.precision import recipes as _recipes
from megatron_lowp.precision.quantized import QuantizedRecipe, role_spec
from megatron_lowp.precision.quantized_linear import (
    QuantizedLinear,
    QuantizedLinearFunction,
    commit_amax_histories,
    discard_amax_observations,
    high_precision_backward,
    set_high_precision_backward,
    set_sr_rank,
)
from megatron_lowp.precision.recipe import (
    LinearFactory,
    PrecisionRecipe,
    available_recipes,
    build_recipe,
    recipes_with_packages,
    register_recipe,
)
from megatron_lowp.precision.spec import ROLE_AXIS, ROLES, GemmSpecs, QuantSpec

__all__ = [
    "ROLES", "ROLE_AXIS", "GemmSpecs", "LinearFactory", "PrecisionRecipe", "QuantSpec", "QuantizedLinear",
    "QuantizedLinearFunction", "QuantizedRecipe", "available_recipes", "build_recipe", "commit_amax_histories", "discard_amax_observations",
    "high_precision_backward", "recipes_with_packages", "register_recipe", "role_spec", "set_high_precision_backward", "set_sr_rank",
]

_recipes.load_all()  # recipes in files of their own, and plugins' (precision/recipes/)
