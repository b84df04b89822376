"""The precision recipe owns its lifecycle: the loop holds no precision code, and a recipe with its
own behaviour is one file plus its YAML (precision/recipes/fp4_hp_warmup.py, the worked example in
docs/recipes.md, which must show those files as they are)."""

from __future__ import annotations

import re
from pathlib import Path

from megatron_lowp.precision import QuantizedLinear, available_recipes
from megatron_lowp.run.logs import read_jsonl
from megatron_lowp.train.loop import Trainer
from tests.test_train import small_cfg

REPO = Path(__file__).resolve().parents[1]


def test_the_loop_holds_no_precision_specific_code():
    source = (REPO / "megatron_lowp/train/loop.py").read_text()
    code = re.sub(r'""".*?"""', "", source, flags=re.S)  # docstrings and comments may name what recipes do
    code = "\n".join(line.split("#")[0] for line in code.splitlines())
    for word in ("QuantizedLinear", "qaf", "amax", "grad_noise", "telemetry", "fp8", "fp4", "nvfp4", "sr_rank",
                 "MONITOR_ENGINES", "arch"):
        assert word not in code, word


def test_a_recipe_with_its_own_lifecycle_trains_from_one_file_and_its_yaml(tmp_path):
    assert "fp4_hp_warmup" in available_recipes()
    overrides = ["precision.recipe=fp4_hp_warmup", "optim.warmup_steps=3", "train.steps=6", "train.eval_every=0",
                 "precision.qaf.start_fraction=1.0",  # no QAF (it would take the backward too)
                 "train.checkpoint_every=0"]
    trainer = Trainer(small_cfg(REPO, tmp_path, "run.name=steps", *overrides))
    layers = [m for m in trainer.model.modules() if isinstance(m, QuantizedLinear)]
    seen = []
    while trainer.step < 6:
        trainer.train_step()
        seen.append(all(m.specs.dy is None and m.specs.x is not None for m in layers))
    assert layers and seen == [True, True, True, False, False, False]  # backward in high precision while warming up
    assert trainer.cfg.precision.x.format == "nvfp4" and trainer.cfg.precision.smooth_swiglu  # fp4's package
    result = Trainer(small_cfg(REPO, tmp_path, "run.name=fit", *overrides)).fit()
    assert [r["hp_backward"] for r in read_jsonl(result.run_dir / "metrics.jsonl")] == [True] * 3 + [False] * 3


def test_docs_show_the_example_recipe_as_it_is():
    doc = (REPO / "docs/recipes.md").read_text()
    for path in ("megatron_lowp/precision/recipes/fp4_hp_warmup.py", "megatron_lowp/configs/precision/fp4_hp_warmup.yaml"):
        assert (REPO / path).read_text().strip() in doc, path


def test_eval_never_imports_train():
    """The layers point down: eval reads run directories through run/, never through the trainer."""
    import subprocess
    import sys

    modules = [f"megatron_lowp.eval.{p.stem}" for p in sorted((REPO / "megatron_lowp/eval").glob("*.py"))]
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted(m for m in sys.modules if m.startswith('megatron_lowp.train')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_an_engine_without_the_monitor_says_so_once(tmp_path):
    """precision.grad_noise.every on an engine whose module holds no whole gradients (fsdp, ZeRO):
    one note instead of a silently missing grad_noise.jsonl."""
    from megatron_lowp.parallel.engine import EngineCapabilities

    trainer = Trainer(small_cfg(REPO, tmp_path, "precision.recipe=fp4", "precision.grad_noise.every=2",
                                "train.checkpoint_every=0", "train.eval_every=0"))
    assert not any("does not run on" in n for n in trainer.notes)  # single: the monitor runs
    trainer.recipe.check_engine("fsdp", EngineCapabilities(plain_module_gradients=False))
    notes = [n for n in trainer.recipe.drain()[1] if "does not run on" in n]
    assert len(notes) == 1 and "precision.grad_noise.every = 2" in notes[0] and "fsdp" in notes[0]
