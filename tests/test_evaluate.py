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


def test_hf_export_loads_in_transformers_and_matches_our_logits_tokens_and_generation(repo, tmp_path):
    """FP32 logits of transformers' LlamaForCausalLM on the exported checkpoint equal ours to 1e-4
    (measured 3e-6 on the tiny BF16 run; the difference is float summation order). The exported
    tokenizer starts every text after EOS, as generate does, and encodes as sentencepiece does (a
    leading space, a literal "</s>", bytes); so HF greedy generation from the export continues a
    prompt with our tokens and text."""
    transformers = pytest.importorskip("transformers")
    import dataclasses

    import torch

    from megatron_lowp.data import Tokenizer
    from megatron_lowp.eval.evaluate import continue_tokens
    from megatron_lowp.eval.export import export_hf

    run = train(small_cfg(repo, tmp_path, "run.name=hf", "train.steps=2", "train.eval_every=0"))
    out = export_hf(run.run_dir, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "tokenizer.model", "tokenizer.json"}
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    loaded = load_model(run.run_dir, precision="bf16")
    ours = loaded.model.float()
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        diff = (ours(tokens).float() - hf(tokens).logits.float()).abs().max().item()
    assert diff < 1e-4

    tok, hf_tok = Tokenizer.load(loaded.cfg.data.tokenizer), transformers.AutoTokenizer.from_pretrained(out)
    for text in ["The hacker", " leading space", "two  spaces\nand a tab\t", "a</s>b", "Zürich 日本 🙂 123.45"]:
        assert hf_tok(text).input_ids == [tok.eos_id] + tok.encode(text), text
    prompt = "The hacker"
    ids = [tok.eos_id] + tok.encode(prompt)
    fp32 = dataclasses.replace(loaded, recipe=dataclasses.replace(loaded.recipe, autocast_dtype=None))
    new = continue_tokens(fp32, ids, 8)
    inputs = hf_tok(prompt, return_tensors="pt")
    with torch.no_grad():
        hf_ids = hf.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_id)[0].tolist()
    assert hf_ids == ids + new
    text = generate(fp32, prompt, max_new_tokens=8)
    assert hf_tok.decode(hf_ids, skip_special_tokens=True) == prompt + text


def test_export_without_the_eval_extra_says_what_to_install(monkeypatch, tmp_path, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "safetensors", None)  # what an install without [eval] has
    assert cli.main(["export", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "export --format hf needs safetensors" in err and "pip install 'megatron-lowp[eval]'" in err
    assert not (tmp_path / "hf").exists()


def test_ngpt_has_no_hf_class_and_says_so(repo, tmp_path):
    from megatron_lowp.eval.export import export_hf

    run = train(small_cfg(repo, tmp_path, "run.name=ng", "model.arch=ngpt", "train.steps=2", "train.eval_every=0"))
    with pytest.raises(UserError, match="model.arch 'ngpt' has no Hugging Face class"):
        export_hf(run.run_dir, tmp_path / "out")
