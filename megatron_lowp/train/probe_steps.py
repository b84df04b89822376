"""The training half of `megatron-lowp probe RECIPE.yaml --steps N`: the recipe's first N steps
(its own LR schedule, stopped with train.stop_at_step) in OUT/run, so the probe sees operands of a
model that has started to learn. Here, not in eval/probe_run.py, because eval does not import train;
the cli hands this function to eval.probe_run.run_probe."""

from __future__ import annotations

import shlex
from pathlib import Path

from megatron_lowp.config import load_config
from megatron_lowp.errors import UserError
from megatron_lowp.eval.probe_run import Probed
from megatron_lowp.precision import available_recipes
from megatron_lowp.train.loop import Trainer


def train_for_probe(path: Path, overrides: list[str], steps: int, out: Path) -> Probed:
    forced = ["train.eval_every=0", f"run.out_dir={out}", "run.name=run"]
    if steps:
        forced.append(f"train.stop_at_step={steps}")
    cfg = load_config(path, [*overrides, *forced], extra_choices={"precision.recipe": available_recipes()})
    if steps > cfg.train.steps:
        raise UserError(f"--steps {steps}: more than the recipe's train.steps ({cfg.train.steps})")
    trainer = Trainer(cfg)
    if steps:
        trainer.fit()  # shows its progress; a probe run there already is resumed (and stops at once)
    command = shlex.join(["megatron-lowp", "train", str(path), *overrides]) + " --plan PLAN"
    return Probed(cfg, trainer.model, trainer.recipe, trainer.device, trainer.consumed_samples,
                  f"{path} after {trainer.step} training steps", command)


__all__ = ["train_for_probe"]
