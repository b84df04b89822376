"""Learning-rate schedules and the optimizer's parameter groups."""

import math

import pytest
import torch

from megatron_lowp.config import load_config
from megatron_lowp.model import build_model
from megatron_lowp.optim import build_optimizer, lr_at
from megatron_lowp.precision.recipe import PrecisionRecipe


def optim_cfg(*overrides):
    return load_config(None, ["optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=10", *overrides]).optim


def test_warmup_is_linear_from_zero():
    cfg = optim_cfg()
    assert [lr_at(s, cfg, 100) for s in (1, 5, 10)] == pytest.approx([0.1, 0.5, 1.0])


def test_cosine_ends_at_min_lr_and_is_half_way_in_the_middle():
    cfg = optim_cfg("optim.schedule=cosine")
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)
    assert lr_at(55, cfg, 100) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    values = [lr_at(s, cfg, 100) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone after warmup


def test_wsd_holds_then_decays_linearly():
    cfg = optim_cfg("optim.schedule=wsd", "optim.decay_fraction=0.2")
    assert lr_at(50, cfg, 100) == 1.0 and lr_at(80, cfg, 100) == 1.0
    assert lr_at(90, cfg, 100) == pytest.approx(0.55)
    assert lr_at(100, cfg, 100) == pytest.approx(0.1)


def test_constant():
    cfg = optim_cfg("optim.schedule=constant")
    assert lr_at(11, cfg, 100) == lr_at(100, cfg, 100) == 1.0


def test_no_weight_decay_on_norms():
    cfg = load_config(None, ["model.vocab_size=50", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
                             "model.max_seq_len=16", "train.seq_len=16", "optim.weight_decay=0.1"])
    model = build_model(cfg.model, PrecisionRecipe(name="fp32", autocast_dtype=None))
    decay, no_decay = build_optimizer(model, cfg.optim).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(no_decay["params"]) == 3  # two norms in the block + the final norm
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == model.num_params()
    assert isinstance(decay["params"][0], torch.nn.Parameter)
