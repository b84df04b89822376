#!/usr/bin/env bash
# The measured result of docs/results.md ("Does the probe's plan close the fp4 gap?"): a reduced tiny
# model (4 layers, d_model 64, FFN 176, 80 steps x 8 x 64 tokens: sized to run on 2 heavily shared
# CPU cores in about half an hour) trained in BF16, in fp4, and in fp4 with the plan a probe wrote at
# --bf16-budget 0.1 and with the naive plan of the same budget (the last linears); same seed, same
# tokens.
#   scripts/probe_plan_experiment.sh OUT_DIR [overrides...]
#   PLANS_FROM=FIRST_OUT_DIR scripts/probe_plan_experiment.sh OUT_DIR run.seed=1235   # a repeat with those plans
set -euo pipefail
OUT=${1:?usage: $0 OUT_DIR [overrides...]}; shift
SIZE=(model.d_model=64 model.n_heads=4 model.n_kv_heads=2 model.ffn_hidden_size=176 model.n_layers=4
      train.seq_len=64 train.micro_batch_size=8 train.global_batch_size=8 train.steps=80 optim.warmup_steps=8
      train.eval_every=40 train.eval_samples=32 train.eval_batch_size=16 train.log_every=10
      train.checkpoint_every=0 logging.progress=false run.out_dir="$OUT" "$@")
mkdir -p "$OUT"
PLANS=${PLANS_FROM:-$OUT}/probe
if [ -z "${PLANS_FROM:-}" ]; then
  # the probe: 16 of the 80 steps in fp4 (the same schedule), then one batch of 8 sequences probed
  megatron-lowp probe recipes/tiny/fp4.yaml "${SIZE[@]}" --steps 16 --bf16-budget 0.1 \
    --out "$OUT/probe" > "$OUT/probe.log" 2>&1 &
fi
megatron-lowp train recipes/tiny/bf16.yaml "${SIZE[@]}" run.name=bf16 > "$OUT/bf16.log" 2>&1 &
megatron-lowp train recipes/tiny/fp4.yaml "${SIZE[@]}" run.name=fp4 > "$OUT/fp4.log" 2>&1 &
[ -n "${PLANS_FROM:-}" ] || wait
megatron-lowp train recipes/tiny/fp4.yaml "${SIZE[@]}" run.name=fp4-probe-plan --plan "$PLANS/plan.yaml" \
  > "$OUT/fp4-probe-plan.log" 2>&1 &
megatron-lowp train recipes/tiny/fp4.yaml "${SIZE[@]}" run.name=fp4-naive-plan --plan "$PLANS/naive_plan.yaml" \
  > "$OUT/fp4-naive-plan.log" 2>&1 &
wait
python scripts/probe_plan_results.py "$OUT"
