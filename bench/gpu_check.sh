#!/usr/bin/env bash
# Everything that needs a GPU, in one pass: build, the full test suite against the compiled
# Triton and CUDA kernels, the sanitizers, and the benchmarks. Each step logs to OUTDIR and
# the run goes on past a failing step, so one pass yields every result; the summary at the end
# lists each step's exit status.
#
#   bash bench/gpu_check.sh OUTDIR [quick|full]
#
# quick (default, ~15 min on an H100): build, tests, memcheck, quick benchmark, train step.
# full: also racecheck, the full benchmark grid and the multi-adapter benchmark.
set -u
: "${1:?usage: bash bench/gpu_check.sh OUTDIR [quick|full]}"
out="$(mkdir -p "$1" && cd "$1" && pwd)"
level="${2:-quick}"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
summary="$out/summary.txt"
: > "$summary"

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
