"""The command line as a user meets it: one clear line and exit status 2 for every mistake."""

import os
import subprocess
import sys

import pytest

from megatron_lowp.cli import main


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(os.path.dirname(os.path.dirname(__file__)))}
    return subprocess.run([sys.executable, "-m", "megatron_lowp", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("megatron-lowp: error:")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_missing_recipe(tmp_path):
    assert_user_error(run_cli("train", str(tmp_path / "nope.yaml")), "nope.yaml: recipe file not found")


def test_unknown_key_and_bad_override(repo):
    assert_user_error(run_cli("train", str(repo / "recipes/quickstart.yaml"), "train.stepz=3"),
                      "command line: unknown key 'train.stepz'", "did you mean 'train.steps'")
    assert_user_error(run_cli("config", str(repo / "recipes/quickstart.yaml"), "train.steps"),
                      "expected section.key=value")


def test_missing_data_and_tokenizer_write_nothing(repo, tmp_path):
    out = tmp_path / "runs"
    recipe = str(repo / "recipes/quickstart.yaml")
    assert_user_error(run_cli("train", recipe, f"run.out_dir={out}", f"data.train={tmp_path}/corpus"),
                      "data.train:", "corpus.bin")
    assert_user_error(run_cli("train", recipe, f"run.out_dir={out}", f"data.tokenizer={tmp_path}/tok.model"),
                      "tok.model")
    assert_user_error(run_cli("train", recipe, f"run.out_dir={out}", "precision.recipe=custom",
                              "precision.x.format=nvfp4", "precision.x.amax=delayed"), "precision.x.amax")
    assert_user_error(run_cli("train", recipe, f"run.out_dir={out}", "optim.moments=bf16",
                              "optim.moments_rounding=stochastic"), "optim.moments_rounding")
    assert not out.exists()  # nothing was created for a run that could not start


def test_unwritable_run_directory(repo, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a directory")
    assert_user_error(run_cli("train", str(repo / "recipes/quickstart.yaml"), f"run.out_dir={blocker}"),
                      "run.out_dir: cannot write the run directory")
    assert blocker.read_text() == "I am a file, not a directory"


def test_config_prints_the_resolved_recipe(repo, capsys):
    assert main(["config", str(repo / "recipes/quickstart.yaml"), "train.steps=42"]) == 0
    out = capsys.readouterr().out
    assert "steps: 42" in out and "preset: tiny" in out and "d_model: 256" in out


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0
    assert "megatron-lowp" in capsys.readouterr().out


def test_train_command_end_to_end(repo, tmp_path, capsys):
    small = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_size=128",
             "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=8", "train.steps=6",
             "optim.warmup_steps=1", "train.log_every=2", "train.eval_every=3", "train.eval_samples=8",
             "logging.progress=false", f"run.out_dir={tmp_path}", "run.name=cli"]
    assert main(["train", str(repo / "recipes/quickstart.yaml"), *small]) == 0
    out = capsys.readouterr().out
    assert "step 6/6 | loss" in out and "done: step 6, 1,536 tokens" in out
    run_dir = tmp_path / "cli"
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (run_dir / "checkpoints" / "step_6" / "manifest.json").is_file()
    # running it again resumes: nothing left to do, the same summary from the logged numbers
    assert main(["train", str(repo / "recipes/quickstart.yaml"), *small]) == 0
    again = capsys.readouterr().out
    summary = out.splitlines()[-1].split(", ")[:4]  # step, tokens, loss, val_loss (not the seconds)
    assert "nothing to do" in again and again.splitlines()[-1].split(", ")[:4] == summary
