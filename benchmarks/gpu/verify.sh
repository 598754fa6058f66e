#!/usr/bin/env bash
# Verify the CUDA kernels of ccl_ops on a GPU machine, in one command (see benchmarks/gpu/README.md):
#
#   bash benchmarks/gpu/verify.sh            # all stages: build test sanitize check bench
#   bash benchmarks/gpu/verify.sh test bench # only some stages (the build of an earlier call is reused)
#   QUICK=1 bash benchmarks/gpu/verify.sh    # small shapes in check/bench (when time is short)
#
# Writes benchmarks/gpu/results/{SUMMARY.md, *.log, check_cuda.json, kernels_cuda.{csv,md}} and, when $OUT is
# set (the device tool), copies SUMMARY.md, the JSON and the kernel tables there. Each stage runs under its own
# time limit (seconds, overridable: T_BUILD, T_TEST, T_SANITIZE, T_CHECK, T_BENCH) so that the whole run fits a
# 10-minute command and a slow stage cannot take the summary down with it.
set -u
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
RES=benchmarks/gpu/results
mkdir -p "$RES"
STAGES=${*:-build test sanitize check bench}
PY=${PYTHON:-python}
QUICK=${QUICK:-0}
SUMMARY=$RES/SUMMARY.md
T0=$(date +%s)

note() { echo "$*" | tee -a "$SUMMARY"; }
stage_time() { echo "$(( $(date +%s) - $1 ))s"; }

: > "$SUMMARY"
note "# ccl CUDA verification ($(date -u +%Y-%m-%dT%H:%MZ))"
note ""
note "- stages: $STAGES (QUICK=$QUICK)"
note "- git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed paths"
note "- $($PY - <<'EOF'
import torch
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO GPU"
cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
print(f"device: {gpu} (sm {cap}); torch {torch.__version__}; torch CUDA {torch.version.cuda}")
EOF
)"
note "- nvcc: $(nvcc --version 2>/dev/null | tail -1); driver: $(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"

# nvcc under /usr/local/bin would make torch guess CUDA_HOME=/usr/local (no lib64/libcudart there).
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
export PATH="${CUDA_HOME:-/usr/local/cuda}/bin:$PATH"
export MAX_JOBS=${MAX_JOBS:-16}

has() { case " $STAGES " in *" $1 "*) return 0;; *) return 1;; esac; }

if has build; then
  t=$(date +%s)
  # Liger-Kernel for the benchmark's peer: the GPU machine has no registry; wheels placed here are used.
  if ls benchmarks/gpu/wheels/*.whl >/dev/null 2>&1 && ! $PY -c "import liger_kernel" 2>/dev/null; then
    $PY -m pip install --no-index --no-deps benchmarks/gpu/wheels/*.whl > "$RES/liger_install.log" 2>&1 \
      && note "- liger-kernel installed from benchmarks/gpu/wheels" || note "- liger-kernel wheel install FAILED"
  fi
  timeout "${T_BUILD:-420}" $PY -m pip install --no-build-isolation --no-deps -e . > "$RES/build.log" 2>&1
  rc=$?
  if [ $rc -ne 0 ]; then  # older setuptools without PEP 660: build in place instead
    timeout "${T_BUILD:-420}" $PY setup.py build_ext --inplace >> "$RES/build.log" 2>&1
    rc=$?
  fi
  devices=$($PY -c "import ccl_ops; print(sorted(ccl_ops.KERNEL_DEVICES))" 2>>"$RES/build.log")
  warn=$(grep -c "warning" "$RES/build.log")
  note "- build: rc=$rc, kernel devices $devices, $warn warning lines, $(stage_time $t) (log: $RES/build.log)"
  case "$devices" in *cuda*) ;; *) note "  **BUILD DID NOT PRODUCE CUDA KERNELS**: tail of the log:"; tail -20 "$RES/build.log" | sed 's/^/    /' | tee -a "$SUMMARY";; esac
fi

if has test; then
  t=$(date +%s)
  timeout "${T_TEST:-300}" $PY -m pytest tests -q -k cuda -p no:cacheprovider --no-header -rfE \
    > "$RES/pytest_cuda.log" 2>&1
  rc=$?
  note "- pytest -k cuda: rc=$rc: $(grep -E '(passed|failed|error|skipped|no tests ran)' "$RES/pytest_cuda.log" | tail -1) ($(stage_time $t))"
  grep -E "^(FAILED|ERROR)" "$RES/pytest_cuda.log" | head -20 | sed 's/^/    /' | tee -a "$SUMMARY"
fi

if has sanitize; then
  CS=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
       "${CUDA_HOME:-/usr/local/cuda}"/compute-sanitizer/compute-sanitizer 2>/dev/null | head -1)
  if [ -z "$CS" ]; then
    note "- compute-sanitizer: NOT FOUND (skipped)"
  else
    for tool in memcheck racecheck synccheck; do
      t=$(date +%s)
      quick=1; [ "$tool" = memcheck ] && quick=$QUICK
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 CCL_SMOKE_QUICK=$quick timeout "${T_SANITIZE:-150}" \
        "$CS" --tool $tool --error-exitcode 99 $PY benchmarks/gpu/sanitizer_smoke.py > "$RES/sanitizer_$tool.log" 2>&1
      rc=$?
      note "- compute-sanitizer $tool: rc=$rc, $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$RES/sanitizer_$tool.log" | tail -1); $(grep -E 'sanitizer smoke' "$RES/sanitizer_$tool.log" | tail -1) ($(stage_time $t))"
    done
  fi
fi

if has check; then
  t=$(date +%s)
  q=""; [ "$QUICK" = 1 ] && q="--quick"
  timeout "${T_CHECK:-300}" $PY benchmarks/gpu/check_cuda.py $q --json "$RES/check_cuda.json" > "$RES/check_cuda.log" 2>&1
  rc=$?
  note "- check_cuda.py: rc=$rc ($(stage_time $t))"
  grep -E "^\[(PASS|FAIL|SKIP)\]" "$RES/check_cuda.log" | cut -c1-400 | sed 's/^/    /' | tee -a "$SUMMARY"
fi

if has bench; then
  t=$(date +%s)
  shapes=""; [ "$QUICK" = 1 ] && shapes="--shapes 2x19x256x512"
  timeout "${T_BENCH:-300}" $PY -m ccl_bench kernels --device cuda --dtypes float32,bfloat16 $shapes --out "$RES" \
    > "$RES/bench.log" 2>&1
  rc=$?
  note "- ccl-bench kernels --device cuda: rc=$rc ($(stage_time $t)); table: $RES/kernels_cuda.md"
  [ -f "$RES/kernels_cuda.md" ] && { echo; cat "$RES/kernels_cuda.md"; } >> "$SUMMARY"
fi

note ""
note "total: $(stage_time $T0)"
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
  cp "$SUMMARY" "$OUT/" 2>/dev/null
  for f in check_cuda.json kernels_cuda.md kernels_cuda.csv pytest_cuda.log; do [ -f "$RES/$f" ] && cp "$RES/$f" "$OUT/"; done
  tail -c 200000 "$RES/build.log" > "$OUT/build.log" 2>/dev/null || true
fi
cat "$SUMMARY"
