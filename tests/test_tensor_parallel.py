"""Tensor parallelism (parallel.tp) in real gloo jobs on the CPU: the shards of every quantized
operand equal the unsharded tensor's, and tp = 2 trains like one process (within the reduction-order
differences of FP32 sums), composes with FSDP2 on dp, and resumes at another tp degree; the same for
nGPT, and the gradient-noise monitor reads the global gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_lowp.config import load_config
from megatron_lowp.device import get_device
from megatron_lowp.errors import UserError
from megatron_lowp.model import NGPT
from megatron_lowp.parallel.tensor_parallel import check_tp_shapes
from megatron_lowp.precision import build_recipe
from megatron_lowp.precision.tp_shard import LinearShard
from megatron_lowp.train.loop import Trainer
from tests.test_distributed import _free_port, assert_ngpt_weights_on_sphere, curve, launch

FP32 = "precision.autocast=false"  # BF16 rounding would hide reduction-order differences of 1e-7
# tiny/ngpt_bf16.yaml's nGPT settings on the test-sized model; lr 3e-2 so that 6 steps move the loss
NGPT_RUN = ["model.arch=ngpt", "model.init_std=0.125", "optim.weight_decay=0", "optim.lr=3e-2"]


def worst_relative(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and a
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def run_worker(repo, tmp_path, cases: list[str]) -> dict:
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(repo / "tests/tp_worker.py"), str(out), *cases]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_shards_quantize_and_compute_as_the_whole_tensors(repo, tmp_path):
    """2 ranks, float64: every quantized operand of a column- and a row-parallel linear, and the
    logits and gradients of a tiny Llama, equal the unsharded computation (a differently quantized
    element would show as ~1e-3..1e-1), with and without sequence parallelism; per-token Smooth-SwiGLU with a max over the local FFN
    channels only (the FP8 reference code's form) does not."""
    cases = ["linear:fp8", "linear:fp8_current", "linear:fp4", "model:bf16", "model:fp8_current", "model:fp4",
             "model:bf16:sp", "model:fp4:sp", "model:fp8_current:local_max", "model:fp4:local_max"]
    result = run_worker(repo, tmp_path, cases)
    for recipe in ("fp8", "fp8_current", "fp4"):
        r = result[f"linear:{recipe}"]
        assert r["column"] < 1e-12 and r["row"] < 1e-12, (recipe, r)
        assert r["column_sr_offset_equal"] and r["row_sr_offset_equal"], (recipe, r)  # the SR stream moves as at tp=1
    for recipe in ("bf16", "fp8_current", "fp4", "bf16:sp", "fp4:sp"):
        r = result[f"model:{recipe}"]
        assert r["logits"] < 1e-12, (recipe, r)
        for name, diff in r["per_grad"].items():
            # RMSNorm computes in FP32: with the sequence split, its weight gradient sums two halves (measured 1e-7)
            assert diff < (1e-6 if recipe.endswith("sp") and "norm" in name else 1e-12), (recipe, name, diff)
    for recipe in ("fp8_current", "fp4"):
        assert result[f"model:{recipe}:local_max"]["logits"] > 1e-4, result[f"model:{recipe}:local_max"]


def test_ngpt_shards_train_as_the_whole_model(repo, tmp_path):
    """2 ranks, float64 weights (nGPT's norms compute in FP32): a tiny nGPT split over tp trains 3
    steps (with its weight renormalization on the DTensor shards) as the unsharded one: logits, every
    gradient (s_qk, s_u, s_v and the alphas included) and every parameter within FP32 rounding
    (measured 2e-7), with and without sequence parallelism, in FP32 and in ngpt_fp4 (fixed tensor
    scales, SR gradients), gated and relu2; weights and hidden states stay on the unit sphere. FNGPT's
    N(.) over the local channels only (no tp sum) moves the logits by 1e-1."""
    cases = ["ngpt:bf16", "ngpt:bf16:sp", "ngpt:ngpt_fp4", "ngpt:ngpt_fp4:sp", "ngpt:bf16:relu2", "ngpt:bf16:local_norm"]
    result = run_worker(repo, tmp_path, cases)
    for case in cases[:-1]:
        r = result[case]
        assert r["logits"] < 1e-6 and r["params"] < 1e-6, (case, r)
        for name, diff in r["per_grad"].items():
            assert diff < 1e-6, (case, name, diff)
        assert r["off_sphere_before_renorm"] > 1e-3, (case, r)  # the steps did move the weights off the sphere
        assert r["weight_norm_error"] < 1e-5 and r["hidden_norm_error"] < 1e-5, (case, r)
        assert r["hidden_states_checked"] == 4, (case, r)  # 2 blocks x (input, output)
    assert result["ngpt:bf16:local_norm"]["logits"] > 1e-3, result["ngpt:bf16:local_norm"]


def test_gradient_noise_monitor_at_tp2_reads_the_global_gradient(repo, tmp_path):
    """The sqrt(3) monitor on a tp = 2 model (fp4's SR gradients, also with the replicated LM head
    quantized; nGPT's ngpt_fp4) reports what it reports for the unsharded model: shards' sums of
    squares added over tp, the replicated ones once (measured 1e-8 overall, 2e-7 per layer: FP32
    norms of the pieces)."""
    cases = ["noise:fp4", "noise:fp4:sp", "noise:fp4_lm_head:sp", "noise:ngpt_fp4:ngpt"]
    result = run_worker(repo, tmp_path, cases)
    for case in cases:
        r = result[case]
        assert r["params_equal"] and 1 < r["ratio_value"] < 100, (case, r)
        assert max(r["ratio"], r["grad_rms"], r["noise_std"]) < 1e-6 and r["per_layer"] < 1e-5, (case, r)


def test_an_arch_without_a_tensor_parallel_plan_is_refused(monkeypatch):
    monkeypatch.setattr(NGPT, "tensor_parallel", False)
    with pytest.raises(UserError, match=r"parallel.tp: 2: model.arch ngpt has no tensor-parallel plan \(it has: llama\)"):
        check_tp_shapes(load_config(None, ["model.arch=ngpt"]).model, 2)


@pytest.mark.parametrize("overrides, message", [
    (["parallel.tp=3"], "parallel.tp: 3 does not divide model.n_heads (4)"),
    (["parallel.tp=2", "model.n_kv_heads=1"], "parallel.tp: 2 does not divide model.n_kv_heads (1)"),
    (["parallel.tp=2", "parallel.engine=ddp"], "parallel.engine: 'ddp' does not compose with parallel.tp = 2"),
    (["parallel.tp=2", "parallel.engine=deepspeed"], "parallel.engine: 'deepspeed' does not compose"),
    (["parallel.tp=3", "model.arch=ngpt"], "parallel.tp: 3 does not divide model.n_heads (4)"),
    (["parallel.tp=2"], "parallel.tp: 2 does not divide WORLD_SIZE (1)"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=33"],
     "parallel.sequence_parallel: train.seq_len (33) must be a multiple of parallel.tp (2)"),
])
def test_tensor_parallel_mistakes_are_one_line_before_anything_starts(repo, tmp_path, overrides, message):
    cfg = load_config(repo / "recipes/quickstart.yaml", [f"run.out_dir={tmp_path}", "model.n_heads=4",
                                                          "model.n_kv_heads=2", "model.d_model=64", *overrides])
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Trainer(cfg)
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_shard_that_splits_nvfp4_blocks_is_refused():
    specs = build_recipe(load_config(None, ["precision.recipe=fp4"]), get_device("cpu")).specs
    LinearShard("column", torch.arange(48, 96), 96, None, None).check_blocks(specs, "layers.0.mlp.up")  # 3 blocks
    LinearShard("row", torch.arange(32, 64), 64, None, None).check_blocks(specs, "layers.0.mlp.down")
    with pytest.raises(UserError, match="parallel.tp: layers.0.mlp.up's shard splits the 16-element blocks of role"):
        LinearShard("column", torch.arange(20, 40), 40, None, None).check_blocks(specs, "layers.0.mlp.up")
    with pytest.raises(UserError, match="layers.0.mlp.down's shard splits the 16-element blocks of role w "):
        LinearShard("row", torch.arange(8, 16), 16, None, None).check_blocks(specs, "layers.0.mlp.down")


@pytest.fixture(scope="module")
def single_fp32(repo, tmp_path_factory):
    return launch(repo, tmp_path_factory.mktemp("single"), "single", 1, FP32)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, engine, extra", [
    (2, "single", []),  # tp = 2
    (4, "fsdp", ["parallel.fsdp_param_dtype=fp32"]),  # dp = 2 x tp = 2
    (2, "single", ["parallel.sequence_parallel=true"]),
    (4, "fsdp", ["parallel.fsdp_param_dtype=fp32", "parallel.sequence_parallel=true"]),
])
def test_tensor_parallel_trains_like_one_process(repo, tmp_path, single_fp32, nproc, engine, extra):
    run = launch(repo, tmp_path, "tp", nproc, FP32, "parallel.tp=2", f"parallel.engine={engine}", *extra)
    assert worst_relative(curve(run), curve(single_fp32)) < 1e-5
    assert worst_relative(curve(run, "val_loss"), curve(single_fp32, "val_loss")) < 1e-5
    # measured 2e-5: the one-process norm is torch's FP32 vector norm, itself 1e-4 off on the LM head
    assert worst_relative(curve(run, "grad_norm"), curve(single_fp32, "grad_norm")) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp8", "fp4"])
def test_quantized_recipes_at_tp2_follow_one_process(repo, tmp_path, recipe):
    one = launch(repo, tmp_path, "one", 1, FP32, f"precision.recipe={recipe}")
    run = launch(repo, tmp_path, "tp", 2, FP32, f"precision.recipe={recipe}", "parallel.tp=2")
    assert worst_relative(curve(run), curve(one)) < 1e-5


@pytest.mark.slow
def test_checkpoints_resume_across_tp_degrees(repo, tmp_path):
    """tp 2 -> stop at step 3 -> resume in one process, and 1 -> 2: the uninterrupted curve."""
    straight = launch(repo, tmp_path, "straight", 1, FP32)
    launch(repo, tmp_path, "down", 2, FP32, "parallel.tp=2", "train.stop_at_step=3")
    down = launch(repo, tmp_path, "down", 1, FP32)
    assert worst_relative(curve(down), curve(straight)) < 1e-5
    launch(repo, tmp_path, "up", 1, FP32, "train.stop_at_step=3")
    up = launch(repo, tmp_path, "up", 2, FP32, "parallel.tp=2")
    assert worst_relative(curve(up), curve(straight)) < 1e-5


@pytest.mark.slow
def test_checkpoints_resume_between_dp2_tp2_and_dp4(repo, tmp_path, single_fp32):
    """FSDP on a 2 x 2 mesh -> stop at step 3 -> FSDP over 4 ranks (tp 1), and back."""
    fsdp = [FP32, "parallel.engine=fsdp", "parallel.fsdp_param_dtype=fp32"]
    launch(repo, tmp_path, "mesh_to_dp", 4, *fsdp, "parallel.tp=2", "train.stop_at_step=3")
    to_dp = launch(repo, tmp_path, "mesh_to_dp", 4, *fsdp)
    assert worst_relative(curve(to_dp), curve(single_fp32)) < 1e-5
    launch(repo, tmp_path, "dp_to_mesh", 4, *fsdp, "train.stop_at_step=3")
    to_mesh = launch(repo, tmp_path, "dp_to_mesh", 4, *fsdp, "parallel.tp=2")
    assert worst_relative(curve(to_mesh), curve(single_fp32)) < 1e-5


@pytest.fixture(scope="module")
def ngpt_single(repo, tmp_path_factory):
    return launch(repo, tmp_path_factory.mktemp("ngpt_single"), "single", 1, FP32, *NGPT_RUN)


@pytest.mark.slow
@pytest.mark.parametrize("nproc, engine, extra", [
    (2, "single", []),  # tp = 2
    (2, "single", ["parallel.sequence_parallel=true"]),
    (4, "fsdp", ["parallel.fsdp_param_dtype=fp32"]),  # dp = 2 x tp = 2
])
def test_ngpt_at_tp2_trains_like_one_process(repo, tmp_path, ngpt_single, nproc, engine, extra):
    """nGPT in FP32: losses within 1e-5 (measured: equal), gradient norms within 1e-4 (measured 2.5e-5,
    as Llama's); FNGPT's norms over the local channels only would be 9e-5 off in loss and 8e-3 in
    gradient norm. The weights in the last checkpoint are on the unit sphere."""
    run = launch(repo, tmp_path, "tp", nproc, FP32, *NGPT_RUN, "parallel.tp=2", f"parallel.engine={engine}", *extra)
    assert worst_relative(curve(run), curve(ngpt_single)) < 1e-5
    assert worst_relative(curve(run, "val_loss"), curve(ngpt_single, "val_loss")) < 1e-5
    assert worst_relative(curve(run, "grad_norm"), curve(ngpt_single, "grad_norm")) < 1e-4
    assert_ngpt_weights_on_sphere(run / "checkpoints/step_6")


@pytest.mark.slow
def test_ngpt_fp4_at_tp2_follows_one_process(repo, tmp_path):
    """ngpt_fp4 (fixed tensor scales in the forward, SR gradients drawn at their global positions)."""
    one = launch(repo, tmp_path, "one", 1, FP32, *NGPT_RUN, "precision.recipe=ngpt_fp4")
    run = launch(repo, tmp_path, "tp", 2, FP32, *NGPT_RUN, "precision.recipe=ngpt_fp4", "parallel.tp=2")
    assert worst_relative(curve(run), curve(one)) < 1e-5


@pytest.mark.slow
def test_ngpt_resumes_from_tp2_in_one_process(repo, tmp_path, ngpt_single):
    launch(repo, tmp_path, "down", 2, FP32, *NGPT_RUN, "parallel.tp=2", "train.stop_at_step=3")
    down = launch(repo, tmp_path, "down", 1, FP32, *NGPT_RUN)
    assert worst_relative(curve(down), curve(ngpt_single)) < 1e-5
    assert worst_relative(curve(down, "grad_norm"), curve(ngpt_single, "grad_norm")) < 1e-4
