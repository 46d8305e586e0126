#!/usr/bin/env bash
# GPU check, one command on a fresh GPU machine:
#   1. dependencies: scripts/install-deps.sh when something is missing (the
#      CUDA toolkit itself must already be installed, e.g. /usr/local/cuda);
#   2. configure + build with CUDA (architecture of the visible GPUs);
#   3. ws_gpu_tests (kernels, CUDA IPC, executor) and ws_dataplane_tests;
#   4. end-to-end syncs through the real daemon, trainer and engine ranks as
#      separate processes in cudaMalloc'ed memory, every architecture of
#      config/layouts, checked bit for bit against the numpy reference;
#      colocated on cuda:0, and engine on cuda:1 when there are two GPUs
#      (tests/gpu/gpu_e2e.py arch);
#   5. the benchmark: Llama-8B-shaped fp32 trainer (W=4 processes) into a
#      bf16 engine (TP=2) on one GPU, steady-state sync time against a
#      device-to-device copy floor of the same bytes (gpu_e2e.py bench);
#   6. the executor micro-benchmarks (bench/gpu_copy).
# Logs and results go under $WS_GPU_OUT (default /tmp/weightsync-gpu).
#
# Environment: WS_GPU_OUT, WS_GPU_BUILD_DIR (default build-gpu), WS_JOBS,
# WS_CUDA_ARCH (e.g. 90; default: detected), WS_SKIP_DEPS=1, WS_SKIP_BENCH=1,
# WS_BENCH_LAYERS (default 32), WS_BENCH_REPEAT (default 5).
# Exit status: 0 when everything passed, 3 when no GPU is visible (only the
# build ran), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${WS_GPU_BUILD_DIR:-build-gpu}
OUT=${WS_GPU_OUT:-/tmp/weightsync-gpu}
JOBS=${WS_JOBS:-$(nproc)}
PY=$ROOT/.venv/bin/python
mkdir -p "$OUT"
declare -a SUMMARY=()
status=0
step() { echo; echo "== $*"; }
record() {  # record NAME RC
  if [ "$2" -eq 0 ]; then SUMMARY+=("| $1 | ok |"); else SUMMARY+=("| $1 | FAILED (exit $2) |"); status=1; fi
}
finish() {
  echo
  echo "| step | result |"
  echo "|---|---|"
  printf '%s\n' "${SUMMARY[@]}"
  echo
  echo "logs: $OUT"
  echo "== result: $([ "$1" -eq 0 ] && echo OK || { [ "$1" -eq 3 ] && echo "NO GPU" || echo FAILED; })"
  exit "$1"
}

step "device"
NGPU=0
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpus.txt"
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  nvidia-smi topo -m >"$OUT/topology.txt" 2>&1 || true
else
  echo "nvidia-smi not found (no NVIDIA driver?)"
fi
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
  echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: $NGPU visible"
fi

step "dependencies"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
if [ ! -x "$NVCC" ]; then
  echo "no CUDA toolkit (nvcc not in PATH or /usr/local/cuda/bin): install one first"
  record "CUDA toolkit" 1
  finish 1
fi
deps_ok() {
  command -v cmake >/dev/null && command -v pkg-config >/dev/null && pkg-config --exists grpc++ protobuf &&
    command -v protoc >/dev/null && [ -x "$PY" ] &&
    "$PY" -c "import numpy, ml_dtypes, safetensors, pytest" 2>/dev/null
}
if deps_ok; then
  echo "present"
elif [ "${WS_SKIP_DEPS:-0}" = 1 ]; then
  echo "missing dependencies and WS_SKIP_DEPS=1"; record dependencies 1; finish 1
else
  scripts/install-deps.sh 2>&1 | tee "$OUT/install-deps.log"
  rc=${PIPESTATUS[0]}; record dependencies "$rc"; [ "$rc" -eq 0 ] || finish 1
fi

step "configure + build ($BUILD)"
ARCH=${WS_CUDA_ARCH:-}
if [ -z "$ARCH" ] && [ "$NGPU" -gt 0 ]; then
  ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' .' | sort -u | paste -sd';' -)
fi
GEN=()
command -v ninja >/dev/null && [ ! -f "$BUILD/CMakeCache.txt" ] && GEN=(-G Ninja)
CONF=(-DCMAKE_BUILD_TYPE=RelWithDebInfo -DWS_WITH_CUDA=ON -DCMAKE_CUDA_COMPILER="$NVCC")
[ -n "$ARCH" ] && CONF+=("-DCMAKE_CUDA_ARCHITECTURES=$ARCH")
{ cmake -S . -B "$BUILD" "${GEN[@]}" "${CONF[@]}" &&
  cmake --build "$BUILD" -j "$JOBS" --target weightsyncd weightsyncctl ws_gpu_tests ws_dataplane_tests gpu_copy gpu_floor
} 2>&1 | tee "$OUT/build.log" | grep -E "error|warning:|CUDA data plane|Linking"
rc=${PIPESTATUS[0]}; record "build (CUDA arch ${ARCH:-default})" "$rc"
[ "$rc" -eq 0 ] || { tail -n 30 "$OUT/build.log"; finish 1; }

step "ws_gpu_tests"
"$BUILD/tests/ws_gpu_tests" --gtest_color=no 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "^\[ +(OK|FAILED|SKIPPED|PASSED) |Failure"
rc=${PIPESTATUS[0]}; record ws_gpu_tests "$rc"
if [ "$NGPU" -gt 0 ] && grep -qE "^\[  SKIPPED \]" "$OUT/gpu_tests.log"; then
  echo "GPU tests skipped although nvidia-smi lists a GPU"; record "ws_gpu_tests ran on the GPU" 1
fi

step "ws_dataplane_tests"
"$BUILD/tests/ws_dataplane_tests" --gtest_color=no --gtest_brief=1 >"$OUT/dataplane_tests.log" 2>&1
rc=$?; tail -n 3 "$OUT/dataplane_tests.log"; record ws_dataplane_tests "$rc"

if [ "$NGPU" -lt 1 ]; then
  echo; echo "no GPU visible: the end-to-end runs and the benchmark need one"
  finish 3
fi

step "end-to-end: every architecture, trainer and engine processes in device memory"
"$PY" tests/gpu/gpu_e2e.py arch --build "$BUILD" --out "$OUT/arch"
record "e2e architectures ($([ "$NGPU" -ge 2 ] && echo "1 and 2 GPUs" || echo "1 GPU"))" $?

if [ "${WS_SKIP_BENCH:-0}" != 1 ]; then
  step "benchmark: Llama-8B shape, fp32 W=4 -> bf16 TP=2, colocated on cuda:0"
  "$PY" tests/gpu/gpu_e2e.py bench --build "$BUILD" --out "$OUT/bench" --repeat "${WS_BENCH_REPEAT:-5}" \
    ${WS_BENCH_LAYERS:+--layers "$WS_BENCH_LAYERS"}
  record "sync benchmark" $?

  step "executor micro-benchmarks"
  "$BUILD/bench/gpu_copy" --repeats 5 2>&1 | tee "$OUT/gpu_copy.json"
  record "gpu_copy" "${PIPESTATUS[0]}"
fi

finish "$status"
