#!/usr/bin/env bash
# Everything that needs a GPU. Each step logs to OUTDIR and the run goes on past a failing step,
# so one call yields every result; summary.txt lists each step's budget, time and exit status.
#
#   bash bench/gpu_check.sh OUTDIR [first|tune|quick|full]
#
# first (<= 6 min from a bare machine; the first call of any GPU lease): stages in order of
#       information per second, each under its own time budget, each writing into OUTDIR as it
#       goes (a stage cut off at its limit keeps what it wrote): env (versions, clocks, the copy
#       and GEMM ceilings) -> correctness (every kernel family, compiled Triton, against float64)
#       -> headline (the table of docs/gpu_results.md) -> cuda (the extension, built in the
#       background since the start, joins: its correctness and headline rows) -> extra (512/2048
#       tokens, the e2e training step) while time remains. Files: summary.txt env.txt
#       correctness.log headline.md bench.json build.log run.log.
# tune  (<= 6 min; the second call): ncu on the forward and dx kernels at the headline shape
#       against the cost model, the layer's GPU work against its host time at 512 tokens
#       (bench/host_overhead.py --real, into run.log), compute-sanitizer memcheck on the CUDA
#       kernels, the autotuner's choices. Files: summary.txt ncu.txt autotune.txt sanitizer.log bench.json build.log run.log.
# quick (~15 min on an H100 plus the build): build, the whole test suite, memcheck, the quick
#       benchmark, the train step. full: also racecheck, the full grid, the multi-adapter benchmark.
#
# LORA_KERNELS_DRY_RUN=1 runs first/tune on the CPU (Triton's interpreter, tiny shapes, the same
# stages, files and budgets; each stage's limit there is DRY_FACTOR times its budget).
# Through the device tool: carry .whl (the nvidia-cutlass wheel, for the sm_90a kernels' headers;
# README "Running on a GPU"), timeout_s 420 for first and tune.
set -u
: "${1:?usage: bash bench/gpu_check.sh OUTDIR [first|tune|quick|full]}"
out="$(mkdir -p "$1" && cd "$1" && pwd)"
level="${2:-first}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: > "$summary"
dry="${LORA_KERNELS_DRY_RUN:-0}"
[ "$dry" = 0 ] || dry=1
export LORA_KERNELS_DRY_RUN="$dry"
py="python bench/first_contact.py"

# --------------------------------------------------------------------------------------------
# first / tune: stages under budgets
# --------------------------------------------------------------------------------------------
TOTAL=330            # seconds of stages; the rest of a 6-minute call: start-up, copying files back
DRY_FACTOR=3         # the interpreter on two cores is slower than compiled kernels on a GPU
t_start=$SECONDS

# stage NAME BUDGET COMMAND...: runs COMMAND under min(BUDGET, what is left) (x DRY_FACTOR in a
# dry run), its output to the terminal and run.log; one line in summary.txt.
stage() {
  local name="$1" budget="$2"; shift 2
  local left=$((TOTAL - (SECONDS - t_start)))
  local limit=$((budget < left ? budget : left))
  [ "$dry" = 1 ] && limit=$((budget * DRY_FACTOR))
  if [ "$limit" -lt 5 ]; then
    printf '%-16s budget %4ss  skipped: no time left\n' "$name" "$budget" | tee -a "$summary"
    return 0
  fi
  echo "== stage $name: budget ${budget}s, limit ${limit}s: $*" | tee -a "$out/run.log"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/run.log"
  local rc=${PIPESTATUS[0]}
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note="  (cut off at its limit)"
  printf '%-16s budget %4ss  measured %4ss  rc=%s%s\n' "$name" "$budget" "$((SECONDS - start))" "$rc" "$note" \
    | tee -a "$summary"
}

# The CUDA extension, built in the background from the start with the machine's cores (nice'd, so
# the Triton stages keep theirs), into a staging folder; the finished library is then moved into
# lora_kernels/ in one rename, so no running stage ever sees half a file.
build_dir="$(mktemp -d)"
start_build() {
  (
    local start=$SECONDS
    if [ -z "${LORA_KERNELS_CUTLASS_DIR:-}${CUTLASS_PATH:-}" ] \
       && ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
      local whl
      whl="$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)"
      if [ -n "$whl" ]; then  # headers only: the build locates them, it imports nothing
        python -m zipfile -e "$whl" "$build_dir/cutlass" && \
          export LORA_KERNELS_CUTLASS_DIR="$build_dir/cutlass/cutlass_library/source/include"
      fi
    fi
    if [ "$dry" = 0 ] && [ -z "${LORA_KERNELS_CUDA_ARCHS:-}" ]; then  # this GPU's architecture only
      local cap
      cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
      [ "$cap" = 9.0 ] && cap=9.0a
      [ -n "$cap" ] && export LORA_KERNELS_CUDA_ARCHS="$cap"
    fi
    echo "build: LORA_KERNELS_CUDA_ARCHS=${LORA_KERNELS_CUDA_ARCHS:-default} MAX_JOBS=${MAX_JOBS:-$(nproc)}" \
      "LORA_KERNELS_CUTLASS_DIR=${LORA_KERNELS_CUTLASS_DIR:-the nvidia-cutlass wheel}"
    LORA_KERNELS_FORCE_CUDA=1 MAX_JOBS="${MAX_JOBS:-$(nproc)}" nice -n 10 \
      python setup.py -q build_ext --build-lib "$build_dir/lib"
    local rc=$?
    for so in "$build_dir"/lib/lora_kernels/_C*.so; do
      [ "$rc" = 0 ] && [ -f "$so" ] || break
      cp "$so" "lora_kernels/.$(basename "$so").tmp" && mv -f "lora_kernels/.$(basename "$so").tmp" \
        "lora_kernels/$(basename "$so")" || rc=1
    done
    echo "build: rc=$rc in $((SECONDS - start))s"
    echo "$rc $((SECONDS - start))" > "$build_dir/done"
  ) > "$out/build.log" 2>&1 &
}

# wait_build LIMIT: wait for the background build at most LIMIT seconds; 0 if it succeeded.
wait_build() {
  local waited=0
  while [ ! -f "$build_dir/done" ] && [ "$waited" -lt "$1" ]; do sleep 2; waited=$((waited + 2)); done
  if [ ! -f "$build_dir/done" ]; then
    printf '%-16s still building after %ss of waiting; its rows are left out\n' "build" "$waited" | tee -a "$summary"
    return 1
  fi
  read -r rc secs < "$build_dir/done"
  printf '%-16s rc=%s in %ss (in the background; waited %ss)\n' "build" "$rc" "$secs" "$waited" | tee -a "$summary"
  [ "$rc" = 0 ]
}

left() { echo $((TOTAL - (SECONDS - t_start))); }

run_first() {
  start_build
  stage env 20 $py env --out "$out"
  stage correctness 110 env LORA_KERNELS_AUTOTUNE=0 $py correctness --backend triton --out "$out"
  stage headline 130 $py headline --out "$out"
  local wait=$(( $(left) - 40 ))
  [ "$dry" = 1 ] && wait=600
  if wait_build "$((wait > 0 ? wait : 0))"; then
    stage cuda-correct 25 env LORA_KERNELS_AUTOTUNE=0 $py correctness --backend cuda --out "$out"
    stage cuda-headline 30 $py headline --providers base,cuda --stage-name headline-cuda --out "$out"
  fi
  stage extra 40 $py extra --out "$out"
  local cfg=tiny
  [ "$dry" = 0 ] && cfg=llama-2048
  stage train-step 40 python bench/train_step.py --config "$cfg" --steps 5 --warmup 2 --json "$out/train_step.json"
  if [ -f "$out/train_step.json" ]; then  # into bench.json: the files that come back stay at 8
    python - "$out" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
data = json.loads((out / "bench.json").read_text())
data["train_step"] = json.loads((out / "train_step.json").read_text())
(out / "bench.json").write_text(json.dumps(data, indent=1, default=str))
(out / "train_step.json").unlink()
EOF
  fi
}

run_tune() {
  start_build
  local ncu sanitizer
  ncu="$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)"
  sanitizer="$(python -c 'import torch.utils.cpp_extension as c; print(c.CUDA_HOME or "")')/bin/compute-sanitizer"
  stage autotune 120 $py autotune --out "$out"
  if [ -n "$ncu" ] && [ "$dry" = 0 ]; then
    local kernels="regex:_lora_(forward|backward|shrink|g)_kernel|_reduce_runs_kernel"
    stage ncu 90 "$ncu" --csv --page details --print-units base --clock-control none --kernel-name "$kernels" --nvtx --nvtx-include "profile/" \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed \
      --log-file "$build_dir/ncu.csv" $py ncu-target --out "$out"
    stage ncu-report 15 $py ncu-report --csv "$build_dir/ncu.csv" --out "$out"
  else
    echo "ncu: not run (${ncu:-not found}; dry run=$dry)" | tee -a "$out/ncu.txt" "$summary"
    stage ncu-target 60 $py ncu-target --out "$out"
  fi
  if [ "$dry" = 0 ]; then  # the layer's GPU work against its host time at 512 tokens (docs/benchmarks.md)
    stage host 40 python bench/host_overhead.py --real --shape 512,4096,4096,16 --reps 50 --repeats 2
  else
    stage host 40 python bench/host_overhead.py --reps 20 --repeats 1
  fi
  local wait=$(( $(left) - 60 ))
  [ "$dry" = 1 ] && wait=600
  if wait_build "$((wait > 0 ? wait : 0))"; then
    if [ -x "$sanitizer" ] && [ "$dry" = 0 ]; then
      stage memcheck 60 "$sanitizer" --tool memcheck --error-exitcode 1 --log-file "$out/sanitizer.log" \
        $py sanitize --out "$out"
    else
      echo "compute-sanitizer: not run (${sanitizer}; dry run=$dry)" | tee -a "$out/sanitizer.log" "$summary"
      stage sanitize 60 $py sanitize --out "$out"
    fi
  fi
}

if [ "$level" = first ] || [ "$level" = tune ]; then
  echo "gpu_check $level: dry run=$dry; stage budgets total ${TOTAL}s; OUTDIR=$out" | tee -a "$summary"
  "run_$level"
  echo "total ${SECONDS}s" | tee -a "$summary"
  wait  # the background build, if a stage ended early
  rm -rf "$build_dir"
  cat "$summary"
  exit 0
fi

# --------------------------------------------------------------------------------------------
# quick / full: the whole suite
# --------------------------------------------------------------------------------------------
step() {  # step NAME COMMAND...
  local name="$1"; shift
  local start=$SECONDS
  echo "== $name: $*" | tee -a "$out/$name.log"
  "$@" >> "$out/$name.log" 2>&1
  local rc=$?
  printf '%-22s rc=%-3s %5ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$summary"
  tail -n 3 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
step build env LORA_KERNELS_FORCE_CUDA=1 LORA_KERNELS_LINEINFO=1 \
  pip install --no-build-isolation --no-deps -e .
step tests env LORA_KERNELS_REQUIRE=triton,cuda,extension python -m pytest python_tests -q -x -p no:cacheprovider
sanitizer="$(python -c 'import torch.utils.cpp_extension as c; print(c.CUDA_HOME or "")')/bin/compute-sanitizer"
step memcheck "$sanitizer" --tool memcheck --error-exitcode 1 \
  python -m pytest python_tests/test_cuda_extension.py -q -x -k "forward_backward or misaligned or dropout or merge or empty"
step bench python bench/run.py --out-dir "$out/bench" --no-progress
step train_step python bench/train_step.py --check --json "$out/train_step.json"
if [ "$level" = full ]; then
  step racecheck "$sanitizer" --tool racecheck --error-exitcode 1 \
    python -m pytest python_tests/test_cuda_extension.py -q -x -k "misaligned or dropout or merge"
  step bench_full python bench/run.py --full --out-dir "$out/bench_full" --no-progress
  step multi_lora python bench/multi_lora.py --check
fi
cat "$summary"
