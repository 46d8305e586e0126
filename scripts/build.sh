#!/usr/bin/env bash
# Configures and builds weightsync into ./build (CUDA parts too when nvcc is
# found). Extra arguments are passed to cmake's configure step.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${WS_JOBS:-$(nproc)}
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
if [ ! -f build/CMakeCache.txt ]; then
  cmake -S . -B build "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@"
elif [ $# -gt 0 ]; then
  cmake -S . -B build "$@"
fi
cmake --build build -j "$JOBS"
