"""`megatron-lowp probe RECIPE_OR_RUN [overrides] [--steps N] [--bf16-budget F] --out DIR`: measure
where a recipe's low precision hurts and write the plan that keeps the worst linears in BF16.

A recipe file is trained for `--steps` steps first (a run directory DIR/run, with its checkpoint:
probing again resumes it instead of training twice; its LR schedule is the recipe's, stopped early
with train.stop_at_step), so the operands are those of a model that has started to learn. A run or
checkpoint directory is probed as it was trained (`precision.recipe=NAME` probes its weights in
another recipe). Then one batch of the recipe's training data (the next one: --batch sequences)
goes through precision/probe.py, and DIR gets report.md, summary.json, heatmap.png, plan.yaml (the
probe's plan) and naive_plan.yaml (the same budget spent on the last linears, for comparison).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lowp.config.loader import parse_override
from megatron_lowp.data import Tokenizer, build_train_stream
from megatron_lowp.errors import UserError
from megatron_lowp.precision import QuantizedLinear
from megatron_lowp.precision.plan import naive_plan, plan_yaml, probe_plan
from megatron_lowp.precision.probe import RANK_BY, ProbeResult, probe_model
from megatron_lowp.run.atomic import write_text_atomic


@dataclass
class Probed:
    """What was probed: the model with its recipe, and the words that say where it came from."""

    cfg: object
    model: torch.nn.Module
    recipe: object
    device: object
    position: int  # samples of the training stream consumed before the probe's batch
    source: str  # e.g. "recipes/tiny/fp4.yaml after 20 steps" or "checkpoint runs/x/checkpoints/step_300"
    train_command: str  # how to train this recipe with the plan


def _from_checkpoint(path: Path, overrides: list[str]) -> Probed:
    from megatron_lowp.eval.evaluate import load_model

    precision = None
    for text in overrides:
        key, value = parse_override(text)
        if key != "precision.recipe":
            raise UserError(f"override '{text}': a checkpoint is probed with the recipe it was trained with; only "
                            "precision.recipe=NAME can be given (to probe its weights in another recipe)")
        precision = value
    loaded = load_model(path, precision=precision)
    cfg = loaded.cfg
    return Probed(cfg, loaded.model, loaded.recipe, loaded.device, loaded.step * cfg.train.global_batch_size,
                  f"checkpoint {loaded.checkpoint} (step {loaded.step})",
                  "megatron-lowp train YOUR_RECIPE.yaml --plan PLAN")


def _say(line: str) -> None:
    print(f"probe: {line}", file=sys.stderr, flush=True)


TrainForProbe = Callable[[Path, list[str], int, Path], Probed]


def run_probe(source: str, overrides: list[str], out: Path, train_for_probe: TrainForProbe, steps: int = 10,
              budget: float = 0.1, batch_size: int | None = None, rank_by: str = "damage", seed: int = 0) -> dict:
    """Probe, write DIR's files, return the summary (summary.json's content). `train_for_probe(recipe,
    overrides, steps, out)` trains a recipe file's first steps (megatron_lowp/train/probe_steps.py;
    the cli passes it in, since eval does not import train)."""
    from megatron_lowp.eval.probe_report import draw_heatmap, report_markdown, summary

    if not 0 <= budget <= 1:
        raise UserError(f"--bf16-budget: {budget} is not a fraction of the GEMM FLOPs in [0, 1] (e.g. 0.1)")
    if steps < 0:
        raise UserError(f"--steps: {steps} must be >= 0")
    if rank_by not in RANK_BY:
        raise UserError(f"--rank-by: '{rank_by}' is not one of {', '.join(RANK_BY)}")
    path = Path(source)
    if not path.exists():
        raise UserError(f"{source}: no such recipe file, run directory or checkpoint")
    out.mkdir(parents=True, exist_ok=True)
    probed = _from_checkpoint(path, overrides) if path.is_dir() else train_for_probe(path, overrides, steps, out)
    cfg, model, recipe, device = probed.cfg, probed.model, probed.recipe, probed.device
    if not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise UserError(f"precision.recipe: '{recipe.name}' quantizes no linear layer of this model: nothing to probe "
                        "(probe a low-precision recipe, e.g. precision.recipe=fp4)")
    vocab = Tokenizer.load(cfg.data.tokenizer).vocab_size
    stream = build_train_stream(cfg.data, cfg.train.seq_len, seed=cfg.run.seed, vocab_size=vocab)
    n = batch_size or cfg.train.micro_batch_size
    batch = stream.global_batch(probed.position, n).to(device.torch_device)

    def forward(tokens: torch.Tensor) -> torch.Tensor:
        with recipe.forward_context(device):
            return model(tokens)

    watch = cfg.precision.alignment_watch
    _say(f"{probed.source}: {n} sequences x {cfg.train.seq_len} tokens, recipe {recipe.name}")
    result: ProbeResult = probe_model(model, batch, forward, reference_dtype=recipe.autocast_dtype or torch.float32,
                                      min_cos=watch.min_cos, min_outlier_ratio=watch.min_outlier_ratio, seed=seed,
                                      progress=_say)
    flagged = [f"{a.layer}.down" for a in result.alignment if a.hazard_channel is not None]
    plans = {"probe": probe_plan(result.linears, budget, rank_by, flagged), "naive": naive_plan(result.linears, budget)}
    recipe_hp = list(cfg.precision.high_precision)
    for kind, file in (("probe", "plan.yaml"), ("naive", "naive_plan.yaml")):
        p = plans[kind]
        how = f"by measured {rank_by}" if kind == "probe" else "from the end of the model"
        if p.flagged:
            how = f"the down projections the alignment watch flags first ({', '.join(p.flagged)}), then {how}"
        header = [f"megatron-lowp probe: {probed.source}, recipe {recipe.name}",
                  f"{kind} plan: {len(p.chosen)} linears kept in BF16, chosen {how}: "
                  f"{100 * p.flops_fraction:.1f}% of the quantized GEMM FLOPs (budget {100 * budget:g}%)",
                  f"use: {probed.train_command.replace('PLAN', str(out / file))}"]
        write_text_atomic(out / file, plan_yaml(p, recipe_hp, header))
    info = {"source": probed.source, "recipe": recipe.name, "budget": budget, "rank_by": rank_by,
            "train_command": probed.train_command.replace("PLAN", str(out / "plan.yaml"))}
    data = summary(result, plans, info)
    write_text_atomic(out / "summary.json", json.dumps(data, indent=1))
    write_text_atomic(out / "report.md", report_markdown(result, plans, info))
    draw_heatmap(result, out / "heatmap.png", title=f"{recipe.name}: {probed.source}")
    _say(f"wrote {out}/report.md, summary.json, heatmap.png, plan.yaml, naive_plan.yaml")
    return data


__all__ = ["Probed", "TrainForProbe", "run_probe"]
