"""megatron-lowp eval and generate on checkpoints of real (tiny) runs."""

from __future__ import annotations

import json

import pytest

from megatron_lowp import cli
from megatron_lowp.errors import UserError
from megatron_lowp.eval.evaluate import evaluate, generate, load_model
from megatron_lowp.train import train
from tests.test_train import small_cfg


@pytest.fixture(scope="module")
def fp8_run(repo, tmp_path_factory):
    return train(small_cfg(repo, tmp_path_factory.mktemp("ev"), "run.name=fp8", "precision.recipe=fp8"))


def test_eval_reproduces_the_training_validation_loss_and_adds_bf16(fp8_run, capsys):
    r = evaluate(fp8_run.run_dir)
    assert r["step"] == 8
    assert r["trained_precision"]["loss"] == pytest.approx(fp8_run.val_loss, abs=1e-6)  # same data, same forward
    assert r["trained_precision"]["precision"] == "fp8" and r["bf16"]["precision"] == "bf16"
    assert abs(r["bf16_minus_trained"]) < 0.05 and r["bf16"]["perplexity"] > 1
    saved = json.loads((fp8_run.run_dir / "eval/step_8.json").read_text())
    assert saved["bf16"]["loss"] == r["bf16"]["loss"]
    assert cli.main(["eval", str(fp8_run.checkpoint), "--no-bf16", "--samples", "4"]) == 0
    assert "fp8 loss" in capsys.readouterr().out


def test_generate_greedy_is_deterministic_and_sampling_follows_the_seed(fp8_run):
    loaded = load_model(fp8_run.run_dir, precision="bf16")
    a = generate(loaded, "The hacker", max_new_tokens=8)
    assert a == generate(loaded, "The hacker", max_new_tokens=8) and len(a) > 0
    s1 = generate(loaded, "The hacker", max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    assert s1 == generate(loaded, "The hacker", max_new_tokens=8, temperature=1.0, top_k=20, seed=3)
    with pytest.raises(UserError, match="must be >= 0"):
        generate(loaded, "x", temperature=-1)


def test_a_path_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["eval", str(tmp_path)]) == 2
    assert "neither a checkpoint directory nor a run directory" in capsys.readouterr().err


def test_hf_export_loads_in_transformers_and_matches_our_logits(repo, tmp_path):
    """FP32 logits of transformers' LlamaForCausalLM on the exported checkpoint equal ours to 1e-4
    (measured 3e-6 on the tiny BF16 run; the difference is float summation order)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from megatron_lowp.eval.export import export_hf

    run = train(small_cfg(repo, tmp_path, "run.name=hf", "train.steps=2", "train.eval_every=0"))
    out = export_hf(run.run_dir, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.model"}
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours = load_model(run.run_dir, precision="bf16").model.float()
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (ours(tokens).float() - hf(tokens).logits.float()).abs().max().item()
    assert diff < 1e-4


def test_ngpt_has_no_hf_class_and_says_so(repo, tmp_path):
    from megatron_lowp.eval.export import export_hf

    run = train(small_cfg(repo, tmp_path, "run.name=ng", "model.arch=ngpt", "train.steps=2", "train.eval_every=0"))
    with pytest.raises(UserError, match="model.arch 'ngpt' has no Hugging Face class"):
        export_hf(run.run_dir, tmp_path / "out")
