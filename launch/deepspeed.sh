#!/usr/bin/env bash
# DeepSpeed launcher for megatron-lowp (parallel.engine=deepspeed). Run it once, on the first
# node: the launcher reaches the other nodes of the hostfile over ssh (pdsh). See docs/launch.md.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: launch/deepspeed.sh RECIPE.yaml [section.key=value ...]

Runs: deepspeed --module megatron_lowp train RECIPE.yaml parallel.engine=deepspeed [overrides]
Environment (default in brackets; empty means the launcher's own default):
  HOSTFILE        "host slots=N" lines (launch/hostfile.example) [hostfile]; when the file is
                  missing DeepSpeed runs on this node only
  NNODES          use the first NNODES hosts of the hostfile [all of them]
  NPROC_PER_NODE  processes (GPUs/HPUs) per node [every slot of the hostfile, or every local device]
  MASTER_ADDR     address of the first node [the launcher asks it: ssh HOST hostname -I]
  MASTER_PORT     port for torch.distributed [29500]
  DS_LAUNCHER     multi-node backend: pdsh, openmpi, mvapich, slurm, ... [pdsh]
  PYTHON          the python whose deepspeed and megatron_lowp run [python]
  MEGATRON_LOWP_DRY_RUN=1  print the command, shell-quoted, instead of running it
USAGE
  exit 2
}

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
recipe=$1
shift

HOSTFILE=${HOSTFILE:-hostfile}
NNODES=${NNODES:-}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
DS_LAUNCHER=${DS_LAUNCHER:-}
PYTHON=${PYTHON:-python}

# `python -m deepspeed.launcher.runner` is the `deepspeed` command, with $PYTHON's packages;
# the launcher starts the workers with the same interpreter.
cmd=("$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
# Only pass what was set: --num_nodes/--num_gpus make DeepSpeed ignore CUDA_VISIBLE_DEVICES.
if [[ -n $NNODES ]]; then cmd+=(--num_nodes "$NNODES"); fi
if [[ -n $NPROC_PER_NODE ]]; then cmd+=(--num_gpus "$NPROC_PER_NODE"); fi
if [[ -n $MASTER_ADDR ]]; then cmd+=(--master_addr "$MASTER_ADDR"); fi
if [[ -n $DS_LAUNCHER ]]; then cmd+=(--launcher "$DS_LAUNCHER"); fi
# --module: run `python -m megatron_lowp`; --no_local_rank: the trainer reads LOCAL_RANK from the
# environment, and our CLI would reject the --local_rank=N argument DeepSpeed adds otherwise.
# parallel.engine=deepspeed comes before the user's overrides, which win.
cmd+=(--module --no_local_rank megatron_lowp train "$recipe" parallel.engine=deepspeed "$@")

if [[ ${MEGATRON_LOWP_DRY_RUN:-0} == 1 ]]; then
  printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; echo
else
  # Check the recipe once, here, before any rank starts: a mistake in it is one line and status 2,
  # not one line per rank followed by the launcher's failure report.
  PYTHONWARNINGS=ignore "$PYTHON" -m megatron_lowp config "$recipe" parallel.engine=deepspeed "$@" >/dev/null || exit $?
  exec "${cmd[@]}"
fi
