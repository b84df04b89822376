"""The launchers in launch/: arguments reach the trainer intact, knobs become flags, usage errors.

Everything runs in dry-run mode (MEGATRON_LOWP_DRY_RUN=1: the script prints its command,
shell-quoted) or with a stub in place of python/srun/scontrol/nvidia-smi, so neither torchrun,
DeepSpeed, Slurm nor a GPU is needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["torchrun.sh", "deepspeed.sh", "gaudi.sh", "slurm.sbatch"]

# Arguments a shell would mangle if a script forgot its quotes somewhere.
TRICKY = [
    "run.name=my run",
    "data.path=/data/my corpus/*.bin",
    "run.note=$HOME and ${USER} and $(id)",
    "run.tag=it's \"quoted\"",
    "run.x=a;b|c&d `echo hi` \\back",
    "run.y=  two  spaces  ",
    "",
]

# Every knob the scripts read, removed so the caller's environment cannot leak into a test.
KNOBS = ["NPROC_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "RDZV_BACKEND",
         "PYTHON", "HOSTFILE", "DS_LAUNCHER", "HPU_MODE", "LAUNCHER", "PT_HPU_LAZY_MODE", "MEGATRON_LOWP_DRY_RUN"]


def _stub(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text(body)
    path.chmod(0o755)
    return path


@pytest.fixture
def stubs(tmp_path) -> Path:
    """A PATH directory whose nvidia-smi fails (no driver), so GPU detection is the same everywhere."""
    d = tmp_path / "bin"
    d.mkdir()
    _stub(d, "nvidia-smi", "#!/bin/sh\nexit 9\n")
    return d


@pytest.fixture
def recipe(tmp_path) -> str:
    # The scripts pass the recipe on; it need not exist. Spaces and a glob character in the path.
    return str(tmp_path / "my recipes" / "tiny [bf16].yaml")


def run(script: str, *args: str, stubs: Path, dry: bool = True, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
    full_env["PATH"] = f"{stubs}{os.pathsep}{full_env.get('PATH', '')}"
    if dry:
        full_env["MEGATRON_LOWP_DRY_RUN"] = "1"
    full_env.update(env)
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=full_env, capture_output=True, text=True,
                          timeout=60)


def argv_of(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # the whole command on one line
    return shlex.split(lines[0])


def flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def trainer_args(argv: list[str]) -> list[str]:
    """What follows `megatron_lowp`: the trainer's own command line."""
    return argv[argv.index("megatron_lowp") + 1:]


# --- every script ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_syntax_and_executable(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    assert os.access(path, os.X_OK), f"chmod +x {path}"
    text = path.read_text()
    assert text.startswith("#!") and "set -euo pipefail" in text


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args", [[], ["-h"], ["--help"]], ids=["no-recipe", "-h", "--help"])
def test_usage_exits_2(script, args, stubs):
    result = run(script, *args, stubs=stubs, SLURM_JOB_ID="1")
    assert result.returncode == 2
    assert "usage:" in result.stderr
    assert result.stdout == ""  # nothing launched, nothing printed as a command


# --- torchrun.sh ----------------------------------------------------------------------------------

def test_torchrun_single_node(stubs, recipe):
    argv = argv_of(run("torchrun.sh", recipe, *TRICKY, stubs=stubs))
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert flag(argv, "--nproc-per-node") == "1"  # nvidia-smi fails: one process
    assert "--standalone" in argv and "--rdzv-endpoint" not in argv
    assert argv[argv.index("megatron_lowp") - 1] == "-m"
    assert trainer_args(argv) == ["train", recipe, *TRICKY]


def test_torchrun_counts_gpus_with_nvidia_smi(stubs, recipe):
    _stub(stubs, "nvidia-smi", "#!/bin/sh\n[ \"$1\" = -L ] || exit 3\n"
          + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(4)))
    assert flag(argv_of(run("torchrun.sh", recipe, stubs=stubs)), "--nproc-per-node") == "4"
    assert flag(argv_of(run("torchrun.sh", recipe, stubs=stubs, NPROC_PER_NODE="2")), "--nproc-per-node") == "2"


def assert_second_of_two_nodes(argv: list[str], endpoint: str, rdzv_id: str) -> None:
    """torchrun's flags for node 1 of 2, 8 processes each, meeting at `endpoint` through c10d."""
    assert flag(argv, "--nnodes") == "2"
    assert flag(argv, "--node-rank") == "1"
    assert flag(argv, "--rdzv-backend") == "c10d"
    assert flag(argv, "--rdzv-endpoint") == endpoint
    assert flag(argv, "--rdzv-id") == rdzv_id
    assert flag(argv, "--nproc-per-node") == "8"


def test_torchrun_multi_node(stubs, recipe):
    argv = argv_of(run("torchrun.sh", recipe, *TRICKY, stubs=stubs, NNODES="2", NODE_RANK="1",
                       MASTER_ADDR="10.0.0.7", MASTER_PORT="29999", RDZV_ID="job 42", NPROC_PER_NODE="8"))
    assert_second_of_two_nodes(argv, endpoint="10.0.0.7:29999", rdzv_id="job 42")
    assert "--standalone" not in argv
    assert trainer_args(argv) == ["train", recipe, *TRICKY]


def test_torchrun_multi_node_defaults_from_slurm(stubs, recipe):
    argv = argv_of(run("torchrun.sh", recipe, stubs=stubs, NNODES="2", MASTER_ADDR="n0",
                       SLURM_NODEID="1", SLURM_JOB_ID="777", RDZV_BACKEND="static"))
    assert flag(argv, "--node-rank") == "1"
    assert flag(argv, "--rdzv-id") == "777"
    assert flag(argv, "--rdzv-backend") == "static"
    assert flag(argv, "--rdzv-endpoint") == "n0:29500"


def test_torchrun_multi_node_needs_master_addr(stubs, recipe):
    result = run("torchrun.sh", recipe, stubs=stubs, NNODES="2")
    assert result.returncode == 2 and "MASTER_ADDR" in result.stderr and result.stdout == ""


def test_torchrun_python_with_spaces(stubs, recipe):
    argv = argv_of(run("torchrun.sh", recipe, stubs=stubs, PYTHON="/opt/my venv/bin/python3"))
    assert argv[0] == "/opt/my venv/bin/python3"


@pytest.fixture
def fake_python(tmp_path) -> Path:
    """Stands in for python when the scripts really exec: reports its argv and the HPU mode."""
    return _stub(tmp_path, "fake python", f"#!{sys.executable}\nimport json, os, sys\n"
                 "print(json.dumps({'argv': sys.argv[1:], 'lazy': os.environ.get('PT_HPU_LAZY_MODE')}))\n")


@pytest.mark.parametrize("script,extra_env,engine", [
    ("torchrun.sh", {}, []),
    ("deepspeed.sh", {}, ["parallel.engine=deepspeed"]),
    ("gaudi.sh", {"HPU_MODE": "eager"}, ["device.type=hpu", "device.hpu_mode=eager"]),
    ("gaudi.sh", {"LAUNCHER": "deepspeed"}, ["parallel.engine=deepspeed", "device.type=hpu", "device.hpu_mode=lazy"]),
])
def test_real_exec_passes_arguments_intact(script, extra_env, engine, stubs, recipe, fake_python):
    # Not a dry run: the script execs $PYTHON, here a stub that prints what it was given.
    result = run(script, recipe, *TRICKY, stubs=stubs, dry=False, PYTHON=str(fake_python), **extra_env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert trainer_args(seen["argv"]) == ["train", recipe, *engine, *TRICKY]
    if script == "gaudi.sh":
        assert seen["lazy"] == ("0" if extra_env.get("HPU_MODE") == "eager" else "1")


# --- deepspeed.sh ---------------------------------------------------------------------------------

def test_deepspeed_defaults(stubs, recipe):
    argv = argv_of(run("deepspeed.sh", recipe, *TRICKY, stubs=stubs))
    assert argv[:3] == ["python", "-m", "deepspeed.launcher.runner"]
    assert flag(argv, "--hostfile") == "hostfile"
    assert flag(argv, "--master_port") == "29500"
    # Unset knobs are left to DeepSpeed (hostfile slots, CUDA_VISIBLE_DEVICES, hostname -I).
    for name in ("--num_nodes", "--num_gpus", "--master_addr", "--launcher"):
        assert name not in argv
    # The launcher's own options come before the module; ours after it.
    i = argv.index("megatron_lowp")
    assert {"--module", "--no_local_rank"} <= set(argv[:i])
    assert trainer_args(argv) == ["train", recipe, "parallel.engine=deepspeed", *TRICKY]


def test_deepspeed_multi_node(stubs, recipe, tmp_path):
    hostfile = str(tmp_path / "my hosts" / "hostfile")
    argv = argv_of(run("deepspeed.sh", recipe, *TRICKY, stubs=stubs, HOSTFILE=hostfile, NNODES="2",
                       NPROC_PER_NODE="4", MASTER_ADDR="worker-1", MASTER_PORT="12345", DS_LAUNCHER="openmpi"))
    assert flag(argv, "--hostfile") == hostfile
    assert flag(argv, "--num_nodes") == "2"
    assert flag(argv, "--num_gpus") == "4"
    assert flag(argv, "--master_addr") == "worker-1"
    assert flag(argv, "--master_port") == "12345"
    assert flag(argv, "--launcher") == "openmpi"
    assert trainer_args(argv) == ["train", recipe, "parallel.engine=deepspeed", *TRICKY]


def test_hostfile_example_is_deepspeed_format():
    lines = [ln.strip() for ln in (LAUNCH / "hostfile.example").read_text().splitlines()]
    hosts = [ln for ln in lines if ln and not ln.startswith("#")]
    assert len(hosts) >= 2
    # The pattern deepspeed.launcher.runner parses a hostfile with.
    assert all(re.match(r"^(\S+)\s+slots=(\d+)$", ln) for ln in hosts), hosts


# --- gaudi.sh -------------------------------------------------------------------------------------

def test_gaudi_torchrun(stubs, recipe):
    result = run("gaudi.sh", recipe, *TRICKY, stubs=stubs)
    argv = argv_of(result)
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert flag(argv, "--nproc-per-node") == "8"
    assert trainer_args(argv) == ["train", recipe, "device.type=hpu", "device.hpu_mode=lazy", *TRICKY]
    assert "PT_HPU_LAZY_MODE=1" in result.stderr


def test_gaudi_eager_and_multi_node(stubs, recipe):
    result = run("gaudi.sh", recipe, stubs=stubs, HPU_MODE="eager", NPROC_PER_NODE="4", NNODES="2",
                 MASTER_ADDR="hls-0")
    argv = argv_of(result)
    assert "PT_HPU_LAZY_MODE=0" in result.stderr
    assert flag(argv, "--nproc-per-node") == "4"
    assert flag(argv, "--rdzv-endpoint") == "hls-0:29500"
    assert "device.hpu_mode=eager" in trainer_args(argv)


def test_gaudi_deepspeed(stubs, recipe):
    argv = argv_of(run("gaudi.sh", recipe, *TRICKY, stubs=stubs, LAUNCHER="deepspeed", HOSTFILE="hosts"))
    assert argv[:3] == ["python", "-m", "deepspeed.launcher.runner"]
    assert flag(argv, "--hostfile") == "hosts"
    assert "--num_gpus" not in argv  # the hostfile's slots decide
    assert trainer_args(argv) == ["train", recipe, "parallel.engine=deepspeed", "device.type=hpu",
                                  "device.hpu_mode=lazy", *TRICKY]


@pytest.mark.parametrize("env", [{"HPU_MODE": "graph"}, {"LAUNCHER": "mpirun"}])
def test_gaudi_rejects_bad_knobs(stubs, recipe, env):
    result = run("gaudi.sh", recipe, stubs=stubs, **env)
    assert result.returncode == 2 and next(iter(env)) in result.stderr and result.stdout == ""


# --- slurm.sbatch ---------------------------------------------------------------------------------

SLURM_ENV = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NNODES": "2",
             "SLURM_CPUS_PER_TASK": "32", "SLURM_GPUS_ON_NODE": "8", "SLURM_SUBMIT_DIR": str(REPO)}


@pytest.fixture
def slurm_stubs(stubs) -> Path:
    # scontrol expands the node list; it must be asked exactly this.
    _stub(stubs, "scontrol", '#!/bin/sh\n[ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] || exit 3\n'
          "echo gpu-07\necho gpu-08\n")
    # srun on "one node": drop srun's own --options, run the rest.
    _stub(stubs, "srun", '#!/bin/bash\nwhile [[ $1 == -* ]]; do shift; done\nexec "$@"\n')
    return stubs


def test_slurm_header():
    header = [ln.split(None, 1)[1] for ln in (LAUNCH / "slurm.sbatch").read_text().splitlines()
              if ln.startswith("#SBATCH")]
    assert "--ntasks-per-node=1" in header and "--exclusive" in header
    assert "--output=logs/%x-%j.out" in header
    assert any(h.startswith("--nodes=") for h in header)
    assert any(h.startswith("--gpus-per-node=") for h in header)


def test_slurm_srun_command(slurm_stubs, recipe):
    argv = argv_of(run("slurm.sbatch", recipe, *TRICKY, stubs=slurm_stubs, **SLURM_ENV))
    assert argv[0] == "srun"
    assert "--ntasks-per-node=1" in argv and "--nodes=2" in argv and "--cpus-per-task=32" in argv
    env_part = argv[argv.index("env"):argv.index("bash")]
    assert {"NNODES=2", "MASTER_ADDR=gpu-07", "MASTER_PORT=29500", "RDZV_ID=4242", "NPROC_PER_NODE=8"} <= set(env_part)
    assert argv[argv.index("bash") + 1:] == [str(LAUNCH / "torchrun.sh"), recipe, *TRICKY]


def test_slurm_each_node_runs_torchrun(slurm_stubs, recipe):
    """Run the printed srun command as the second node would: torchrun gets that node's rank."""
    srun_argv = argv_of(run("slurm.sbatch", recipe, *TRICKY, stubs=slurm_stubs, **SLURM_ENV))
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and not k.startswith("SLURM_")}
    env.update(SLURM_ENV, PATH=f"{slurm_stubs}{os.pathsep}{os.environ['PATH']}", MEGATRON_LOWP_DRY_RUN="1",
               SLURM_NODEID="1", NODE_RANK="5")  # a stale NODE_RANK must not win over SLURM_NODEID
    result = subprocess.run(srun_argv, env=env, capture_output=True, text=True, timeout=60)
    argv = argv_of(result)
    assert argv[:3] == ["python", "-m", "torch.distributed.run"]
    assert_second_of_two_nodes(argv, endpoint="gpu-07:29500", rdzv_id="4242")
    assert trainer_args(argv) == ["train", recipe, *TRICKY]


def test_slurm_outside_a_job(stubs, recipe):
    result = run("slurm.sbatch", recipe, stubs=stubs)
    assert result.returncode == 2 and "sbatch" in result.stderr and result.stdout == ""
