#!/usr/bin/env bash
# The compatibility runner: for each torch version of the support matrix, a fresh virtual
# environment installed exactly as the README says (its test command, with that row's torch),
# then the interpreter suite (which includes the ahead-of-time Triton compile check) and a
# torch.compile(fullgraph=True) smoke test. Results go to docs/compatibility.md.
#
#   bash ci/compat.sh                 # every row of the matrix
#   bash ci/compat.sh 2.11.0          # one row (others keep their last results in the table)
#   bash ci/compat.sh latest          # the newest releases of the test stack (see below)
#
# The torch rows install with constraints.txt, as the README does (the tested stack, torch swapped
# per row). The `latest` row drops `-c constraints.txt`: the README's torch (2.14.1) with the newest
# release of everything else (pytest, hypothesis, peft, transformers, numpy, ...), so drift in the
# test stack shows as a dated row of docs/compatibility.md, listing the versions it got.
#
# Environment: PYTHON (default python3.11), COMPAT_DIR (venvs, the source copy, logs and per-row
# results; default build/compat), KEEP_VENVS=1 keeps each row's venv. The CUDA kernels are not built
# (LORA_KERNELS_SKIP_CUDA=1: _C has its CPU kernels only): the rows test the Python package, the
# compiled CPU mask and the Triton kernels under Triton's CPU interpreter; the CUDA kernels are
# built and tested by .ci/run's first stage.
# Exits non-zero if any row failed any step. See docs/compatibility.md.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DOC="$REPO/docs/compatibility.md"

ROWS=("$@")
[ ${#ROWS[@]} -gt 0 ] || ROWS=(2.8.0 2.11.0 2.14.1 2.15.0 latest)
PYTHON=${PYTHON:-python3.11}
COMPAT_DIR=$(mkdir -p "${COMPAT_DIR:-build/compat}" && cd "${COMPAT_DIR:-build/compat}" && pwd)

# Each row installs from a copy of the tracked files as they are in the work tree (uncommitted
# edits included, untracked files not): no build output of another torch (lora_kernels/_C*.so,
# build/) leaks into a row.
# The README's test command, the one line that installs and runs the suite.
README_CMD=$(grep -m1 -E '^pip install torch==[^ ]+ .* && python -m pytest python_tests' README.md) || {
    echo "compat: README.md has no 'pip install torch==... && python -m pytest python_tests' line" >&2; exit 2; }
TEST_CMD=${README_CMD##* && }          # python -m pytest python_tests -q -n 2
INSTALL_CMD=${README_CMD% && "$TEST_CMD"}

export LORA_KERNELS_SKIP_CUDA=1 LORA_KERNELS_REQUIRE=triton
unset LORA_KERNELS_FORCE_CUDA TRITON_INTERPRET

failed=0
for row in "${ROWS[@]}"; do
    venv="$COMPAT_DIR/venv-$row" log="$COMPAT_DIR/log-$row.txt" res="$COMPAT_DIR/row-$row.env"
    echo "=== compat row: torch $row (log: $log)"
    rm -rf "$venv" "$res" "$COMPAT_DIR/junit-$row.xml"
    : > "$log"
    note=""
    SRC="$COMPAT_DIR/src-$row"
    rm -rf "$SRC" && mkdir -p "$SRC" && (cd "$REPO" && git ls-files -z | tar --null -T - -cf -) | tar -xf - -C "$SRC"
    cd "$SRC"
    (
        set -e
        "$PYTHON" -m venv "$venv"
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
        if [ "$row" = latest ]; then
            cmd=$(echo "$INSTALL_CMD" | sed -E "s/ -c [^ ]+//g")   # the README's torch, nothing else pinned
        else
            cmd=$(echo "$INSTALL_CMD" | sed -E "s/torch==[^ ]+/torch==$row/")
        fi
        echo "+ $cmd"
        t0=$SECONDS; eval "$cmd"; echo "install_s=$((SECONDS - t0))" >> "$res"
    ) >> "$log" 2>&1 && install=ok || install=FAIL
    echo "install=$install" >> "$res"
    if [ "$install" = ok ]; then
        source "$venv/bin/activate"
        # Triton 3.6's interpreter fails with numpy >= 2.4 (int() of a 1-element array). Detected,
        # not assumed: a tiny interpreted kernel runs; only if it fails and a numpy < 2.4 makes it
        # pass is the pin kept.
        probe=(python -c "import os; os.environ['TRITON_INTERPRET']='1'; import torch, lora_kernels as lk
x = torch.randn(3, 8); w = torch.randn(5, 8); A = torch.randn(2, 8); B = torch.randn(5, 2)
y = lk.lora_linear(x, w, None, A, B, 0.5, 0.25, backend='triton', seed=1)
r = lk.lora_linear(x, w, None, A, B, 0.5, 0.25, backend='reference', seed=1)
assert torch.allclose(y, r, atol=1e-4), (y - r).abs().max()")
        if ! "${probe[@]}" >> "$log" 2>&1; then
            numpy_before=$(python -c "import numpy; print(numpy.__version__)")
            if python -c "import numpy, sys; sys.exit(tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 4))" &&
               pip install "numpy<2.4" >> "$log" 2>&1 && "${probe[@]}" >> "$log" 2>&1; then
                note="numpy<2.4 pinned: the interpreter probe failed with numpy $numpy_before and passes with <2.4"
            else
                note="the interpreter probe fails (see log)"
            fi
        fi
        # The whole suite: the README's default tier and the extended one (python_tests/conftest.py).
        echo "+ $TEST_CMD --extended" >> "$log"
        t0=$SECONDS
        PYTEST_ADDOPTS="--junitxml=$COMPAT_DIR/junit-$row.xml --extended" eval "$TEST_CMD" >> "$log" 2>&1 && suite=ok || suite=FAIL
        echo "suite_s=$((SECONDS - t0))" >> "$res"
        echo "suite=$suite" >> "$res"
        echo "suite_line=$(grep -E '^=*.* (passed|failed|error).* in [0-9.]+s' "$log" | tail -1 | tr -d '=' | sed 's/^ *//;s/ *$//')" >> "$res"
        echo "+ python ci/compat_smoke.py" >> "$log"
        python ci/compat_smoke.py >> "$log" 2>&1 && smoke=ok || smoke=FAIL
        echo "smoke=$smoke" >> "$res"
        echo "smoke_line=$(grep -E '^compile smoke:' "$log" | tail -1)" >> "$res"
        python - >> "$res" <<'PY'
import importlib.metadata as md, platform
for dist in ("torch", "triton", "numpy"):
    try:
        print(f"{dist}={md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"{dist}=absent")
print(f"python={platform.python_version()}")
stack = []
for dist in ("pytest", "pytest-xdist", "hypothesis", "pytest-benchmark", "transformers", "peft", "accelerate", "safetensors",
             "huggingface-hub", "matplotlib", "setuptools"):
    try:
        stack.append(f"{dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        stack.append(f"{dist} absent")
print("stack=" + ", ".join(stack))
PY
        deactivate
        [ "$suite" = ok ] && [ "$smoke" = ok ] || failed=1
    else
        failed=1
        echo "torch=$row" >> "$res"
    fi
    echo "note=$note" >> "$res"
    echo "row=$row" >> "$res"
    [ "${KEEP_VENVS:-0}" = 1 ] || rm -rf "$venv" "$SRC"
    if ! grep -qx "install=ok" "$res" || ! grep -qx "suite=ok" "$res" || ! grep -qx "smoke=ok" "$res"; then
        echo "--- compat row torch $row failed; the end of its log:"; tail -n 80 "$log"
    fi
    # The row's closing lines (pytest's, then the smoke test's), for whoever reads this output.
    grep -E '^(suite_line|smoke_line)=' "$res" | cut -d= -f2- || true
    cd "$REPO"
    python3 ci/compat_table.py "$COMPAT_DIR" "$res" "$DOC" || failed=1
done
exit $failed
