#!/usr/bin/env bash
# Thread-safety job: compiles the daemon (its libraries and weightsyncd) with
# clang's thread-safety analysis as errors (-Wthread-safety -Werror=thread-safety)
# into ./build-tsa (CUDA off, no tests, no optimisation). Annotations:
# daemon/core/thread_annotations.h. Cheap: one extra compile of the daemon,
# mostly ccache hits after the first run.
#
# Usage: scripts/thread-safety.sh      WS_JOBS=2 build parallelism
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=build-tsa
JOBS=${WS_JOBS:-2}
for t in clang clang++; do
  command -v "$t" >/dev/null || { echo "thread-safety.sh: $t not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$ROOT} CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-true}
start=$(date +%s)
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Debug \
    -DCMAKE_CXX_FLAGS_DEBUG="-O0" -DCMAKE_CXX_FLAGS="-Wthread-safety -Werror=thread-safety" \
    -DWS_WITH_CUDA=OFF -DWS_BUILD_TESTS=OFF -DWS_BUILD_BENCH=OFF >/dev/null
fi
ninja -C "$BUILD" -j"$JOBS" weightsyncd
echo "thread-safety.sh: clang -Wthread-safety clean ($(( $(date +%s) - start )) s)"
