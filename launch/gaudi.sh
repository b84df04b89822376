#!/usr/bin/env bash
# Intel Gaudi (HPU) launcher: sets the HPU execution mode, then hands over to torchrun.sh (one
# process per HPU) or, with LAUNCHER=deepspeed, to deepspeed.sh (Habana's DeepSpeed fork has the
# same launcher). Those scripts' variables (NNODES, MASTER_ADDR, HOSTFILE, ...) apply here too.
set -euo pipefail

usage() {
  cat >&2 <<'USAGE'
usage: launch/gaudi.sh RECIPE.yaml [section.key=value ...]

Adds the overrides device.type=hpu device.hpu_mode=$HPU_MODE (before yours).
Environment (default in brackets):
  HPU_MODE        lazy (graphs, PT_HPU_LAZY_MODE=1) or eager (PT_HPU_LAZY_MODE=0, for torch.compile) [lazy]
  NPROC_PER_NODE  processes per node, one per HPU [8 with torchrun; DeepSpeed: hostfile slots]
  LAUNCHER        torchrun or deepspeed [torchrun]
  MEGATRON_LOWP_DRY_RUN=1  print the command, shell-quoted, instead of running it
plus the variables of launch/torchrun.sh or launch/deepspeed.sh (run them with -h).
USAGE
  exit 2
}

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
recipe=$1
shift

HPU_MODE=${HPU_MODE:-lazy}
case $HPU_MODE in
  lazy) lazy=1 ;;
  eager) lazy=0 ;;
  *) echo "launch/gaudi.sh: HPU_MODE must be lazy or eager, not '$HPU_MODE'" >&2; exit 2 ;;
esac
LAUNCHER=${LAUNCHER:-torchrun}
case $LAUNCHER in
  torchrun | deepspeed) ;;
  *) echo "launch/gaudi.sh: LAUNCHER must be torchrun or deepspeed, not '$LAUNCHER'" >&2; exit 2 ;;
esac

# The mode must be set before habana_frameworks is first imported, so it goes in the environment
# of every worker. device.hpu_mode says the same in the recipe (and reaches nodes that a pdsh
# launch starts without this variable: DeepSpeed forwards only some variables).
export PT_HPU_LAZY_MODE=$lazy
# A Gaudi server has 8 HPUs, and nvidia-smi (torchrun.sh's default) sees none. DeepSpeed takes the
# count from the hostfile's slots or the devices it finds, so it keeps an unset NPROC_PER_NODE.
if [[ $LAUNCHER == torchrun ]]; then export NPROC_PER_NODE=${NPROC_PER_NODE:-8}; fi

if [[ ${MEGATRON_LOWP_DRY_RUN:-0} == 1 ]]; then
  echo "# PT_HPU_LAZY_MODE=$PT_HPU_LAZY_MODE" >&2
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec bash "$here/$LAUNCHER.sh" "$recipe" device.type=hpu device.hpu_mode="$HPU_MODE" "$@"
