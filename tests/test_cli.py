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
    assert "vocab_size: 4096" in out  # null in the recipe: the embedded tokenizer's, as training resolves it


def test_config_with_a_tokenizer_it_cannot_read(repo, tmp_path, capsys):
    recipe = str(repo / "recipes/quickstart.yaml")
    assert main(["config", recipe, f"data.tokenizer={tmp_path}/absent.model"]) == 0  # still shows the recipe
    captured = capsys.readouterr()
    assert "vocab_size: null" in captured.out and "model.vocab_size stays null: tokenizer file not found" in captured.err
    assert main(["config", recipe, f"data.tokenizer={tmp_path}/absent.model", "model.vocab_size=32000"]) == 0
    captured = capsys.readouterr()
    assert "vocab_size: 32000" in captured.out and captured.err == ""
    assert_user_error(run_cli("config", recipe, "model.vocab_size=100"),
                      "model.vocab_size: 100 is smaller than the tokenizer's vocabulary (4096, embedded)")


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



@pytest.fixture(scope="module")
def small_run(repo, tmp_path_factory):
    from megatron_lowp.train import train
    from tests.test_train import small_cfg

    return train(small_cfg(repo, tmp_path_factory.mktemp("quiet"), "run.name=quiet", "train.eval_every=0"))


def run_quiet(*args, tmp_path):
    """The CLI in a subprocess as a user starts it, with an empty matplotlib cache (its first import
    builds one, and logs that)."""
    env = {**os.environ, "PYTHONPATH": str(os.path.dirname(os.path.dirname(__file__))), "OMP_NUM_THREADS": "1",
           "MPLCONFIGDIR": str(tmp_path / "mpl")}
    return subprocess.run([*args], capture_output=True, text=True, env=env, timeout=600)


def test_generate_eval_and_export_print_no_warnings(small_run, tmp_path):
    run_dir = str(small_run.run_dir)
    for argv in (["generate", run_dir, "--prompt", "The hacker", "--max-new-tokens", "4"],
                 ["eval", run_dir, "--samples", "4"],
                 ["export", run_dir, "--out", str(tmp_path / "hf")]):
        proc = run_quiet(sys.executable, "-m", "megatron_lowp", *argv, tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", (argv[0], proc.stderr)  # no DCP/matplotlib/transformers notices
        assert proc.stdout


def test_ddp_training_prints_no_warnings(repo, tmp_path):
    """DDP asked to skip buffer syncs warned on every rank (torch 2.13 renamed the argument)."""
    small = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_hidden_size=128",
             "train.seq_len=32", "train.micro_batch_size=4", "train.global_batch_size=4", "train.steps=2",
             "optim.warmup_steps=1", "train.eval_every=0", "train.checkpoint_every=0", "logging.progress=false",
             "parallel.engine=ddp", f"run.out_dir={tmp_path}", "run.name=ddp"]
    proc = run_quiet(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "megatron_lowp",
                     "train", str(repo / "recipes/quickstart.yaml"), *small, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "done: step 2" in proc.stdout and proc.stderr == ""
