#!/usr/bin/env bash
# GPU check: builds the CUDA data plane and its tests into ./build-gpu, runs
# the GPU tests (they skip, visibly, without a device), the data-plane unit
# tests, and the GPU copy benchmark with the memcpy floors measured in the
# same run. Exit status: non-zero if a build or a test fails.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${WS_GPU_BUILD_DIR:-build-gpu}
JOBS=${WS_JOBS:-$(nproc)}
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

echo "== device"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version --format=csv,noheader || true
else
  echo "nvidia-smi not found (no NVIDIA driver?)"
fi

echo "== configure + build ($BUILD)"
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DWS_WITH_CUDA=ON || exit 1
fi
cmake --build "$BUILD" -j "$JOBS" --target ws_gpu_tests ws_dataplane_tests gpu_copy memcpy_floor || exit 1

status=0
echo "== ws_gpu_tests"
"$BUILD/tests/ws_gpu_tests" --gtest_color=no 2>&1 | tee "$BUILD/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
grep -E "^\[  (PASSED|SKIPPED|FAILED) " "$BUILD/gpu_tests.log" | sed 's/^/summary: /'

echo "== ws_dataplane_tests"
"$BUILD/tests/ws_dataplane_tests" --gtest_color=no --gtest_brief=1 2>&1 | tail -n 5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== benchmarks"
"$BUILD/bench/memcpy_floor" --bytes 1G --repeats 5 || status=1
"$BUILD/bench/gpu_copy" --repeats 5 || status=1
echo "TODO: end-to-end GPU sync benchmark (trainer CUDA IPC shards -> engine CUDA IPC params through the daemon) is not written yet"

echo "== result: $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
