"""The fp4 recipe ("FP4 All the Way"): its roles, QAF (switch, schedule, checkpoint, resume, auto
start from the sqrt(3) monitor) and the numerics telemetry in numerics.jsonl."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_lowp.config import load_config
from megatron_lowp.device import get_device
from megatron_lowp.errors import UserError
from megatron_lowp.numerics import quantize
from megatron_lowp.numerics.stats import quantization_stats
from megatron_lowp.optim import lr_at, qaf_lr_at
from megatron_lowp.precision import QuantizedLinear, available_recipes, build_recipe
from megatron_lowp.run.logs import read_jsonl
from megatron_lowp.train import train
from megatron_lowp.train.loop import Trainer
from tests.test_train import losses, small_cfg

FP4 = ["precision.recipe=fp4", "train.checkpoint_every=2", "precision.grad_noise.every=2",
       "precision.qaf.start_step=3", "precision.qaf.warmup_steps=2", "precision.telemetry_every=2"]


def test_fp4_package_is_the_papers_split_rounding(repo):
    cfg = load_config(repo / "recipes/tiny/fp4.yaml", extra_choices={"precision.recipe": available_recipes()})
    recipe = build_recipe(cfg, get_device("cpu"))
    rounding = {role: getattr(recipe.specs, role).rounding for role in ("x", "w", "dy", "w_t", "dy_t", "x_t")}
    assert rounding == {"x": "nearest", "w": "nearest", "dy": "stochastic", "w_t": "nearest",
                        "dy_t": "stochastic", "x_t": "stochastic"}
    assert {getattr(recipe.specs, r).fmt for r in rounding} == {"nvfp4"}
    assert recipe.mlp_activation == "smooth_swiglu" and "lm_head" in recipe.high_precision
    assert cfg.precision.qaf.start_fraction == 0.9 and cfg.precision.grad_noise.every == 25


def test_qaf_schedule_rewarms_then_decays_to_min_lr(repo):
    o = load_config(repo / "recipes/tiny/bf16.yaml").optim
    q = load_config(repo / "recipes/tiny/fp4.yaml", extra_choices={"precision.recipe": available_recipes()}).precision.qaf
    start, total = 271, 300
    lrs = [qaf_lr_at(s, start, q, o, total) for s in range(start, total + 1)]
    assert lrs[:3] == pytest.approx([q.lr / 3, 2 * q.lr / 3, q.lr])  # 3-step linear re-warmup to 3e-4
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:], strict=False))  # then only down
    assert lrs[-1] == pytest.approx(o.min_lr)


@pytest.mark.parametrize("main_decay", ["full", pytest.param("run", marks=pytest.mark.slow)])
def test_the_main_cosine_reaches_min_lr_before_qaf_by_default(repo, tmp_path, main_decay):
    """As in the paper, the main run has decayed when QAF starts (main_decay: full, the default);
    main_decay: run keeps the cosine over all train.steps, which QAF cuts off above min_lr."""
    cfg = small_cfg(repo, tmp_path, "precision.recipe=fp4", "train.steps=12", "optim.warmup_steps=2",
                    "precision.qaf.start_step=9", "precision.qaf.warmup_steps=2", "train.eval_every=0",
                    "train.checkpoint_every=0", f"precision.qaf.main_decay={main_decay}")
    rows = {r["step"]: r["lr"] for r in read_jsonl(train(cfg).run_dir / "metrics.jsonl")}
    o = cfg.optim
    if main_decay == "full":
        assert rows[8] == pytest.approx(o.min_lr)  # the step before QAF
        assert rows[5] == pytest.approx(lr_at(5, o, 8))
    else:
        assert rows[8] == pytest.approx(lr_at(8, o, 12)) and rows[8] > 1.5 * o.min_lr
    assert rows[9] == pytest.approx(qaf_lr_at(9, 9, cfg.precision.qaf, o, 12))  # QAF's own re-warmup either way


def test_qaf_switch_is_logged_checkpointed_and_survives_resume(repo, tmp_path):
    straight = train(small_cfg(repo, tmp_path, "run.name=straight", *FP4))
    first = train(small_cfg(repo, tmp_path, "run.name=resumed", "train.stop_at_step=4", *FP4))
    assert first.step == 4
    resumed_trainer = Trainer(small_cfg(repo, tmp_path, "run.name=resumed", *FP4))
    assert resumed_trainer.recipe.qaf_start_step == 3  # read back from the checkpoint of step 4
    layers = [m for m in resumed_trainer.model.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.specs.dy is None and m.specs.x is not None for m in layers)  # backward in BF16 again
    resumed = resumed_trainer.fit()
    assert losses(resumed.run_dir) == losses(straight.run_dir)  # bit-identical across the switch and the resume

    rows = read_jsonl(straight.run_dir / "numerics.jsonl")
    events = [r for r in rows if r["kind"] == "event"]
    assert events == [{"step": 3, "kind": "event", "event": "qaf_start", "reason": "precision.qaf.start_step = 3"}]
    assert read_jsonl(resumed.run_dir / "numerics.jsonl") == rows  # no duplicated or lost rows either
    noise = [r for r in rows if r["kind"] == "grad_noise" and r["layer"] == "all"]
    assert [r["step"] for r in noise] == [2]  # measured every 2 steps until QAF, not after
    assert all(r["ratio"] > 0 and math.isfinite(r["ratio"]) for r in noise)
    metrics = read_jsonl(straight.run_dir / "metrics.jsonl")
    cfg = small_cfg(repo, tmp_path, *FP4)
    for r in metrics:
        assert r["qaf"] == (r["step"] >= 3)
        if r["step"] >= 3:
            assert r["lr"] == pytest.approx(qaf_lr_at(r["step"], 3, cfg.precision.qaf, cfg.optim, cfg.train.steps))
    quant = [r for r in rows if r["kind"] == "quant"]
    assert {r["step"] for r in quant} == {2, 4, 6, 8}
    assert {r["role"] for r in quant if r["step"] == 2} == {"x", "w", "dy", "w_t", "dy_t", "x_t"}
    assert {r["role"] for r in quant if r["step"] == 6} == {"x", "w"}  # QAF: backward roles in high precision
    assert all(0 <= r["overflow"] <= 1 and 0 <= r["underflow"] <= 1 and r["amax"] > 0 for r in quant)


def test_qaf_starts_automatically_when_the_noise_ratio_falls_below_the_threshold(repo, tmp_path):
    # A threshold no real ratio reaches: the first measurement (step 2) must trigger QAF at step 3.
    result = train(small_cfg(repo, tmp_path, "run.name=auto", "precision.recipe=fp4", "precision.qaf.auto=true",
                             "precision.grad_noise.every=2", "precision.grad_noise.threshold=1e6", "train.steps=4"))
    events = [r for r in read_jsonl(result.run_dir / "numerics.jsonl") if r["kind"] == "event"]
    assert [e["step"] for e in events] == [3] and "gradient-noise ratio" in events[0]["reason"]


def test_qaf_settings_that_cannot_work_are_refused(repo, tmp_path):
    with pytest.raises(UserError, match="precision.qaf: recipe 'bf16' quantizes no linear layer"):
        Trainer(small_cfg(repo, tmp_path, "precision.qaf.start_step=3"))
    assert not (tmp_path / "quickstart").exists()  # refused before anything was written
    with pytest.raises(UserError, match="precision.qaf.auto: needs the gradient-noise monitor"):
        small_cfg(repo, tmp_path, "precision.recipe=fp4", "precision.qaf.auto=true", "precision.grad_noise.every=0")
    with pytest.raises(UserError, match="set only one of"):
        small_cfg(repo, tmp_path, "precision.recipe=fp4", "precision.qaf.start_step=3", "precision.qaf.start_tokens=9")


def test_quantization_stats_count_overflow_and_underflow_exactly():
    x = torch.tensor([1000.0, 300.0, 1.0, 1e-6, 0.0, -500.0])
    # FP8 E4M3 with a fixed scale of 1: |x| > 448 saturates, 1e-6 < 2^-10 (half the smallest subnormal) flushes
    s = quantization_stats(x, quantize(x, "fp8_e4m3", scale=torch.tensor(1.0)))
    assert (s["overflow"].item(), s["underflow"].item(), s["nonzero"].item(), s["numel"].item()) == (2, 1, 5, 6)
    assert s["amax"].item() == 1000.0
    # NVFP4 with a fixed tensor amax of 1 (the nGPT recipe): values beyond 1 saturate; within it, none do
    y = torch.linspace(-0.9, 0.9, 32)
    assert quantization_stats(y, quantize(y, "nvfp4", tensor_scale="fixed", tensor_amax=1.0))["overflow"] == 0
    z = y.clone()
    z[3] = 4.0
    assert quantization_stats(z, quantize(z, "nvfp4", tensor_scale="fixed", tensor_amax=1.0))["overflow"] == 1
