#!/usr/bin/env bash
# Re-creates every number of docs/K_PEERS.md: independent training, DML, KDCL-MinLogit and CCL with two, three and
# four students in the converged small-data regime, 3 seeds, and the cost of a step against K. From the
# repository root after the README's install:
#     bash docs/kpeers/run.sh [runs|cost|kernels|report]...     (default: all four, in that order)
# The two-student rows are the third edition's runs (docs/results3, docs/positive_control: the same preset,
# seeds and engine arithmetic). Runs go two at a time, one thread each; a finished run is reused, a started one
# resumed (SIGTERM stops a run at a checkpoint).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=docs/kpeers
RUNS=${RUNS:-$OUT/runs}
SEEDS=(0 1 2)
METHODS=(independent dml kdcl-minlogit ccl)
PARALLEL=${PARALLEL:-2}
THREADS=${THREADS:-1}

job() {  # job PRESET METHOD SEED DIR: one run, skipped when finished, resumed when started
  local preset=$1 method=$2 seed=$3 dir=$4
  if [ -f "$dir/metrics.json" ] && grep -q '"complete": true' "$dir/metrics.json"; then return 0; fi
  local resume=()
  [ -f "$dir/config.yaml" ] && resume=(--resume)
  mkdir -p "$(dirname "$dir")"
  ccl-bench train --preset "$preset" --method "$method" --seed "$seed" --out "$dir" --no-progress "${resume[@]}" \
    --set train.cpu_threads="$THREADS" > "$dir.out" 2>&1 || { echo "FAILED: $dir (see $dir.out)" >&2; return 1; }
}
export -f job; export THREADS

stage_runs() {  # three students first (the cheaper), seed by seed
  for k in 3 4; do for seed in "${SEEDS[@]}"; do for m in "${METHODS[@]}"; do
    echo "small-data-k$k $m $seed $RUNS/k$k/$m/seed$seed"
  done; done; done | xargs -P "$PARALLEL" -L 1 bash -c 'job "$@"' job
}

# HFD over a list of pairs that grows linearly with K (each CNN with one ViT, both ways; an odd one out one way),
# against METHOD.md §9's default of every ordered CNN-ViT pair (2, 4 and 8 pairs for K = 2, 3, 4).
declare -A LINEAR_HFD=([small-data]="[[0,1],[1,0]]" [small-data-k3]="[[0,2],[2,0],[1,2]]"
                       [small-data-k4]="[[0,2],[2,0],[1,3],[3,1]]")
stage_cost() {  # seconds per step per method and K on one fixed batch, both cores, nothing else running
  local methods
  methods=$(IFS=,; echo "${METHODS[*]}")
  for preset in small-data small-data-k3 small-data-k4; do
    ccl-bench overhead --preset "$preset" --methods "$methods" --steps 20 --warmup 3 --out "$OUT/cost_$preset.csv"
    ccl-bench overhead --preset "$preset" --methods independent,ccl --steps 20 --warmup 3 \
      --set "methods.ccl.hfd_pairs=${LINEAR_HFD[$preset]}" --out "$OUT/cost_${preset}_linear_hfd.csv"
  done
}

stage_kernels() {  # the K-student selective KL alone against K: fused, eager and torch.compile of its reference
  for k in 2 3 4 8; do
    ccl-bench kernels --ops pixel_selective_kl_peers --students "$k" --shapes 16x21x64x64 --reps 10 \
      --out "$OUT/kernels_k$k" > /dev/null
  done
}

stage_report() {
  local two=(docs/positive_control/runs/cnn-vit/plain/{independent,dml}/seed{0,1,2}  # K = 2: the same seeds 0-2
             docs/results3/runs/cnn-vit/defaults/{kdcl-minlogit,ccl}/seed{0,1,2})
  ccl-bench report "${two[@]}" --out "$OUT/k2" --order "$(IFS=,; echo "${METHODS[*]}")" --complete-only --no-plots \
    > /dev/null
  for k in 3 4; do
    [ -d "$RUNS/k$k" ] && ccl-bench report "$RUNS/k$k" --out "$OUT/k$k" --order "$(IFS=,; echo "${METHODS[*]}")" \
      --complete-only > /dev/null
  done
  return 0
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(runs cost kernels report)
for stage in "${stages[@]}"; do "stage_$stage"; done
