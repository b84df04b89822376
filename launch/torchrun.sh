#!/usr/bin/env bash
# torchrun launcher for megatron-lowp: one process per accelerator, on one node or many.
# Run it once on every node (slurm.sbatch does that for you). See docs/launch.md.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: launch/torchrun.sh RECIPE.yaml [section.key=value ...]

Environment (default in brackets):
  NPROC_PER_NODE  processes on this node [GPUs listed by `nvidia-smi -L`, else 1]
  NNODES          nodes in the job [1]; above 1, every node runs this script
  NODE_RANK       this node's rank, 0..NNODES-1 [SLURM_NODEID, else 0]
  MASTER_ADDR     host of the rendezvous (node 0's address); required when NNODES > 1
  MASTER_PORT     its port [29500]
  RDZV_ID         job id, the same on every node [SLURM_JOB_ID, else megatron-lowp]
  RDZV_BACKEND    c10d (ranks assigned as nodes join) or static (by NODE_RANK) [c10d]
  PYTHON          the python whose torch and megatron_lowp run [python]
  MEGATRON_LOWP_DRY_RUN=1  print the command, shell-quoted, instead of running it

example (CPU): NPROC_PER_NODE=2 launch/torchrun.sh recipes/quickstart.yaml parallel.engine=ddp train.micro_batch_size=8
USAGE
  exit 2
}

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
recipe=$1
shift

gpu_count() {
  local n=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    # `|| true`: no driver, or no GPU line, must mean "no GPUs", not abort under pipefail.
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  fi
  echo $(( ${n:-0} > 0 ? ${n:-0} : 1 ))
}

NPROC_PER_NODE=${NPROC_PER_NODE:-$(gpu_count)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-megatron-lowp}}
RDZV_BACKEND=${RDZV_BACKEND:-c10d}
PYTHON=${PYTHON:-python}

# `python -m torch.distributed.run` is torchrun, but with the torch of $PYTHON (the venv's),
# not whichever `torchrun` happens to come first on PATH.
cmd=("$PYTHON" -m torch.distributed.run --nproc-per-node "$NPROC_PER_NODE")
if [[ $NNODES == 1 ]]; then
  # A private rendezvous on a free port: two single-node jobs on one machine cannot collide.
  cmd+=(--standalone)
else
  if [[ -z $MASTER_ADDR ]]; then
    echo "launch/torchrun.sh: NNODES=$NNODES needs MASTER_ADDR (node 0's address)" >&2
    exit 2
  fi
  # Every node meets at MASTER_ADDR:MASTER_PORT under the same RDZV_ID; with c10d the ranks
  # follow the order in which nodes join, NODE_RANK only matters for RDZV_BACKEND=static.
  cmd+=(--nnodes "$NNODES" --node-rank "$NODE_RANK"
        --rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID")
fi
cmd+=(-m megatron_lowp train "$recipe" "$@")

if [[ ${MEGATRON_LOWP_DRY_RUN:-0} == 1 ]]; then
  printf '%q' "${cmd[0]}"; printf ' %q' "${cmd[@]:1}"; echo
else
  # Check the recipe once, here, before any rank starts: a mistake in it is one line and status 2,
  # not one line per rank followed by the launcher's failure report.
  PYTHONWARNINGS=ignore "$PYTHON" -m megatron_lowp config "$recipe" "$@" >/dev/null || exit $?
  exec "${cmd[@]}"
fi
