"""Activation checkpointing (`train.activation_checkpointing: none | full | selective`) changes no bit:
losses, gradient norms, SR stream positions, amax histories and telemetry counts are those of the run
without it, for bf16, fp8 (delayed scaling) and fp4 (stochastic rounding in forward and backward), in
one process and on 2 ranks (ddp, fsdp). And it does drop saved activations, or the equality would be
empty (model/checkpointing.py, precision/recompute.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_lowp.config import load_config
from megatron_lowp.errors import UserError
from megatron_lowp.memory.saved import SavedTensors
from megatron_lowp.model import build_model, cross_entropy_loss
from megatron_lowp.model.checkpointing import apply_activation_checkpointing
from megatron_lowp.precision import available_recipes, build_recipe
from megatron_lowp.precision.quantized_linear import QuantizedLinear
from megatron_lowp.run.logs import read_jsonl
from megatron_lowp.train.loop import Trainer
from tests.test_distributed import launch
from tests.test_train import SMALL, checkpoint_tensors

STEPS = ["train.steps=5", "train.eval_every=0", "train.checkpoint_every=0"]
# fp4: x_t is rounded stochastically in the forward (split rounding), so a recompute must redraw the
# same bits; the gradient-noise probe (a second backward) and telemetry run on the checked steps too.
EXTRA = {"bf16": [], "fp8": ["precision.telemetry_every=2"],
         "fp4": ["precision.grad_noise.every=2", "precision.telemetry_every=2"]}


def _cfg(repo: Path, out: Path, recipe: str, mode: str, *overrides: str):
    return load_config(repo / f"recipes/tiny/{recipe}.yaml",
                       [*SMALL, *STEPS, *EXTRA[recipe], f"run.out_dir={out}", f"run.name={recipe}-{mode}",
                        f"train.activation_checkpointing={mode}", *overrides],
                       extra_choices={"precision.recipe": available_recipes()})


def _run(repo: Path, out: Path, recipe: str, mode: str) -> dict:
    trainer = Trainer(_cfg(repo, out, recipe, mode))
    trainer.fit()
    linears = [m for m in trainer.model.modules() if isinstance(m, QuantizedLinear)]
    numerics = trainer.run_dir / "numerics.jsonl"
    return {
        "curve": [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(trainer.run_dir / "metrics.jsonl")],
        "sr": [m.sr.offset for m in linears],
        "amax": [{role: h.history.clone() for role, h in m.delayed.histories.items()}
                 for m in linears if m.delayed is not None],
        "numerics": [{k: v for k, v in r.items() if k != "elapsed_s"} for r in read_jsonl(numerics)]
        if numerics.exists() else [],
    }


@pytest.fixture(scope="module")
def reference(repo, tmp_path_factory):
    """The run without checkpointing, per recipe (computed on first use)."""
    out, runs = tmp_path_factory.mktemp("none"), {}

    def get(recipe: str) -> dict:
        if recipe not in runs:
            runs[recipe] = _run(repo, out, recipe, "none")
        return runs[recipe]

    return get


@pytest.mark.parametrize("recipe, mode", [  # fp4 (SR, recomputed draws) both ways by default; the rest -m slow
    ("fp4", "full"), ("fp4", "selective"), ("fp8", "selective"), ("bf16", "selective"),
    pytest.param("fp8", "full", marks=pytest.mark.slow), pytest.param("bf16", "full", marks=pytest.mark.slow)])
def test_checkpointing_changes_no_bit(repo, tmp_path, reference, recipe, mode):
    ref, run = reference(recipe), _run(repo, tmp_path, recipe, mode)
    # (fp8's delayed scales are fixed within a step and a re-observed amax is the same max, so a plain
    # re-run of its forward would pass too; fp4's forward SR draws are what fails without the replay.)
    assert run["curve"] == ref["curve"]  # losses and gradient norms, bit for bit
    assert run["sr"] == ref["sr"]  # each layer's SR stream drew as often: a recompute redraws the same bits
    if recipe == "fp4":
        assert any(ref["sr"])
    if recipe == "fp8":
        assert ref["amax"] and all(torch.count_nonzero(h) for layer in ref["amax"] for h in layer.values())
    assert len(run["amax"]) == len(ref["amax"])
    for a, b in zip(run["amax"], ref["amax"], strict=True):  # amaxes observed once per forward, not once more per recompute
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert run["numerics"] == ref["numerics"]  # telemetry counted once: the recompute counts nothing


def _saved_bytes(repo: Path, recipe: str, mode: str) -> tuple[int, torch.Tensor]:
    cfg = _cfg(repo, repo, recipe, mode)
    from megatron_lowp.data import Tokenizer
    from megatron_lowp.device import get_device
    from megatron_lowp.train.setup import resolve_vocab

    resolve_vocab(cfg, Tokenizer.load(cfg.data.tokenizer))
    device = get_device("cpu")
    recipe_obj = build_recipe(cfg, device)
    torch.manual_seed(0)
    model = build_model(cfg.model, recipe_obj)
    recipe_obj.attach(model, 0)
    apply_activation_checkpointing(model, mode)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 32))
    with SavedTensors(model) as saved:
        with recipe_obj.forward_context(device):
            loss = cross_entropy_loss(model(tokens), tokens)
    loss.backward()
    return sum(r.bytes for r in saved.rows if r.where.startswith("layers.")), model.layers[0].attn.qkv.weight.grad


@pytest.mark.parametrize("recipe", ["bf16", "fp4"])
def test_checkpointing_keeps_less_for_backward(repo, recipe):
    none, grad = _saved_bytes(repo, recipe, "none")
    full, grad_full = _saved_bytes(repo, recipe, "full")
    selective, grad_selective = _saved_bytes(repo, recipe, "selective")
    assert full < selective < none, (full, selective, none)
    assert torch.equal(grad, grad_full) and torch.equal(grad, grad_selective)


def test_an_unknown_mode_is_one_line_naming_the_key(repo, tmp_path):
    with pytest.raises(UserError, match=r"train\.activation_checkpointing.*none.*full.*selective"):
        _cfg(repo, tmp_path, "bf16", "some")


def _checkpoint(run_dir: Path) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(run_dir / "checkpoints" / "step_4")


@pytest.mark.slow  # two torchrun jobs each: ~100 s on 2 cores
@pytest.mark.parametrize("engine, recipe, mode", [
    ("fsdp", "fp4", "full"),
    ("ddp", "fp4", "selective"),
    ("fsdp", "fp8", "selective"),
])
def test_checkpointing_changes_no_bit_on_two_ranks(repo, tmp_path, engine, recipe, mode):
    """Losses, and the final checkpoint's tensors (weights, moments, each rank's SR offsets and the
    amax histories, which travel in the layers' extra state), equal those of the run without."""
    common = [f"precision.recipe={recipe}", f"parallel.engine={engine}", "train.steps=4", "train.checkpoint_every=4",
              "train.eval_every=0", *EXTRA[recipe]]
    ref = launch(repo, tmp_path, "none", 2, *common)
    run = launch(repo, tmp_path, mode, 2, *common, f"train.activation_checkpointing={mode}")
    curve = [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(ref / "metrics.jsonl")]
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in read_jsonl(run / "metrics.jsonl")] == curve
    a, b = _checkpoint(ref), _checkpoint(run)
    assert a.keys() == b.keys() and any("extra_state" in k or ".sr" in k for k in a)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
