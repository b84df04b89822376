"""precision.recipe: fp4_hp_warmup -- "FP4 All the Way", with dgrad and wgrad in high precision during
the LR warmup (forward quantized from step 1): the FP4 gradient noise is largest against the
gradient early on, when the LR is still small. An ablation of the fp4 recipe, and the worked example
of a recipe with its own lifecycle in docs/recipes.md."""

from __future__ import annotations

from dataclasses import dataclass

from megatron_lowp.precision.quantized import QuantizedRecipe, recipe_from_roles
from megatron_lowp.precision.quantized_linear import set_high_precision_backward
from megatron_lowp.precision.recipe import register_recipe


@dataclass
class HighPrecisionWarmup(QuantizedRecipe):
    warmup_steps: int = 0  # the run's optim.warmup_steps
    in_warmup: bool = False

    def on_step_start(self, step: int, tokens: int) -> float | None:
        lr = super().on_step_start(step, tokens)  # fp4's lifecycle: the QAF switch and its LR
        if self.quantized and self.qaf_start_step is None:  # QAF owns the backward once it starts
            self.in_warmup = step <= self.warmup_steps
            set_high_precision_backward(self._model, self.in_warmup)
        return lr

    def log_fields(self) -> dict:
        return {**super().log_fields(), "hp_backward": self.in_warmup}


@register_recipe("fp4_hp_warmup", needs_package=True)
def fp4_hp_warmup(cfg, device) -> HighPrecisionWarmup:
    return recipe_from_roles(cfg, device, cls=HighPrecisionWarmup, warmup_steps=cfg.optim.warmup_steps)
