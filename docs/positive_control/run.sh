#!/usr/bin/env bash
# Re-creates every number of docs/POSITIVE_CONTROL.md: independent training against DML (with and without the
# shared distillation ramp-up of METHOD.md §8) in the converged small-data regime (`--preset small-data`),
# 5 seeds, on a CNN + ViT and on a CNN + CNN pair. From the repository root after the README's install:
#     bash docs/positive_control/run.sh [tune|cnn-vit|cnn-cnn|report]...   (default: all four, in that order)
# The two pair stages are independent: on the 2-core machine they were run side by side, one thread each
# (THREADS=1 bash docs/positive_control/run.sh cnn-vit & THREADS=1 bash docs/positive_control/run.sh cnn-cnn),
# which finishes the grid sooner than one after the other on two threads. Finished runs are reused (`compare`
# skips them), so a stage can be stopped and restarted.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=docs/positive_control
RUNS=$OUT/runs
SEEDS=(0 1 2 3 4)
RAMP=0.25            # the distillation weight reaches 1 after the first quarter of the steps
THREADS=${THREADS:-2}
COMMON=(--no-progress --no-plots --set train.cpu_threads="$THREADS")

stage_tune() {  # the schedule, once, for `independent`, on the held-out copy of the data (another digit split)
  for lr in 0.001 0.002; do
    dir=$RUNS/tune/independent_lr$lr
    if [ ! -f "$dir/metrics.json" ]; then
      ccl-bench train --preset small-data --method independent --out "$dir" --no-progress \
        --set data.options.seed=1 train.eval_interval=75 train.cpu_threads="$THREADS" optim.cnn.lr=$lr optim.vit.lr=$lr
    fi
  done
}
pair() {  # pair stage: preset, folder. Independent and DML for every seed first (the control itself), then DML
  # with the ramp-up; one seed at a time, so that an interrupted stage leaves whole pairs of runs
  for seed in "${SEEDS[@]}"; do
    ccl-bench compare --preset "$1" --methods independent,dml --seeds "$seed" --out "$RUNS/$2/plain" "${COMMON[@]}"
  done
  for seed in "${SEEDS[@]}"; do
    ccl-bench compare --preset "$1" --methods dml --seeds "$seed" --out "$RUNS/$2/ramp" "${COMMON[@]}" \
      --set train.distill_ramp=$RAMP
  done
}
stage_cnn-vit() { pair small-data cnn-vit; }
stage_cnn-cnn() { pair small-data-cnn-cnn cnn-cnn; }
stage_report() {
  for p in cnn-vit cnn-cnn; do  # the ramp-up runs come last: a grid still under way reports the plain runs
    folders=("$RUNS/$p/plain")
    [ -d "$RUNS/$p/ramp" ] && folders+=("$RUNS/$p/ramp")
    ccl-bench report "${folders[@]}" --out "$OUT/$p" --order "independent,dml,dml+ramp$RAMP" --complete-only
    ccl-bench report "${folders[@]}" --out "$OUT/$p/vs_dml" --baseline dml --order "dml,dml+ramp$RAMP,independent" \
      --complete-only --no-plots  # does the ramp-up change DML? (paired against plain DML)
  done
  for lr in 0.001 0.002; do  # the two tuning runs share method and seed: one table each
    python $OUT/curves.py "$RUNS/tune/independent_lr$lr" --curves --out "$OUT/tune_lr$lr.md"
  done
  for p in cnn-vit cnn-cnn; do
    python $OUT/curves.py "$RUNS/$p"/* --out "$OUT/$p/flatness.md"
  done
}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tune cnn-vit cnn-cnn report)
for stage in "${stages[@]}"; do "stage_$stage"; done
