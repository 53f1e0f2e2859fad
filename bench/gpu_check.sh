#!/usr/bin/env bash
# Everything that needs a GPU. Each step logs to OUTDIR and the run goes on past a failing step,
# so one call yields every result; summary.txt lists each step's budget, time and exit status, and
# its last line, "result: ok" or "result: FAILED: <steps>", is the script's exit status (0 or 1).
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
# first/tune fail on a stage's non-zero status (first_contact.py's stages also on any Triton warning
# or TMA fallback, each named under the stage's line), on a stage cut off at its limit, on a required
# stage left without time, and on a background build that fails or is still running at its join.
#
# LORA_KERNELS_DRY_RUN=1 runs first/tune on the CPU (Triton's interpreter, tiny shapes, the same
# stages, files and budgets; each stage's limit there is DRY_FACTOR times its budget).
# LORA_KERNELS_CHECK_TOTAL=SECONDS replaces the 330 s that first/tune's stages share.
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
# Budgets of `first` on an H100, in seconds of the 330 (the rest of a 420 s call: the copy of the
# tree, the interpreter's start, the copy back). A Triton GEMM config compiles in ~1-3 s there;
# one from Triton's on-disk cache loads in ~0.05 s.
#   env          20  python, torch and the CUDA context ~5 s; the copy and GEMM ceilings ~3 s.
#   correctness 110  100 cases (10 families x 3 awkward shapes x bf16/fp16/fp32, and the large shape
#                    in bf16), autotuning off (one config per kernel), 1-2 kernels not shared with
#                    an earlier case each: 100-200 cold compiles, 100-600 s in one process, over
#                    budget. Compiled ahead by a worker process per core (16), each running every
#                    16th case in the stage's order (bf16 first): ~8 s to start them + 200 x 3 s /
#                    16 = ~45 s at worst, cut at 60 s; then the checks, every kernel loaded from the
#                    cache: 100 x ~0.2 s = 20 s. ~75 s, ~90 s at worst.
#   headline    130  the triton provider tunes 5 kernel variants (forward: inference, training,
#                    dropout; backward: with and without dropout) at 2 layer shapes; a config
#                    compiles once for both (M, N, K are not constexprs). All 7 configs: 35 compiles,
#                    35-105 s, over budget beside the rest. LORA_KERNELS_MAX_CONFIGS=2: 10 compiles,
#                    10-30 s, + benchmarking 10 keys x 2 configs x ~0.15 s = 3 s. torch.compile
#                    (last): 4 cases x ~10-15 s = 40-60 s on 16 cores. Timing: 36 cells x ~0.3 s =
#                    11 s. ~70-110 s.
#   build            in the background from the start (nice'd); joins with 55 s left, or is cut off.
#   cuda-correct 25, cuda-headline 30: no Triton compiles (autotuning off; the base provider only).
#   extra 40, train-step 40 (512/2048 tokens: 2 more autotune keys per variant, the same 2 configs,
#                    from the cache): only where their whole budget is left.
# 20 + 110 + 130 + 55 = 315 of 330: the required stages fit at their budgets; extra and train-step
# run on the time the others leave.
TOTAL="${LORA_KERNELS_CHECK_TOTAL:-330}"  # NOTE: overridable so the tests can run the script in seconds
DRY_FACTOR=3         # the interpreter on two cores is slower than compiled kernels on a GPU
scale=1
[ "$dry" = 1 ] && scale=$DRY_FACTOR
deadline=$((TOTAL * scale))  # each budget below is scaled alike
t_start=$SECONDS
failed=""            # the stages that failed, named in summary.txt's last line and the exit status
work="$(mktemp -d)"  # the build's staging folder, the current stage's output
build_pid=""
trap 'stop_build; rm -rf "$work"' EXIT
trap 'exit 143' TERM INT

left() { echo $((deadline - (SECONDS - t_start))); }

# stage [--optional] NAME BUDGET COMMAND...: runs COMMAND under min(BUDGET, what is left) (x
# DRY_FACTOR in a dry run), its output to the terminal and run.log; one line in summary.txt. A
# stage fails on a non-zero status, at its limit (a stage cut off keeps what it wrote) or, unless
# --optional, when no time is left for it; an --optional stage runs only where its whole budget is
# left. A failed stage's "FAILED: ..." lines (first_contact.py names Triton warnings and TMA
# fallbacks so) go into summary.txt under its line.
stage() {
  local optional=0
  [ "$1" = --optional ] && optional=1 && shift
  local name="$1" budget="$2"; shift 2
  local want=$((budget * scale)) left
  left=$(left)
  local limit=$((want < left ? want : left))
  if [ "$limit" -lt 5 ] || { [ "$optional" = 1 ] && [ "$left" -lt "$want" ]; }; then
    printf '%-16s budget %4ss  skipped: %ss left\n' "$name" "$budget" "$((left > 0 ? left : 0))" | tee -a "$summary"
    [ "$optional" = 1 ] || failed="$failed $name"
    return 0
  fi
  echo "== stage $name: budget ${budget}s, limit ${limit}s: $*" | tee -a "$out/run.log"
  local start=$SECONDS
  : > "$work/stage.out"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$out/run.log" "$work/stage.out"
  local rc=${PIPESTATUS[0]}
  local note=""
  { [ "$rc" = 124 ] || [ "$rc" = 137 ]; } && note="  (cut off at its limit)"
  printf '%-16s budget %4ss  measured %4ss  rc=%s%s\n' "$name" "$budget" "$((SECONDS - start))" "$rc" "$note" \
    | tee -a "$summary"
  if [ "$rc" != 0 ]; then
    failed="$failed $name"
    grep '^FAILED: ' "$work/stage.out" | head -n 5 | sed 's/^/    /' | tee -a "$summary"
  fi
}

# The CUDA extension, built in the background from the start with the machine's cores (nice'd, so
# the Triton stages keep theirs), into a staging folder; the finished library is then moved into
# lora_kernels/ in one rename, so no running stage ever sees half a file. The build runs under
# `timeout`, its own process group, so stop_build ends it with every compiler it started.
# NOTE: a dry run builds the CPU kernels only and installs nothing: the CUDA kernels (minutes of
# nvcc on two cores) are what the test command's own build already proved, and the tree keeps the
# extension that build made. What it checks is this machinery: the background, the join, the bound.
start_build() {
  (
    local start=$SECONDS
    if [ -z "${LORA_KERNELS_CUTLASS_DIR:-}${CUTLASS_PATH:-}" ] && [ "$dry" = 0 ] \
       && ! python -c "import importlib.util as u, sys; sys.exit(u.find_spec('cutlass_library') is None)"; then
      local whl
      whl="$(ls .whl/nvidia_cutlass-*.whl 2>/dev/null | head -n 1)"
      if [ -n "$whl" ]; then  # headers only: the build locates them, it imports nothing
        python -m zipfile -e "$whl" "$work/cutlass" && \
          export LORA_KERNELS_CUTLASS_DIR="$work/cutlass/cutlass_library/source/include"
      fi
    fi
    if [ "$dry" = 0 ] && [ -z "${LORA_KERNELS_CUDA_ARCHS:-}" ]; then  # this GPU's architecture only
      local cap
      cap="$(timeout 20 nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' ')"
      [ "$cap" = 9.0 ] && cap=9.0a
      [ -n "$cap" ] && export LORA_KERNELS_CUDA_ARCHS="$cap"
    fi
    local kind=LORA_KERNELS_FORCE_CUDA
    [ "$dry" = 1 ] && kind=LORA_KERNELS_SKIP_CUDA
    local cutlass=""
    [ "$dry" = 1 ] || cutlass="LORA_KERNELS_CUTLASS_DIR=${LORA_KERNELS_CUTLASS_DIR:-the nvidia-cutlass wheel}"
    echo "build: $kind=1 LORA_KERNELS_CUDA_ARCHS=${LORA_KERNELS_CUDA_ARCHS:-default} MAX_JOBS=${MAX_JOBS:-$(nproc)} $cutlass"
    env "$kind=1" MAX_JOBS="${MAX_JOBS:-$(nproc)}" timeout --kill-after=10 "$deadline" nice -n 10 \
      python setup.py -q build_ext --build-lib "$work/lib" &
    echo $! > "$work/build.pid"
    wait $!
    local rc=$?
    local libs
    libs="$(ls "$work"/lib/lora_kernels/_C*.so 2>/dev/null)"
    if [ "$rc" = 0 ] && [ -z "$libs" ]; then
      echo "build: no lora_kernels/_C*.so was made"
      rc=1
    fi
    for so in $libs; do
      [ "$rc" = 0 ] && [ "$dry" = 0 ] || break
      cp "$so" "lora_kernels/.$(basename "$so").tmp" && mv -f "lora_kernels/.$(basename "$so").tmp" \
        "lora_kernels/$(basename "$so")" || rc=1
    done
    echo "build: rc=$rc in $((SECONDS - start))s"
    echo "$rc $((SECONDS - start))" > "$work/done"
  ) > "$out/build.log" 2>&1 &
  build_pid=$!
}

# stop_build: ends the background build if it still runs (TERM to its `timeout`, which passes it to
# the build's process group, KILL 10 s later; once its pid is written, if the build had not started)
# and waits for it, 30 s at most.
stop_build() {
  [ -n "$build_pid" ] || return 0
  local waited=0 sent=0
  while kill -0 "$build_pid" 2>/dev/null && [ "$waited" -lt 30 ]; do
    if [ "$sent" = 0 ] && [ ! -f "$work/done" ] && [ -f "$work/build.pid" ]; then
      kill -TERM "$(cat "$work/build.pid")" 2>/dev/null
      sent=1
    fi
    sleep 1
    waited=$((waited + 1))
  done
  kill -KILL "$build_pid" 2>/dev/null
  wait "$build_pid" 2>/dev/null
  build_pid=""
}

# wait_build RESERVE: waits for the background build until RESERVE seconds (x DRY_FACTOR) are left,
# then ends it; one stage line in summary.txt, its budget TOTAL - RESERVE from the start (a build
# cut off or failed fails the run); 0 if it succeeded.
wait_build() {
  local limit=$(( $(left) - $1 * scale ))
  local waited=0
  while [ ! -f "$work/done" ] && [ "$waited" -lt "$limit" ]; do sleep 1; waited=$((waited + 1)); done
  local rc secs note="  (in the background; waited ${waited}s)"
  if [ -f "$work/done" ]; then
    read -r rc secs < "$work/done"
  else
    stop_build
    rc=124 secs=$((SECONDS - t_start)) note="  (cut off: still building after ${waited}s of waiting; its rows are left out)"
  fi
  printf '%-16s budget %4ss  measured %4ss  rc=%s%s\n' build "$((TOTAL - $1))" "$secs" "$rc" "$note" | tee -a "$summary"
  [ "$rc" = 0 ] && return 0
  failed="$failed build"
  return 1
}

run_first() {
  start_build
  stage env 20 $py env --out "$out"
  # bf16 of every family first, one config per kernel, compiled ahead by a process per core
  stage correctness 110 env LORA_KERNELS_AUTOTUNE=0 $py correctness --backend triton --warm-seconds 60 --out "$out"
  stage headline 130 env LORA_KERNELS_MAX_CONFIGS=2 $py headline --out "$out"
  if wait_build 55; then
    stage cuda-correct 25 env LORA_KERNELS_AUTOTUNE=0 $py correctness --backend cuda --out "$out"
    stage cuda-headline 30 env LORA_KERNELS_MAX_CONFIGS=2 $py headline --providers base,cuda --stage-name headline-cuda --out "$out"
  fi
  stage --optional extra 40 env LORA_KERNELS_MAX_CONFIGS=2 $py extra --out "$out"
  local cfg=tiny
  [ "$dry" = 0 ] && cfg=llama-2048
  stage --optional train-step 40 env LORA_KERNELS_MAX_CONFIGS=2 \
    $py train-step --out "$out" -- --config "$cfg" --steps 5 --warmup 2 --json "$out/train_step.json"
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
      --log-file "$work/ncu.csv" $py ncu-target --out "$out"
    stage ncu-report 15 $py ncu-report --csv "$work/ncu.csv" --out "$out"
  else
    echo "ncu: not run (${ncu:-not found}; dry run=$dry)" | tee -a "$out/ncu.txt" "$summary"
    stage ncu-target 60 $py ncu-target --out "$out"
  fi
  if [ "$dry" = 0 ]; then  # the layer's GPU work against its host time at 512 tokens (docs/benchmarks.md)
    stage host 40 python bench/host_overhead.py --real --shape 512,4096,4096,16 --reps 50 --repeats 2
  else
    stage host 40 python bench/host_overhead.py --reps 20 --repeats 1
  fi
  if wait_build 60; then
    if [ -x "$sanitizer" ] && [ "$dry" = 0 ]; then
      stage memcheck 60 "$sanitizer" --tool memcheck --error-exitcode 1 --log-file "$out/sanitizer.log" \
        $py sanitize --out "$out"
    else
      echo "compute-sanitizer: not run (${sanitizer}; dry run=$dry)" | tee -a "$out/sanitizer.log" "$summary"
      stage sanitize 60 $py sanitize --out "$out"
    fi
  fi
}

# result: the last line of summary.txt, and the exit status (1 if any stage failed).
result() {
  if [ -n "$failed" ]; then
    echo "result: FAILED:$failed" | tee -a "$summary"
    return 1
  fi
  echo "result: ok" | tee -a "$summary"
}

if [ "$level" = first ] || [ "$level" = tune ]; then
  echo "gpu_check $level: dry run=$dry; stage budgets total ${TOTAL}s; OUTDIR=$out" | tee -a "$summary"
  "run_$level"
  stop_build  # a build that ended early, or none
  echo "total ${SECONDS}s" | tee -a "$summary"
  result
  status=$?
  cat "$summary"
  exit "$status"
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
  [ "$rc" = 0 ] || failed="$failed $name"
  tail -n 3 "$out/$name.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.txt" 2>&1
step build env LORA_KERNELS_FORCE_CUDA=1 LORA_KERNELS_LINEINFO=1 \
  pip install --no-build-isolation --no-deps -e .
step tests env LORA_KERNELS_REQUIRE=triton,cuda,extension python -m pytest python_tests -q -x -p no:cacheprovider --extended
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
result
status=$?
cat "$summary"
exit "$status"
