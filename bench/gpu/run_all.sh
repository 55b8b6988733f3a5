#!/usr/bin/env bash
# The GPU device run: one command that always reports. Steps, each with its own time budget
# inside one overall deadline (about 6.5 minutes, under the device tool's 10 per command):
#   1. build the Python module with CUDA (cmake + ninja, no pip: the device has no network)
#   2. the GPU pytest files (test_gpu.py, test_runtime_gpu.py: partitions, adapters, budgets)
#   3. the benchmark (bench_gpu.py), which appends each scenario's row as it finishes
#   4. the C++ GPU tests, only when GoogleTest is installed (the device machine has none)
# A step that fails, crashes or runs out of time is recorded and the run goes on; steps that no
# longer fit before the deadline are recorded as skipped. Everything lands in OUTDIR as two
# files (the device tool returns at most 8): summary.md, written as results arrive, and
# logs.tar.gz, repacked after every step so a run killed from outside still leaves the logs of
# every finished step.
#
# usage: bench/gpu/run_all.sh [OUTDIR]        (default: $OUT, the device tool's output folder)
# environment (seconds):
#   APPORTION_GPU_RUN_DEADLINE_S   overall deadline (390)
#   APPORTION_GPU_RUN_BUDGET_BUILD / _PYTEST / _BENCH / _CPP   per-step budgets (170/90/120/60)
#   APPORTION_GPU_RUN_SIMULATE=1   no GPU needed: the build step only checks that apportion
#                                  imports, the benchmark runs --simulate, pytest and C++ steps
#                                  run simulated commands; for testing this script
#   APPORTION_GPU_RUN_INJECT=STEP:crash|hang   that step crashes or hangs (testing)
#   APPORTION_GPU_RUN_GTEST=0|1    override the GoogleTest check (testing)
#   APPORTION_GPU_BENCH_INJECT=crash@K|hang@K  passed to bench_gpu.py (testing)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUTDIR=${1:-${OUT:-}}
[[ -n "$OUTDIR" ]] || { echo "usage: bench/gpu/run_all.sh OUTDIR (or set OUT)" >&2; exit 2; }
mkdir -p "$OUTDIR" && OUTDIR=$(cd "$OUTDIR" && pwd)
SUMMARY="$OUTDIR/summary.md"
PY=${PYTHON:-python3}
SIMULATE=${APPORTION_GPU_RUN_SIMULATE:-0}
DEADLINE=${APPORTION_GPU_RUN_DEADLINE_S:-390}
RESERVE=5   # kept back at the end for packing
export PYTHONUNBUFFERED=1 APPORTION_GPU_RUN_ACTIVE=1

# Logs and build trees stay outside OUTDIR, which holds only the two result files.
WORK=$(mktemp -d "${TMPDIR:-/tmp}/apportion-gpu-run.XXXXXX")
LOGS="$WORK/logs"
mkdir -p "$LOGS"
BUILD="$ROOT/build/gpu-run"
START=$SECONDS
elapsed() { echo $((SECONDS - START)); }
note() { printf '%s\n' "$*" | tee -a "$SUMMARY"; }

pack() {
  tar -czf "$OUTDIR/logs.tar.gz.part" -C "$WORK" logs 2>/dev/null &&
    mv -f "$OUTDIR/logs.tar.gz.part" "$OUTDIR/logs.tar.gz"
}
finish() {
  local rc=$?
  trap - EXIT INT TERM
  note ""
  note "run finished after $(elapsed) s (deadline ${DEADLINE} s): ${FAILED:-0} step(s) failed"
  pack
  rm -rf "$WORK"
  exit $((rc != 0 ? rc : (${FAILED:-0} > 0)))
}
trap finish EXIT
trap 'note "run_all.sh: interrupted"; exit 130' INT TERM

FAILED=0
# run_step NAME BUDGET COMMAND...: runs the command in its own process group with at most
# BUDGET seconds (less when the deadline is nearer), its output to the console and its log.
run_step() {
  local name=$1 budget=$2
  shift 2
  local left=$((DEADLINE - RESERVE - $(elapsed)))
  if ((left < 3)); then
    note "- $name: skipped, the deadline is reached"
    return 0
  fi
  ((budget > left)) && budget=$left
  case "${APPORTION_GPU_RUN_INJECT:-}" in
    "$name:crash") set -- bash -c 'echo "injected crash"; kill -SEGV $$' ;;
    "$name:hang") set -- bash -c 'echo "injected hang"; exec sleep 100000' ;;
  esac
  echo "=== $name (budget ${budget} s, at $(elapsed) s)"
  local t0=$SECONDS rc
  # timeout signals its whole process group, so a step's children (ninja, compilers, pytest's
  # workers) go with it; --kill-after: a step that ignores SIGTERM is killed 3 s later.
  timeout --kill-after=3 "$budget" "$@" > >(tee "$LOGS/$name.log") 2>&1
  rc=$?
  local took=$((SECONDS - t0)) status
  case $rc in
    0) status="ok" ;;
    124 | 137) status="**timed out** (budget ${budget} s)" ;;
    *) status="**failed** (exit $rc$( ((rc > 128)) && echo ", signal $((rc - 128))"))" ;;
  esac
  ((rc != 0)) && FAILED=$((FAILED + 1))
  [[ "$name" == bench ]] && note ""   # ends the benchmark's table
  note "- $name: $status, $took s"
  pack
  return 0
}

: > "$SUMMARY"
note "# apportion GPU run"
note ""
note "commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
  git -C "$ROOT" diff --quiet 2>/dev/null || echo ' (with local changes)'), $(date -u +%FT%TZ)"
if [[ "$SIMULATE" == 1 ]]; then
  note "SIMULATED run: no GPU was used; every number below is made up"
else
  if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1' && ! ls /dev/nvidia0 >/dev/null 2>&1; then
    note "no CUDA device is present (no libcuda.so.1, no /dev/nvidia0): nothing to measure"
    FAILED=1
    exit 2
  fi
  note '```'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 |
    tee -a "$SUMMARY"
  note '```'
fi
note ""
note "## steps"

# Wheels carried in .whl/ (the device machine cannot download): installed beside, not over, its
# own packages.
if [[ -d "$ROOT/.whl" ]] && compgen -G "$ROOT/.whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$ROOT"/.whl/*.whl &&
    export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" &&
    note "installed carried wheels: $(cd "$ROOT/.whl" && echo *.whl)"
fi

# --- 1. the Python module ------------------------------------------------------------------------
PKG="$BUILD/pkg"
build_module() {
  local pybind_dir
  if ! "$PY" -c "import pybind11, sys; sys.exit(int(pybind11.__version__.split('.')[0]) < 3)"; then
    echo "pybind11 3 or newer is needed: carry its wheel in .whl/ (see README, GPUs)"
    return 1
  fi
  pybind_dir=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())") || return 1
  # A build tree configured from another checkout path cannot be reused.
  if [[ -f "$BUILD/py/CMakeCache.txt" ]] &&
     ! grep -q "CMAKE_HOME_DIRECTORY:INTERNAL=$ROOT\$" "$BUILD/py/CMakeCache.txt"; then
    rm -rf "$BUILD/py"
  fi
  cmake -S "$ROOT" -B "$BUILD/py" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DAPPORTION_BUILD_PYTHON=ON -DAPPORTION_WITH_CUDA=ON -DPython_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$pybind_dir" &&
    cmake --build "$BUILD/py" -j"$(nproc)" --target _core || return 1
  if readelf -d "$BUILD"/py/_core*.so | grep -q 'NEEDED.*libcuda'; then
    echo "the module links libcuda; it must load it at run time"
    return 1
  fi
  # A package tree with the fresh extension, so the checkout's python/ is left alone.
  rm -rf "$PKG" && mkdir -p "$PKG" && cp -r "$ROOT/python/apportion" "$PKG/" &&
    rm -f "$PKG"/apportion/_core*.so && cp "$BUILD"/py/_core*.so "$PKG/apportion/"
}
if [[ "$SIMULATE" == 1 ]]; then
  run_step build "${APPORTION_GPU_RUN_BUDGET_BUILD:-170}" \
    "$PY" -c "import apportion; print('apportion imports; built_with_cuda =', apportion.built_with_cuda)"
else
  export -f build_module
  export ROOT BUILD PKG PY
  run_step build "${APPORTION_GPU_RUN_BUDGET_BUILD:-170}" bash -c build_module
  export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}" APPORTION_EXPECT_GPU=1
fi

# --- 2. the GPU pytest files -------------------------------------------------------------------
if [[ "$SIMULATE" == 1 ]]; then
  run_step pytest "${APPORTION_GPU_RUN_BUDGET_PYTEST:-90}" \
    "$PY" -c "print('simulated: pytest tests/python/test_gpu.py tests/python/test_runtime_gpu.py')"
else
  # -p no:cacheprovider: the checkout may be read-only; --timeout: one hung test is one failure.
  run_step pytest "${APPORTION_GPU_RUN_BUDGET_PYTEST:-90}" \
    "$PY" -u -m pytest "$ROOT/tests/python/test_gpu.py" "$ROOT/tests/python/test_runtime_gpu.py" \
    -p no:cacheprovider -rs -q --timeout=60 --rootdir="$ROOT"
  grep -E "passed|failed|error" "$LOGS/pytest.log" | tail -1 | sed 's/^/  - /' >> "$SUMMARY"
  grep -E "^(FAILED|ERROR) " "$LOGS/pytest.log" | head -20 | sed 's/^/  - /' >> "$SUMMARY"
  if grep -q "SKIPPED.*no CUDA device" "$LOGS/pytest.log"; then
    note "  - **GPU tests skipped on a GPU machine**"
    FAILED=$((FAILED + 1))
  fi
fi

# --- 3. the benchmark ------------------------------------------------------------------------------
note "- bench: rows below"
note ""
note "## benchmark (rows appear as each scenario finishes)"
bench_args=(--out "$LOGS" --summary "$SUMMARY")
[[ "$SIMULATE" == 1 ]] && bench_args+=(--simulate)
run_step bench "${APPORTION_GPU_RUN_BUDGET_BENCH:-120}" \
  "$PY" -u "$ROOT/bench/gpu/bench_gpu.py" "${bench_args[@]}"

# --- 4. the C++ GPU tests, when GoogleTest is there --------------------------------------------------
note ""
note "## after the benchmark"
have_gtest=${APPORTION_GPU_RUN_GTEST:-}
if [[ -z "$have_gtest" ]]; then
  have_gtest=0
  [[ -f /usr/include/gtest/gtest.h || -f /usr/local/include/gtest/gtest.h ]] && have_gtest=1
fi
if [[ "$have_gtest" != 1 ]]; then
  note "- cpp: skipped, GoogleTest is not installed here (the fake-driver tests run in CI)"
elif [[ "$SIMULATE" == 1 ]]; then
  run_step cpp "${APPORTION_GPU_RUN_BUDGET_CPP:-60}" "$PY" -c "print('simulated: ctest -R gpu')"
else
  cpp_tests() {
    cmake -S "$ROOT" -B "$BUILD/cpp" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DAPPORTION_BUILD_PYTHON=OFF -DAPPORTION_BUILD_TESTS=ON -DAPPORTION_WITH_CUDA=ON &&
      cmake --build "$BUILD/cpp" -j"$(nproc)" &&
      ctest --test-dir "$BUILD/cpp" -R gpu --output-on-failure
  }
  export -f cpp_tests
  run_step cpp "${APPORTION_GPU_RUN_BUDGET_CPP:-60}" bash -c cpp_tests
fi
