#!/usr/bin/env bash
# Sanitizer job: builds weightsync with clang, AddressSanitizer (+ leak
# detection) and UndefinedBehaviorSanitizer into ./build-asan (CUDA off) and
# runs the unit tests and the `integration` ctest entry (real daemon and CLI
# processes, which write their reports into the log directory even when the
# test itself passes). Fails when a test fails or when any sanitizer report
# was written, and prints the reports.
#
# Usage: scripts/sanitize.sh [extra ctest arguments]
#   WS_JOBS=2        build parallelism
#   WS_TEST_JOBS=2   ctest parallelism for the unit tests
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=build-asan
JOBS=${WS_JOBS:-2}
LOGS="$ROOT/$BUILD/sanitizer-logs"

for t in clang clang++; do
  command -v "$t" >/dev/null || { echo "sanitize.sh: $t not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$ROOT} CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-true}
start=$(date +%s)
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  # -O1 and line tables only: enough for sanitizer stack traces, ~20% faster
  # to compile than -O2 -g; no NDEBUG, so library assertions stay on.
  CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -gline-tables-only" \
    -DWS_SANITIZE=address,undefined -DWS_WITH_CUDA=OFF -DWS_BUILD_BENCH=OFF >/dev/null
fi
cmake --build "$BUILD" -j "$JOBS"
built=$(date +%s)

rm -rf "$LOGS"
mkdir -p "$LOGS"
chmod 1777 "$LOGS"  # the security tests run daemons and clients as other users
# Reports go to $LOGS/{asan,ubsan}.<pid> (a process with both runtimes writes
# all of its reports to ubsan.<pid>); every process, daemon and CLI
# subprocesses included, inherits these. handle_sigbus=0: SIGBUS belongs to
# the host executor's fault guard (a peer truncating shared memory mid-copy);
# an unguarded one must still kill the process by SIGBUS, which
# tests/unit/dataplane/fault_guard_test.cc checks, not end in ASan's abort.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:handle_sigbus=0:log_path=$LOGS/asan"
export WS_SANITIZED=1  # memory bounds in the integration tests allow for ASan's overhead
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$LOGS/ubsan"

rc=0
ctest --test-dir "$BUILD" --output-on-failure -j "${WS_TEST_JOBS:-2}" -L unit "$@" || rc=1
ctest --test-dir "$BUILD" --output-on-failure -R '^integration$' "$@" || rc=1

reports=$(find "$LOGS" -type f | sort)
if [ -n "$reports" ]; then
  rc=1
  echo "sanitize.sh: sanitizer reports:" >&2
  for f in $reports; do
    echo "==== $f" >&2
    head -n 200 "$f" >&2
  done
fi
end=$(date +%s)
echo "sanitize.sh: build $((built - start))s, tests $((end - built))s"
if [ $rc -ne 0 ]; then
  echo "sanitize.sh: FAILED" >&2
  exit 1
fi
echo "sanitize.sh: unit + integration tests clean under ASan/LSan/UBSan"
