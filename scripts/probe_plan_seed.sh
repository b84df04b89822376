#!/usr/bin/env bash
# Another seed of scripts/probe_plan_experiment.sh with the plans its probe wrote (same size, same
# plans): scripts/probe_plan_seed.sh FIRST_OUT OUT SEED
set -euo pipefail
FIRST=${1:?usage: $0 FIRST_OUT OUT SEED}; OUT=${2:?}; SEED=${3:?}
SIZE=(model.d_model=64 model.n_heads=4 model.n_kv_heads=2 model.ffn_hidden_size=176 model.n_layers=4
      train.seq_len=64 train.micro_batch_size=8 train.global_batch_size=8 train.steps=80 optim.warmup_steps=8
      train.eval_every=40 train.eval_samples=32 train.eval_batch_size=16 train.log_every=10
      train.checkpoint_every=0 logging.progress=false run.out_dir="$OUT" run.seed="$SEED")
mkdir -p "$OUT"
megatron-lowp train recipes/tiny/bf16.yaml "${SIZE[@]}" run.name=bf16 > "$OUT/bf16.log" 2>&1 &
megatron-lowp train recipes/tiny/fp4.yaml "${SIZE[@]}" run.name=fp4 > "$OUT/fp4.log" 2>&1 &
wait
megatron-lowp train recipes/tiny/fp4.yaml "${SIZE[@]}" run.name=fp4-probe-plan --plan "$FIRST/probe/plan.yaml" \
  > "$OUT/fp4-probe-plan.log" 2>&1 &
megatron-lowp train recipes/tiny/fp4.yaml "${SIZE[@]}" run.name=fp4-naive-plan --plan "$FIRST/probe/naive_plan.yaml" \
  > "$OUT/fp4-naive-plan.log" 2>&1 &
wait
