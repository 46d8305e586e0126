#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer + ASan/UBSan, clang). Builds the
# ws_fuzz_* targets (tests/fuzz) into ./build-fuzz, replays each committed
# corpus (tests/fuzz/corpus/<target>: seeds and past findings) in full, then
# fuzzes each target for SECONDS_PER_TARGET (default 30) over a scratch copy
# of that corpus. Fails on any crash, leak, timeout or OOM and prints the
# reproducer; rerun one with: build-fuzz/tests/fuzz/ws_fuzz_<target> <file>.
#
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]
#   WS_FUZZ_TARGETS="expr manifest"  only these targets
#   WS_JOBS=2                        build parallelism
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SECONDS_PER_TARGET=${1:-30}
JOBS=${WS_JOBS:-2}
BUILD=build-fuzz
ALL_TARGETS=(manifest register hf_config layout_rules mapping expr)
read -r -a TARGETS <<<"${WS_FUZZ_TARGETS:-${ALL_TARGETS[*]}}"

# Longest input each target mutates to (the committed corpus replays in full).
max_len() {
  case $1 in
    manifest|register) echo 8192 ;;
    layout_rules) echo 16384 ;;
    hf_config) echo 4096 ;;
    mapping) echo 2048 ;;
    expr) echo 512 ;;
    *) echo 4096 ;;
  esac
}

for t in clang clang++; do
  command -v "$t" >/dev/null || { echo "fuzz.sh: $t not found (scripts/install-deps.sh installs it)" >&2; exit 1; }
done
export CCACHE_DIR=${CCACHE_DIR:-$HOME/.cache/ccache}
export CCACHE_BASEDIR=${CCACHE_BASEDIR:-$ROOT} CCACHE_NOHASHDIR=${CCACHE_NOHASHDIR:-true}
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  CC=clang CXX=clang++ cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DWS_FUZZ=ON -DWS_WITH_CUDA=OFF -DWS_BUILD_TESTS=OFF -DWS_BUILD_BENCH=OFF >/dev/null
fi
ninja -C "$BUILD" -j "$JOBS" "${TARGETS[@]/#/ws_fuzz_}"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
RUN="$ROOT/$BUILD/fuzz-run"
failed=()
for t in "${TARGETS[@]}"; do
  bin="$ROOT/$BUILD/tests/fuzz/ws_fuzz_$t"
  seeds="$ROOT/tests/fuzz/corpus/$t"
  work="$RUN/$t"
  rm -rf "$work"
  mkdir -p "$work/corpus" "$work/artifacts"
  cp -r "$seeds/." "$work/corpus/"
  common=(-timeout=10 -rss_limit_mb=2048 -artifact_prefix="$work/artifacts/")
  dict=()
  case $t in manifest|register) ;; *) dict=(-dict="$ROOT/tests/fuzz/json.dict") ;; esac
  echo "== ws_fuzz_$t: replaying $(ls "$seeds" | wc -l) committed inputs, then fuzzing ${SECONDS_PER_TARGET}s"
  rc=0
  "$bin" "${common[@]}" -runs=0 "$seeds" >"$work/replay.log" 2>&1 || rc=$?
  if [ $rc -eq 0 ]; then
    "$bin" "${common[@]}" -max_total_time="$SECONDS_PER_TARGET" -max_len="$(max_len "$t")" \
      -print_final_stats=1 -print_funcs=0 "${dict[@]}" "$work/corpus" >"$work/fuzz.log" 2>&1 || rc=$?
    log="$work/fuzz.log"
  else
    log="$work/replay.log"
  fi
  found=$(find "$work/artifacts" -type f | sort)
  if [ $rc -ne 0 ] || [ -n "$found" ]; then
    failed+=("$t")
    echo "!! ws_fuzz_$t failed (exit $rc); last lines of $log:"
    tail -n 60 "$log" | sed 's/^/   /'
    if [ -n "$found" ]; then
      echo "!! reproducer(s):"
      echo "$found" | sed 's/^/   /'
    else
      echo "!! (a committed input failed the replay: see the log above)"
    fi
    echo "!! rerun: $bin <reproducer>"
  else
    stats=$(grep -E '^stat::(number_of_executed_units|peak_rss_mb|new_units_added)' "$log" | tr -s ' ' | sed 's/stat:://' | paste -sd' ' -)
    echo "   ok: $stats; corpus $(ls "$work/corpus" | wc -l) inputs"
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz.sh: all ${#TARGETS[@]} targets clean (${SECONDS_PER_TARGET}s each)"
