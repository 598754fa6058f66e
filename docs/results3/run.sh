#!/usr/bin/env bash
# Re-creates every number of docs/RESULTS.md (third edition): the head-to-head in the converged small-data
# regime of docs/POSITIVE_CONTROL.md. From the repository root after the README's install:
#     bash docs/results3/run.sh [STAGE]...      stages: cnn-vit (default: all, in the order below)
# Runs go two at a time, one thread each (PARALLEL=2 THREADS=1, measured faster on the 2-core machine than one
# 2-thread run after another). A finished run is reused and a started one resumed, so a stage can be stopped
# (SIGTERM) and restarted; the independent and DML runs of the positive control are reused as they are (same
# preset, seeds, held-out slice and engine).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=docs/results3
RUNS=${RUNS:-$OUT/runs}   # absolute path: runs written elsewhere (a grid run from another checkout)
SEEDS=(0 1 2 3 4)
PARALLEL=${PARALLEL:-2}
THREADS=${THREADS:-1}
KDCL=(kdcl-naive kdcl-linear kdcl-minlogit kdcl-general)

job() {  # job PRESET METHOD_SPEC SEED DIR [KEY=VALUE...]: one run, skipped when finished, resumed when started
  local preset=$1 spec=$2 seed=$3 dir=$4; shift 4
  local sets=(train.cpu_threads="$THREADS" "$@")
  if [ -f "$dir/metrics.json" ] && grep -q '"complete": true' "$dir/metrics.json"; then return 0; fi
  local resume=()
  [ -f "$dir/config.yaml" ] && resume=(--resume)
  ccl-bench train --preset "$preset" --method "$spec" --seed "$seed" --out "$dir" --no-progress \
    "${resume[@]}" --set "${sets[@]}" > "$dir.out" 2>&1 || { echo "FAILED: $dir (see $dir.out)" >&2; return 1; }
}
export -f job; export THREADS

queue() { xargs -P "$PARALLEL" -L 1 bash -c 'mkdir -p "$(dirname "$4")"; job "$@"' job; }

stage_cnn-vit() {  # the main table's default rows: every method but independent and DML (the positive control's)
  for seed in "${SEEDS[@]}"; do for m in ccl "${KDCL[@]}"; do
    echo small-data "$m" "$seed" "$RUNS/cnn-vit/defaults/$m/seed$seed"
  done; done | queue
}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(cnn-vit)
for stage in "${stages[@]}"; do "stage_$stage"; done
