#!/usr/bin/env bash
# Re-creates every training number of docs/RESULTS.md (2 CPU cores: ~2 hours). From the repository root after
# the README's install:   bash docs/results/run.sh [main|ablations|cost|report]...   (default: all four)
# Runs land in docs/results/runs/<table>/<method>/seed<k>/ (config.yaml, evals.csv, metrics.json, steps.csv;
# checkpoints are git-ignored). Finished runs are reused, so the script can be stopped and restarted.
set -euo pipefail
cd "$(dirname "$0")/../.."
CONFIG=(--preset quick --config docs/results/main.yaml)
RUNS=docs/results/runs
MAIN=independent,dml,kdcl-naive,kdcl-linear,kdcl-minlogit,kdcl-general,ccl
ABLATIONS=ccl:hfd=false,ccl:rbsd=false,ccl:pbsd=false,ccl:rbsd=false:pbsd=false,ccl:hfd=false:pbsd=false,\
ccl:hfd=false:rbsd=false,ccl:rule=confidence,ccl:region=[16,16],ccl:region=[32,32]

stage_main() {  # one seed at a time, so that an interrupted run still leaves whole seeds
  for seed in 0 1 2; do
    ccl-bench compare "${CONFIG[@]}" --methods "$MAIN" --seeds "$seed" --out "$RUNS/main" --no-plots
  done
}
stage_ablations() {
  ccl-bench compare "${CONFIG[@]}" --methods "$ABLATIONS" --seeds 0 --out "$RUNS/ablations" --no-plots
}
stage_cost() {
  ccl-bench overhead "${CONFIG[@]}" --methods "$MAIN,ccl:hfd=false,ccl:rbsd=false,ccl:pbsd=false" \
    --steps 10 --warmup 3 --out docs/results/cost.csv
  # the same step with the students' default 256-channel decoders (why the experiment uses 64)
  ccl-bench overhead "${CONFIG[@]}" --methods independent,ccl --steps 10 --warmup 3 \
    --set students.cnn.options.decoder_channels=256 students.vit.options.decoder_channels=256 \
    --out docs/results/cost_decoder256.csv
}
stage_report() {
  ccl-bench report "$RUNS/main" --out docs/results/main --order "$MAIN"
  for baseline in dml kdcl-naive kdcl-linear kdcl-minlogit kdcl-general; do  # paired CCL - X
    ccl-bench report "$RUNS/main" --out "docs/results/main_vs_$baseline" --baseline "$baseline" --order "$MAIN" --no-plots
  done
  ccl-bench report "$RUNS/ablations" "$RUNS/main/ccl/seed0" "$RUNS/main/independent/seed0" \
    --out docs/results/ablations --order "independent,ccl,$ABLATIONS" --no-plots
  python docs/results/digits_iou.py "$RUNS/main" --order "$MAIN" --out docs/results/main/digits_iou.md
  python docs/results/digits_iou.py "$RUNS/ablations" "$RUNS/main/ccl/seed0" "$RUNS/main/independent/seed0" \
    --order "independent,ccl,$ABLATIONS" --out docs/results/ablations/digits_iou.md
}
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(main ablations cost report)
for stage in "${stages[@]}"; do "stage_$stage"; done
