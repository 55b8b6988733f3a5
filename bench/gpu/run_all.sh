#!/usr/bin/env bash
# GPU device check: builds apportion with CUDA, runs the GPU tests (C++ and Python) and the GPU
# benchmark, writes everything under OUTDIR and prints a short table. Needs a CUDA device; fails
# at once (exit 2) without one rather than after a long build. Budget: under 8 minutes on an H200.
#
# usage: bench/gpu/run_all.sh OUTDIR
set -uo pipefail

OUT=${1:?usage: bench/gpu/run_all.sh OUTDIR}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
JOBS=$(nproc 2>/dev/null || echo 4)
# Build trees stay out of OUTDIR: OUTDIR holds results only.
BUILD="$ROOT/build/gpu-check"
START=$(date +%s)
stamp() { echo "[$(($(date +%s) - START))s] $*"; }

TESTS="test_gpu_driver test_gpu_partition test_gpu_partitioner test_gpu_spin"

# --- is there a device at all? --------------------------------------------------------------
# APPORTION_GPU_CHECK_DRY_RUN=1 skips this check to exercise the script on a CPU-only machine
# (it then fails later, at the tests that need the device).
if [[ -z "${APPORTION_GPU_CHECK_DRY_RUN:-}" ]] &&
   ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1' && ! ls /dev/nvidia0 >/dev/null 2>&1; then
  echo "run_all.sh: no CUDA device is present (no libcuda.so.1 and no /dev/nvidia0);" \
       "this check needs a machine with an NVIDIA GPU and driver" | tee "$OUT/FAILED.txt" >&2
  exit 2
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
command -v nvcc >/dev/null || { echo "run_all.sh: nvcc not found (CUDA toolkit needed)" >&2; exit 2; }

status=0
PYBIND11_DIR=$(python3 -c "import pybind11; print(pybind11.get_cmake_dir())" 2>/dev/null) || {
  echo "run_all.sh: python3 cannot import pybind11" >&2; exit 2; }

# --- build --------------------------------------------------------------------------------------
stamp "configure + build (CUDA on, -j$JOBS)"
{
  cmake -S "$ROOT" -B "$BUILD/cpp" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DAPPORTION_BUILD_PYTHON=OFF -DAPPORTION_BUILD_TESTS=ON -DAPPORTION_WITH_CUDA=ON &&
  cmake --build "$BUILD/cpp" -j"$JOBS" --target $TESTS &&
  cmake -S "$ROOT" -B "$BUILD/py" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DAPPORTION_BUILD_PYTHON=ON -DAPPORTION_WITH_CUDA=ON -Dpybind11_DIR="$PYBIND11_DIR" &&
  cmake --build "$BUILD/py" -j"$JOBS" --target _core
} > "$OUT/build.log" 2>&1 || { echo "run_all.sh: build failed, see $OUT/build.log" >&2;
                                 tail -30 "$OUT/build.log" >&2; exit 1; }
for name in $TESTS; do
  t="$BUILD/cpp/tests/cpp/$name"
  if readelf -d "$t" | grep -q 'NEEDED.*libcuda'; then
    echo "run_all.sh: $t links libcuda (it must load it at run time)" | tee -a "$OUT/FAILED.txt"
    status=1
  fi
done

# A package tree with the freshly built extension, so the checkout's own python/ is untouched.
PKG="$BUILD/pkg"
rm -rf "$PKG" && mkdir -p "$PKG"
cp -r "$ROOT/python/apportion" "$PKG/" && rm -f "$PKG"/apportion/_core*.so
cp "$BUILD"/py/_core*.so "$PKG/apportion/"
export PYTHONPATH="$PKG"

# --- tests --------------------------------------------------------------------------------------
stamp "C++ GPU tests"
export APPORTION_EXPECT_GPU=1
for name in $TESTS; do
  t="$BUILD/cpp/tests/cpp/$name"
  if ! timeout 120 "$t" --gtest_output="xml:$OUT/$name.xml" > "$OUT/$name.log" 2>&1; then
    echo "FAILED: $name (see $OUT/$name.log)" | tee -a "$OUT/FAILED.txt"
    status=1
  fi
  grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$OUT/$name.log" | sed "s/^/  $name: /"
  if grep -q "no CUDA device is present" "$OUT/$name.log"; then
    echo "FAILED: $name skipped GPU tests on a GPU machine" | tee -a "$OUT/FAILED.txt"
    status=1
  fi
done

stamp "Python GPU tests"
if ! (cd "$ROOT" && timeout 180 python3 -m pytest tests/python/test_gpu.py -p no:cacheprovider \
        -rs -q --junitxml="$OUT/pytest_gpu.xml") > "$OUT/pytest_gpu.log" 2>&1; then
  echo "FAILED: pytest tests/python/test_gpu.py (see $OUT/pytest_gpu.log)" | tee -a "$OUT/FAILED.txt"
  status=1
fi
tail -3 "$OUT/pytest_gpu.log"
if grep -q "SKIPPED.*test_gpu.py.*no CUDA device" "$OUT/pytest_gpu.log"; then
  echo "FAILED: GPU tests skipped on a GPU machine" | tee -a "$OUT/FAILED.txt"
  status=1
fi

# --- benchmark ----------------------------------------------------------------------------------
stamp "GPU benchmark"
if ! timeout 240 python3 "$ROOT/bench/gpu/bench_gpu.py" --out "$OUT" > "$OUT/bench_gpu.log" 2>&1; then
  echo "FAILED: bench_gpu.py (see $OUT/bench_gpu.log)" | tee -a "$OUT/FAILED.txt"
  status=1
fi
cat "$OUT/bench_gpu.log"

stamp "done (exit $status); results in $OUT"
exit $status
