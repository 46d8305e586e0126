#!/usr/bin/env bash
# GPU check: one command on a GPU machine (docs/benchmarks.md).
#
# With the bundle (scripts/gpu-bundle.sh; .gpu-bundle/ next to this script,
# or this script inside it) it installs nothing, builds nothing and reaches
# nothing outside the machine: it needs the NVIDIA driver, and a Python with
# numpy, ml-dtypes, safetensors, grpcio, protobuf and torch (whose NCCL,
# site-packages/nvidia/nccl/lib/libnccl.so.2, the binaries load). Without a
# bundle it installs what is missing (scripts/install-deps.sh) and builds into
# $WS_GPU_BUILD_DIR (default build-gpu) for the visible GPUs first.
#
# Steps, each under a time limit inside a total budget (WS_GPU_BUDGET_S,
# default 450 s):
#   1. device facts (nvidia-smi, driver, Python packages, resolved libraries);
#   2. ws_gpu_tests (kernels, CUDA IPC, executor) and ws_dataplane_tests;
#   3. end-to-end syncs through the real daemon, trainer and engine ranks as
#      separate processes in cudaMalloc'ed memory, every architecture of
#      config/layouts, bit for bit against the numpy reference; colocated on
#      cuda:0, and cuda:0 -> cuda:1 when there are two GPUs (gpu_e2e.py arch);
#   3b. a sync across nodes GPU to GPU over NCCL: two daemons as nodes a and
#      b, one GPU each (CUDA_VISIBLE_DEVICES), trainer on a, engine on b, two
#      syncs bit-exact, every chunk over NCCL, the communicator reused
#      (nccl_two_nodes.py; skipped, visibly, with fewer than two GPUs);
#   4. the Python trainer: an FSDP2 module whose shards are CUDA tensors (CUDA
#      IPC), and one CPU-offloaded to pinned host memory (gpu_e2e.py torch);
#   4b. CUDA VMM memory (expandable segments on): PyTorch's tensors refused by
#      legacy IPC, the staging buffers weightsync allocates exportable,
#      bit-exact and freed (vmm_staging.py);
#   5. the benchmark: Llama-8B-shaped fp32 FSDP2 shards generated on the GPU,
#      W=4 trainer processes -> bf16 engine TP=2 on one GPU, steady-state sync
#      against a device-to-device copy floor of the same bytes timed with CUDA
#      events in the same run (gpu_e2e.py bench);
#   6. the executor micro-benchmarks (gpu_copy).
# Results: $WS_GPU_OUT/results.md (one markdown table, then each step's
# tables), logs beside it. WS_GPU_OUT defaults to /tmp/weightsync-gpu.
#
# Environment: WS_GPU_OUT, WS_PYTHON (default: .venv/bin/python, else
# python3), WS_NCCL_LIB_DIR (a folder with libnccl.so.2; default: the one of
# that Python's torch), WS_GPU_BUDGET_S, WS_SKIP_BENCH=1, WS_BENCH_LAYERS
# (default 32), WS_BENCH_REPEAT (default 5), WS_GPU_NO_BUNDLE=1 (build
# instead); without a bundle also WS_GPU_BUILD_DIR, WS_JOBS, WS_CUDA_ARCH,
# WS_SKIP_DEPS=1.
# Exit status: 0 when everything passed, 3 when no GPU is visible and
# everything that runs without one passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${WS_GPU_OUT:-/tmp/weightsync-gpu}
BUDGET=${WS_GPU_BUDGET_S:-450}
START=$SECONDS
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
declare -a SUMMARY=()
status=0
step() { echo; echo "== $* ($((SECONDS - START)) s)"; }
record() {  # record NAME RC [NOTE]
  local note=${3:+ ($3)}
  case "$2" in
    0) SUMMARY+=("| $1 | ok$note |") ;;
    skip) SUMMARY+=("| $1 | skipped$note |") ;;
    124) SUMMARY+=("| $1 | FAILED: time limit$note |"); status=1 ;;
    *) SUMMARY+=("| $1 | FAILED (exit $2)$note |"); status=1 ;;
  esac
}
# limit CAP: seconds a step may take, within what is left of the budget.
limit() {
  local left=$((BUDGET - (SECONDS - START) - 10))
  [ "$left" -lt "$1" ] && echo "$left" || echo "$1"
}
finish() {
  local result
  case "$1" in 0) result=OK ;; 3) result="NO GPU" ;; *) result=FAILED ;; esac
  {
    echo "# weightsync GPU check: $result"
    echo
    echo "| | |"
    echo "|---|---|"
    echo "| date | $(date -u +%Y-%m-%dT%H:%M:%SZ) |"
    echo "| GPUs | $(paste -sd';' "$OUT/gpus.txt" 2>/dev/null | sed 's/|/\//g' || true) |"
    echo "| binaries | $WHAT |"
    echo "| seconds | $((SECONDS - START)) |"
    echo
    echo "| step | result |"
    echo "|---|---|"
    printf '%s\n' "${SUMMARY[@]}"
    for t in arch/arch.md torch/torch.md bench/bench.md; do
      [ -f "$OUT/$t" ] && { echo; cat "$OUT/$t"; }
    done
  } >"$OUT/results.md"
  echo
  cat "$OUT/results.md"
  echo
  echo "logs: $OUT"
  echo "== result: $result"
  exit "$1"
}

# ---------------------------------------------------------------- binaries
BUNDLE=""
BUILD=""
WHAT="none"
if [ -f "$ROOT/BUNDLE.txt" ] && [ -x "$ROOT/bin/weightsyncd" ]; then
  BUNDLE=$ROOT
elif [ "${WS_GPU_NO_BUNDLE:-0}" != 1 ] && [ -f "$ROOT/.gpu-bundle/BUNDLE.txt" ]; then
  BUNDLE=$ROOT/.gpu-bundle
fi
PY=""
for c in "${WS_PYTHON:-}" "$ROOT/.venv/bin/python" "$ROOT/../.venv/bin/python" python3; do
  [ -n "$c" ] && command -v "$c" >/dev/null && { PY=$(command -v "$c"); break; }
done

step "device"
NGPU=0
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,uuid,memory.total,driver_version,compute_cap --format=csv,noheader | tee "$OUT/gpus.txt"
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  { nvidia-smi; nvidia-smi topo -m; } >"$OUT/nvidia-smi.txt" 2>&1 || true
else
  echo "nvidia-smi not found (no NVIDIA driver?)"
fi
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
  NGPU=$(echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
  echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES: $NGPU visible"
fi
{
  echo "host: $(uname -srm), $(nproc) cores, glibc $(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')"
  echo "python: ${PY:-none}"
  [ -n "$PY" ] && "$PY" - <<'EOF'
import importlib, sys
print("python", sys.version.split()[0])
for m in ("numpy", "ml_dtypes", "safetensors", "grpc", "google.protobuf", "torch"):
    try:
        print(m, getattr(importlib.import_module(m), "__version__", "?"))
    except Exception as e:
        print(m, "MISSING:", e)
try:
    import torch
    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available())
except Exception:
    pass
EOF
} 2>&1 | tee "$OUT/host.txt"

if [ -n "$BUNDLE" ]; then
  step "bundle $BUNDLE"
  cat "$BUNDLE/BUNDLE.txt"
  BUILD=$BUNDLE/bin
  SRC=$BUNDLE
  WHAT="bundle, commit $(sed -n 's/^commit: //p' "$BUNDLE/BUNDLE.txt")"
  need=$(sed -n 's/^glibc needed: //p' "$BUNDLE/BUNDLE.txt")
  have=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')
  if [ -n "$need" ] && [ -n "$have" ] && [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -n 1)" != "$need" ]; then
    echo "this machine has glibc $have; the bundle needs $need"
    record "glibc $have >= $need" 1; finish 1
  fi
  # NCCL: the machine's torch ships it; link it into the bundle's lib/, which
  # the binaries' RPATH searches first.
  NCCL_DIR=${WS_NCCL_LIB_DIR:-}
  if [ -z "$NCCL_DIR" ] && [ -n "$PY" ]; then
    NCCL_DIR=$("$PY" -c 'import os, nvidia.nccl as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
  fi
  if [ -n "$NCCL_DIR" ] && [ -f "$NCCL_DIR/libnccl.so.2" ]; then
    ln -sfn "$NCCL_DIR/libnccl.so.2" "$BUNDLE/lib/libnccl.so.2"
    echo "libnccl.so.2: $NCCL_DIR"
  elif ldconfig -p 2>/dev/null | grep -q 'libnccl\.so\.2 '; then
    echo "libnccl.so.2: the system's ($(ldconfig -p | awk '/libnccl\.so\.2 /{print $NF; exit}'))"
  else
    echo "libnccl.so.2 not found: no torch with NCCL in ${PY:-any python} (set WS_NCCL_LIB_DIR)"
    record "libnccl.so.2" 1; finish 1
  fi
  missing=0
  for b in "$BUILD"/*; do
    echo "== $b"; ldd "$b"
  done >"$OUT/ldd.txt" 2>&1
  if grep -q 'not found' "$OUT/ldd.txt"; then
    grep -B0 'not found' "$OUT/ldd.txt" | sort -u; missing=1
  fi
  record "bundle libraries resolve" "$missing"
  [ "$missing" -eq 0 ] || finish 1
else
  SRC=$ROOT
  BUILD=${WS_GPU_BUILD_DIR:-build-gpu}
  WHAT="build $BUILD"
  JOBS=${WS_JOBS:-$(nproc)}
  step "dependencies"
  NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
  if [ ! -x "$NVCC" ]; then
    echo "no CUDA toolkit (nvcc not in PATH or /usr/local/cuda/bin) and no bundle (scripts/gpu-bundle.sh)"
    record "CUDA toolkit" 1
    finish 1
  fi
  deps_ok() {
    command -v cmake >/dev/null && command -v pkg-config >/dev/null && pkg-config --exists grpc++ protobuf &&
      command -v protoc >/dev/null && [ -n "$PY" ] &&
      "$PY" -c "import numpy, ml_dtypes, safetensors, pytest" 2>/dev/null
  }
  if deps_ok; then
    echo "present"
  elif [ "${WS_SKIP_DEPS:-0}" = 1 ]; then
    echo "missing dependencies and WS_SKIP_DEPS=1"; record dependencies 1; finish 1
  else
    scripts/install-deps.sh 2>&1 | tee "$OUT/install-deps.log"
    rc=${PIPESTATUS[0]}; record dependencies "$rc"; [ "$rc" -eq 0 ] || finish 1
    PY=$ROOT/.venv/bin/python
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
  START=$SECONDS  # the budget covers the checks, not the build
fi
bin() {
  local b
  for b in "$BUILD/$1" "$BUILD/tests/$1" "$BUILD/bench/$1"; do [ -x "$b" ] && { echo "$b"; return; }; done
  echo "$BUILD/$1"
}

step "ws_gpu_tests"
timeout -k 10 "$(limit 150)" "$(bin ws_gpu_tests)" --gtest_color=no 2>&1 | tee "$OUT/gpu_tests.log" |
  grep -E "^\[ +(OK|FAILED|SKIPPED|PASSED) |Failure|no usable CUDA|no CUDA device"
rc=${PIPESTATUS[0]}; record ws_gpu_tests "$rc" "$(grep -c '^\[       OK \]' "$OUT/gpu_tests.log") passed, $(grep -c '^\[  SKIPPED \]' "$OUT/gpu_tests.log") skipped"
if [ "$NGPU" -gt 0 ] && grep -qE "^\[  SKIPPED \]" "$OUT/gpu_tests.log"; then
  echo "GPU tests skipped although nvidia-smi lists a GPU"; record "ws_gpu_tests ran on the GPU" 1
fi

step "ws_dataplane_tests"
timeout -k 10 "$(limit 90)" "$(bin ws_dataplane_tests)" --gtest_color=no --gtest_brief=1 >"$OUT/dataplane_tests.log" 2>&1
rc=$?; tail -n 3 "$OUT/dataplane_tests.log"; record ws_dataplane_tests "$rc"

step "python client"
if [ -z "$PY" ]; then
  echo "no python"; record "python client imports" 1
else
  PYTHONPATH=$SRC/client/python "$PY" -c 'import weightsync, google.protobuf, grpc
print("weightsync", weightsync.__file__, "protobuf", google.protobuf.__version__, "grpcio", grpc.__version__)' 2>&1 |
    tee "$OUT/python_client.log"
  record "python client imports" "${PIPESTATUS[0]}"
fi

NCCL_STEP="NCCL across nodes (2 daemons, GPU 0 -> GPU 1)"
if [ "$NGPU" -lt 1 ]; then
  echo; echo "no GPU visible: the end-to-end runs and the benchmark need one"
  echo "SKIP: $NCCL_STEP needs two GPUs; 0 visible"
  record "$NCCL_STEP" skip "needs 2 GPUs, 0 visible"
  [ "$status" -eq 0 ] && finish 3
  finish 1
fi

E2E=$SRC/tests/gpu/gpu_e2e.py
run_e2e() {  # run_e2e NAME CAP ARGS...
  local name=$1 cap; cap=$(limit "$2"); shift 2
  if [ "$cap" -lt 20 ]; then record "$name" skip "time budget spent"; return; fi
  timeout -k 15 "$cap" "$PY" "$E2E" "$@" --build "$BUILD"
  record "$name" $?
}

step "end-to-end: every architecture, trainer and engine processes in device memory"
run_e2e "e2e architectures ($([ "$NGPU" -ge 2 ] && echo "1 and 2 GPUs" || echo "1 GPU; 2-GPU placement skipped"))" 150 \
  arch --out "$OUT/arch"

step "across nodes: two daemons, GPU to GPU over NCCL"
if [ "$NGPU" -lt 2 ]; then
  echo "SKIP: $NCCL_STEP needs two GPUs; $NGPU visible"
  record "$NCCL_STEP" skip "needs 2 GPUs, $NGPU visible"
else
  cap=$(limit 150)
  if [ "$cap" -lt 30 ]; then
    record "$NCCL_STEP" skip "time budget spent"
  else
    timeout -k 15 "$cap" "$PY" "$SRC/tests/gpu/nccl_two_nodes.py" --build "$BUILD" --out "$OUT/nccl" 2>&1 |
      tee "$OUT/nccl_two_nodes.log"
    record "$NCCL_STEP" "${PIPESTATUS[0]}"
  fi
fi

step "end-to-end: Python FSDP2 trainer, CUDA IPC and pinned-host sources"
run_e2e "e2e torch FSDP2 (cuda, cpu-offload)" 120 torch --out "$OUT/torch" --device cuda:0

step "CUDA VMM memory (expandable segments): exportable staging buffers"
cap=$(limit 60)
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout -k 5 "$cap" "$PY" "$SRC/tests/gpu/vmm_staging.py" 2>&1 |
  tee "$OUT/vmm_staging.log"
record "VMM staging buffers" "${PIPESTATUS[0]}"

if [ "${WS_SKIP_BENCH:-0}" != 1 ]; then
  step "benchmark: Llama-8B shape, fp32 W=4 -> bf16 TP=2, colocated on cuda:0"
  run_e2e "sync benchmark" 180 bench --out "$OUT/bench" --repeat "${WS_BENCH_REPEAT:-5}" \
    ${WS_BENCH_LAYERS:+--layers "$WS_BENCH_LAYERS"}

  step "executor micro-benchmarks"
  cap=$(limit 40)
  if [ "$cap" -lt 15 ]; then
    record gpu_copy skip "time budget spent"
  else
    timeout -k 5 "$cap" "$(bin gpu_copy)" --repeats 5 2>&1 | tee "$OUT/gpu_copy.json"
    record gpu_copy "${PIPESTATUS[0]}"
  fi
fi

finish "$status"
