"""The lm-evaluation-harness adapter on a real (tiny) checkpoint, offline: local task YAMLs over JSONL
files the tests write, run through `megatron-lowp eval --tasks`."""

from __future__ import annotations

import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from megatron_lowp import cli
from megatron_lowp.data import Tokenizer
from megatron_lowp.errors import UserError
from megatron_lowp.eval.evaluate import generate, load_model
from megatron_lowp.train import train
from tests.test_train import small_cfg

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from megatron_lowp.eval.harness import GenerationArgs, HarnessLM  # noqa: E402

QUESTIONS = [
    ("The hacker wrote", ["a program", "a banana", "the moon"], 0),
    ("A fortune cookie says", ["you will travel", "kernel panic", "xyzzy"], 1),
    ("The devil defines a", ["lawyer", "compiler", "bus"], 2),
    ("Real programmers use", ["Fortran", "butterflies", "nothing"], 0),
]
TEXTS = ["The jargon file is a glossary of hacker slang, kept since the seventies by many hands.",
         "Abstainer, n. A weak person who yields to the temptation of denying himself a pleasure.",
         "You will be recognized and honored as a community leader."]
PROMPTS = ["The hacker", "A bug is", "In the beginning"]


@pytest.fixture(scope="module")
def fp8_run(repo, tmp_path_factory):
    return train(small_cfg(repo, tmp_path_factory.mktemp("harness"), "run.name=fp8", "precision.recipe=fp8"))


@pytest.fixture(scope="module")
def lm(fp8_run):
    return HarnessLM(loaded=load_model(fp8_run.run_dir))


def req(kind, *args):
    return Instance(kind, {}, tuple(args), 0)


def direct_logprobs(lm, tokens: list[int]) -> torch.Tensor:
    """log p(tokens[i] | tokens[:i]) for i >= 1, from one plain forward of the model."""
    x = torch.tensor([tokens[:-1]])
    with torch.no_grad(), lm.loaded.device.autocast(lm.loaded.recipe.autocast_dtype):
        logits = lm.loaded.model(x)
    logp = torch.log_softmax(logits.float(), -1)[0]
    return logp.gather(1, torch.tensor(tokens[1:])[:, None])[:, 0], logp.argmax(-1)


def test_loglikelihood_is_the_continuations_log_probability_after_eos(lm):
    tok = Tokenizer.load(lm.loaded.cfg.data.tokenizer)
    (ll, greedy), = lm.loglikelihood([req("loglikelihood", "The hacker", " said hello")])
    tokens = [tok.eos_id] + tok.encode("The hacker said hello")
    n_context = 1 + len(tok.encode("The hacker"))
    logp, argmax = direct_logprobs(lm, tokens)
    assert ll == pytest.approx(float(logp[n_context - 1:].sum()), abs=1e-4)
    assert greedy == bool((argmax[n_context - 1:] == torch.tensor(tokens[n_context:])).all())
    # Empty context: the continuation is scored after the document separator alone.
    (ll_empty, _), = lm.loglikelihood([req("loglikelihood", "", "Hello world")])
    logp, _ = direct_logprobs(lm, [tok.eos_id] + tok.encode("Hello world"))
    assert ll_empty == pytest.approx(float(logp.sum()), abs=1e-4)


def test_trailing_context_spaces_move_to_the_continuation(lm):
    assert lm.split_tokens("The hacker ", "said") == lm.split_tokens("The hacker", " said")


def test_is_greedy_is_true_for_the_models_own_greedy_continuation(lm):
    tok = Tokenizer.load(lm.loaded.cfg.data.tokenizer)
    ids = [tok.eos_id] + tok.encode("The hacker")
    _, argmax = direct_logprobs(lm, ids + [0])
    best = int(argmax[-1])
    assert lm.score([(ids, [best])])[0][1] is True
    assert lm.score([(ids, [(best + 1) % tok.vocab_size])])[0][1] is False


def test_batched_scores_equal_one_at_a_time_in_bf16(fp8_run):
    """Right padding is invisible to causal attention, so batching changes nothing in BF16 but the
    order of float sums: the CPU's BF16 GEMM kernels block other batch sizes differently on some
    CPUs (bit-identical on one, up to 1.3e-6 relative apart on an AVX2 one), never the greedy flags."""
    one = HarnessLM(loaded=load_model(fp8_run.run_dir, precision="bf16"), batch_size=1)
    many = HarnessLM(loaded=one.loaded, batch_size=3)
    requests = [req("loglikelihood", q, " " + c) for q, choices, _ in QUESTIONS for c in choices]
    a, b = one.loglikelihood(requests), many.loglikelihood(requests)
    assert [greedy for _, greedy in a] == [greedy for _, greedy in b]
    assert [score for score, _ in a] == pytest.approx([score for score, _ in b], rel=1e-4, abs=0)


def test_rolling_loglikelihood_predicts_every_token_exactly_once(lm, monkeypatch):
    tok = Tokenizer.load(lm.loaded.cfg.data.tokenizer)
    text = " ".join(TEXTS * 3)
    tokens = tok.encode(text)
    monkeypatch.setattr(lm, "max_length", 16)  # many windows
    seen = []
    score = lm.score
    monkeypatch.setattr(lm, "score", lambda pairs, desc="": seen.extend(pairs) or score(pairs, desc))
    (total,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert sum((c for _, c in seen), []) == tokens  # each token predicted once, in order
    assert all(len(ctx) + len(c) - 1 <= 16 for ctx, c in seen) and seen[0][0] == [tok.eos_id]
    assert total == pytest.approx(sum(lp for lp, _ in score(seen)), abs=1e-3) and total < 0


def test_rolling_loglikelihood_in_one_window_equals_loglikelihood_from_empty_context(lm):
    (rolling,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", TEXTS[0])])
    ((ll, _),) = lm.loglikelihood([req("loglikelihood", "", TEXTS[0])])
    assert rolling == pytest.approx(ll, abs=1e-4)


def test_generate_until_follows_greedy_decoding_and_cuts_at_the_stop_string(lm):
    full = generate(lm.loaded, "The hacker", max_new_tokens=12)
    stop = full.strip().split()[2] if len(full.split()) > 3 else full[-2:]
    (out,) = lm.generate_until([req("generate_until", "The hacker", {"until": [stop], "max_gen_toks": 12})])
    assert out == full.split(stop)[0]
    (short,) = lm.generate_until([req("generate_until", "The hacker", {"until": [], "max_gen_toks": 3})])
    assert short == generate(lm.loaded, "The hacker", max_new_tokens=3)


def test_generation_arguments_are_checked():
    g = GenerationArgs.parse({"until": "\n", "do_sample": False, "temperature": 0.7, "top_p": 0.9})
    assert g.until == ["\n"] and g.temperature == 0.0 and g.max_gen_toks == 256
    g = GenerationArgs.parse({"until": ["a", "b"], "do_sample": True, "temperature": 0.5, "top_k": 5, "num_beams": 1})
    assert (g.temperature, g.top_k) == (0.5, 5)
    with pytest.raises(UserError, match=r"unsupported generation arguments \['num_beams'\]"):
        GenerationArgs.parse({"until": [], "num_beams": 4})
    with pytest.raises(UserError, match="top_p"):
        GenerationArgs.parse({"until": [], "do_sample": True, "top_p": 0.9})


def test_batch_size_must_be_a_positive_integer(fp8_run):
    with pytest.raises(UserError, match="'auto' is not supported"):
        HarnessLM(pretrained=str(fp8_run.run_dir), batch_size="auto")
    with pytest.raises(UserError, match="exactly one of"):
        HarnessLM()


def write_tasks(folder, lm) -> dict:
    """Three local tasks, one per request type; JSONL data next to them. The generation task's answers
    are the trained model's own greedy continuations (from generate(), not the adapter)."""
    folder.mkdir()
    rows = {
        "mc": [{"question": q, "choices": c, "label": y} for q, c, y in QUESTIONS],
        "ppl": [{"text": t} for t in TEXTS],
        "gen": [{"prompt": p, "answer": generate(lm.loaded, p, max_new_tokens=6).split("\n")[0]} for p in PROMPTS],
    }
    for name, docs in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    head = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        "task: lowp_mc\n" + head.format(folder / "mc.jsonl") +
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "ppl.yaml").write_text(
        "task: lowp_ppl\n" + head.format(folder / "ppl.jsonl") +
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (folder / "gen.yaml").write_text(
        "task: lowp_gen\n" + head.format(folder / "gen.jsonl") +
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return rows


def test_local_tasks_run_offline_through_the_cli_in_both_precisions(fp8_run, lm, tmp_path, capsys):
    rows = write_tasks(tmp_path / "tasks", lm)
    argv = ["eval", str(fp8_run.run_dir), "--tasks", "lowp_mc,lowp_ppl,lowp_gen",
            "--include-path", str(tmp_path / "tasks"), "--bootstrap-iters", "0"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| lowp_mc (n=4) | acc |" in out and "bf16 - fp8" in out
    saved = json.loads((fp8_run.run_dir / "eval/step_8_tasks.json").read_text())
    assert set(saved["results"]) == {"fp8", "bf16"} and saved["trained_precision"] == "fp8"
    fp8 = saved["results"]["fp8"]

    # The harness's numbers are the adapter's: recompute each metric from the adapter's own answers.
    picks = [max(range(len(c)), key=lambda i, q=q, c=c: lm.loglikelihood([req("loglikelihood", q, " " + c[i])])[0][0])
             for q, c, _ in QUESTIONS]
    assert fp8["lowp_mc"]["acc"] == pytest.approx(sum(p == y for p, (_, _, y) in zip(picks, QUESTIONS, strict=True))
                                                   / len(QUESTIONS))
    lls = lm.loglikelihood_rolling([req("loglikelihood_rolling", d["text"]) for d in rows["ppl"]])
    words = sum(len(re.split(r"\s+", d["text"])) for d in rows["ppl"])
    assert fp8["lowp_ppl"]["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-4)
    assert fp8["lowp_gen"]["exact_match"] == 1.0  # the answers are the model's own greedy text
    assert 0 <= saved["results"]["bf16"]["lowp_gen"]["exact_match"] <= 1


def test_unknown_task_and_misplaced_options_are_clear_errors(fp8_run, capsys):
    assert cli.main(["eval", str(fp8_run.run_dir), "--tasks", "no_such_task_xyz"]) == 2
    assert "unknown lm_eval task(s) ['no_such_task_xyz']" in capsys.readouterr().err
    assert cli.main(["eval", str(fp8_run.run_dir), "--num-fewshot", "5"]) == 2
    assert "--num-fewshot only applies with --tasks" in capsys.readouterr().err
    assert cli.main(["eval", str(fp8_run.run_dir), "--tasks", "x", "--include-path", str(fp8_run.run_dir / "no")]) == 2
    assert "--include-path: not a folder" in capsys.readouterr().err
    assert cli.main(["eval", str(fp8_run.run_dir), "--tasks", "lowp_mc", "--batch-size", "0"]) == 2
    assert "batch_size: expected a positive integer, got 0" in capsys.readouterr().err


def test_missing_lm_eval_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "megatron_lowp.eval.harness")
    with pytest.raises(UserError, match=r"pip install 'megatron-lowp\[eval\]'"):
        importlib.import_module("megatron_lowp.eval.harness")


@pytest.mark.slow  # ~25 s: loads lm-eval's whole task index
def test_a_hub_task_offline_names_the_way_out(fp8_run, repo):
    """hellaswag needs the Hub; offline (HF_HUB_OFFLINE=1 fails at once) the error says what to do."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "megatron_lowp", "eval", str(fp8_run.run_dir), "--tasks", "hellaswag",
                           "--limit", "2", "--no-bf16"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Couldn't reach 'Rowan/hellaswag'" in proc.stderr and "--include-path DIR" in proc.stderr
