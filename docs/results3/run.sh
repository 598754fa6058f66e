#!/usr/bin/env bash
# Re-creates every number of docs/RESULTS.md (third edition): the head-to-head in the converged small-data
# regime of docs/POSITIVE_CONTROL.md. From the repository root after the README's install:
#     bash docs/results3/run.sh [STAGE]...   stages: cnn-vit tune cnn-vit-tuned ablations cnn-cnn cost report
#                                             (default: all, in that order)
# Runs go two at a time, one thread each (PARALLEL=2 THREADS=1, measured faster on the 2-core machine than one
# 2-thread run after another). A finished run is reused and a started one resumed, so a stage can be stopped
# (SIGTERM) and restarted; the independent and DML runs of the positive control are reused as they are (same
# preset, seeds, held-out slice and engine).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=docs/results3
RUNS=${RUNS:-$OUT/runs}   # absolute paths: runs and studies written elsewhere (a grid run from another checkout)
TUNE=${TUNE:-$OUT/tune}
SEEDS=(0 1 2 3 4)
PARALLEL=${PARALLEL:-2}
THREADS=${THREADS:-1}
KDCL=(kdcl-naive kdcl-linear kdcl-minlogit kdcl-general)
TRIALS=8            # the same tuning budget for every method

job() {  # job PRESET METHOD_SPEC SEED DIR [ccl-bench train ARGS...]: one run, skipped when finished, resumed
  local preset=$1 spec=$2 seed=$3 dir=$4; shift 4
  if [ -f "$dir/metrics.json" ] && grep -q '"complete": true' "$dir/metrics.json"; then return 0; fi
  local resume=()
  [ -f "$dir/config.yaml" ] && resume=(--resume)
  mkdir -p "$(dirname "$dir")"
  ccl-bench train --preset "$preset" --method "$spec" --seed "$seed" --out "$dir" --no-progress "${resume[@]}" \
    --set train.cpu_threads="$THREADS" "$@" > "$dir.out" 2>&1 || { echo "FAILED: $dir (see $dir.out)" >&2; return 1; }
}
export -f job; export THREADS

queue() { xargs -P "$PARALLEL" -L 1 bash -c 'job "$@"' job; }  # one job per line, PARALLEL at a time

stage_cnn-vit() {  # the main table's default rows: every method but independent and DML (the positive control's)
  for seed in "${SEEDS[@]}"; do for m in ccl "${KDCL[@]}"; do
    echo small-data "$m" "$seed" "$RUNS/cnn-vit/defaults/$m/seed$seed"
  done; done | queue
}

stage_tune() {  # each method's own knobs, TRIALS trials each, on the held-out copy (data.options.seed=1), seed 0
  mkdir -p "$TUNE"
  printf '%s\n' ccl dml "${KDCL[@]}" | xargs -P "$PARALLEL" -I{} sh -c "ccl-bench tune --preset small-data \
    --method {} --trials $TRIALS --held-out data.options.seed=1 --out $TUNE/{} --no-progress \
    --set train.cpu_threads=$THREADS > $TUNE/{}.out 2>&1 || echo FAILED: tune {} >&2"
}

stage_cnn-vit-tuned() {  # the main table's tuned rows: the frozen best.yaml of each method
  for seed in "${SEEDS[@]}"; do for m in ccl dml "${KDCL[@]}"; do
    echo small-data "$m" "$seed" "$RUNS/cnn-vit/tuned/$m/seed$seed" --config "$TUNE/$m/best.yaml"
  done; done | queue
}

stage_cnn-cnn() {  # the homogeneous control, each method's defaults
  for seed in "${SEEDS[@]}"; do for m in ccl "${KDCL[@]}"; do
    echo small-data-cnn-cnn "$m" "$seed" "$RUNS/cnn-cnn/defaults/$m/seed$seed"
  done; done | queue
}

ABLATIONS=(  # CCL's options changed over its tuned weights (the full method: the tuned rows' seeds 0-2)
  hfd=false rbsd=false pbsd=false                                          # each term removed
  "rbsd=false pbsd=false" "hfd=false pbsd=false" "hfd=false rbsd=false"    # each term alone
  rule=confidence "region=[32,32]"                                         # the pixel rule, the region size
)
stage_ablations() {
  for seed in "${SEEDS[@]:0:3}"; do for a in "${ABLATIONS[@]}"; do
    local label="ccl+tuned:${a// /:}" sets=()
    for o in $a; do sets+=("methods.ccl.$o"); done
    echo small-data ccl "$seed" "$RUNS/ablations/$(tr -c 'A-Za-z0-9=+.\n-' _ <<< "$label")/seed$seed" \
      --config "$TUNE/ccl/best.yaml" --label "$label" --set "${sets[@]}"
  done; done | queue
}

stage_cost() {  # seconds per step per method on one fixed batch, both cores, nothing else running
  ccl-bench overhead --preset small-data --methods "independent,dml,ccl,$(IFS=,; echo "${KDCL[*]}")" \
    --steps 30 --warmup 5 --out "$OUT/cost.csv" | tee "$OUT/cost.md"
}

stage_report() {  # every table and plot of docs/RESULTS.md from the finished runs (a grid under way: those done)
  local pc=docs/positive_control/runs/cnn-vit/plain pcc=docs/positive_control/runs/cnn-cnn/plain
  local defaults=("$pc/independent" "$pc/dml" "$RUNS/cnn-vit/defaults")
  local order="independent,dml,$(IFS=,; echo "${KDCL[*]}"),ccl"
  report() { ccl-bench report "$@" --complete-only > /dev/null; }
  report "${defaults[@]}" --out "$OUT/cnn-vit" --order "$order" --no-plots
  report "${defaults[@]}" --out "$OUT/cnn-vit/vs_ccl" --baseline ccl --order "ccl,$order" --no-plots
  report "$pc/independent" "$pc/dml" "$RUNS/cnn-vit/defaults/ccl" --out "$OUT/cnn-vit/curves" --order "$order"
  if [ -d "$RUNS/cnn-vit/tuned" ]; then
    local tuned_order="independent,$(sed 's/,/+tuned,/g; s/$/+tuned/' <<< "dml,$(IFS=,; echo "${KDCL[*]}"),ccl")"
    report "$pc/independent" "$RUNS/cnn-vit/tuned" --out "$OUT/cnn-vit/tuned" --order "$tuned_order" --no-plots
    report "$RUNS/cnn-vit/tuned" --out "$OUT/cnn-vit/tuned/vs_ccl" --baseline ccl+tuned --no-plots \
      --order "ccl+tuned,$tuned_order"
    python "$OUT/tuning_gain.py" "${defaults[@]}" --tuned "$RUNS/cnn-vit/tuned" --order "${order#independent,}" \
      --out "$OUT/cnn-vit/tuned/vs_defaults.md" > /dev/null
  fi
  [ -d "$TUNE" ] && python "$OUT/tune_table.py" "$TUNE" --out "$OUT/tune.md" > /dev/null
  # the ablations against tuned CCL, then against independent training and DML; every row on the ablations' seeds (0-2)
  [ -d "$RUNS/ablations" ] && report "$RUNS"/cnn-vit/tuned/ccl/seed{0,1,2} "$RUNS/ablations" --out "$OUT/ablations" \
    --baseline ccl+tuned --order ccl+tuned --no-plots
  [ -d "$RUNS/ablations" ] && report "$pc"/{independent,dml}/seed{0,1,2} "$RUNS"/cnn-vit/tuned/{dml,ccl}/seed{0,1,2} \
    "$RUNS/ablations" --out "$OUT/ablations/vs_independent" --order independent,dml,dml+tuned,ccl+tuned --no-plots
  [ -d "$RUNS/cnn-cnn" ] && report "$pcc/independent" "$pcc/dml" "$RUNS/cnn-cnn/defaults" --out "$OUT/cnn-cnn" \
    --order "$order" --no-plots
  [ -d "$RUNS/cnn-cnn" ] && report "$pcc/independent" "$pcc/dml" "$RUNS/cnn-cnn/defaults" \
    --out "$OUT/cnn-cnn/vs_ccl" --baseline ccl --order "ccl,$order" --no-plots
  return 0
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(cnn-vit tune cnn-vit-tuned ablations cnn-cnn cost report)
for stage in "${stages[@]}"; do "stage_$stage"; done
