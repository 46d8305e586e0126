#!/usr/bin/env bash
# Assembles the GPU bundle: everything scripts/gpu-check.sh needs on a bare,
# offline GPU machine that has a CUDA driver and a Python with torch, but none
# of the C++ libraries weightsync builds against (docs/benchmarks.md).
#
#   scripts/gpu-bundle.sh            # -> .gpu-bundle/ (ignored by git)
#
# Builds the CUDA targets (daemon, CLI, GPU tests, GPU benchmarks) in a build
# directory with the CUDA data plane: $WS_GPU_BUNDLE_BUILD, else ./build when
# it is such a build (the one scripts/build.sh makes where nvcc exists), else
# ./build-cuda (configured here with -DWS_WITH_CUDA=ON). The build must carry
# sm_90 machine code (the CMake default has sm_90a, plus Ampere, Blackwell and
# compute_80 PTX).
#
# Layout (paths mirror the repository, so gpu-check.sh runs from a copy):
#   bin/      stripped binaries, DT_RPATH $ORIGIN/../lib
#   lib/      every shared library they load except glibc, the CUDA driver
#             (libcuda.so.1) and NCCL (libnccl.so.2: gpu-check.sh links the
#             one of the machine's torch in at run time); the CUDA runtime is
#             linked statically
#   config/layouts, client/python/weightsync, tests/gpu, tests/reference,
#   scripts/gpu-check.sh, BUNDLE.txt (commit, CUDA code, glibc needed, size)
#
# Environment: WS_GPU_BUNDLE_OUT (default .gpu-bundle), WS_GPU_BUNDLE_BUILD,
# WS_JOBS, WS_BUNDLE_MAX_MIB (default 60: larger fails).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${WS_GPU_BUNDLE_OUT:-$ROOT/.gpu-bundle}
JOBS=${WS_JOBS:-$(nproc)}
MAX_MIB=${WS_BUNDLE_MAX_MIB:-60}
BINS=(weightsyncd weightsyncctl ws_gpu_tests ws_dataplane_tests gpu_floor gpu_copy)

has_cuda_targets() { [ -f "$1/CMakeCache.txt" ] && cmake --build "$1" --target help 2>/dev/null | grep -q 'ws_gpu_tests'; }
BUILD=${WS_GPU_BUNDLE_BUILD:-}
if [ -z "$BUILD" ]; then
  if has_cuda_targets build; then BUILD=build; else BUILD=build-cuda; fi
fi
if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
  cmake -S . -B "$BUILD" "${GEN[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DWS_WITH_CUDA=ON
fi
has_cuda_targets "$BUILD" || { echo "gpu-bundle: $BUILD is not a CUDA build (configure it with -DWS_WITH_CUDA=ON)" >&2; exit 1; }
echo "gpu-bundle: building ${BINS[*]} in $BUILD"
cmake --build "$BUILD" -j "$JOBS" --target "${BINS[@]}"

# The CUDA code the build carries, from its compile command.
GENCODE=$(python3 - "$BUILD/compile_commands.json" <<'EOF'
import json, re, sys
cmds = [c["command"] for c in json.load(open(sys.argv[1])) if c["file"].endswith("cuda_executor.cu")]
print(" ".join(sorted(set(re.findall(r"code=\[?([a-z_0-9,]+)\]?", cmds[0])))) if cmds else "")
EOF
)
case " ${GENCODE//,/ } " in
  *" sm_90 "* | *" sm_90a "*) ;;
  *) echo "gpu-bundle: $BUILD has no sm_90 machine code (CUDA code: ${GENCODE:-none}); reconfigure without CMAKE_CUDA_ARCHITECTURES or include 90a-real" >&2; exit 1 ;;
esac

find_bin() {
  local b
  for b in "$BUILD/$1" "$BUILD/tests/$1" "$BUILD/bench/$1"; do [ -x "$b" ] && { echo "$b"; return; }; done
  echo "gpu-bundle: $1 not built in $BUILD" >&2; exit 1
}
# Libraries that stay the machine's: glibc and the dynamic loader, the CUDA
# driver, NCCL.
system_lib() {
  case "$1" in
    linux-vdso.so.* | ld-linux*.so.* | libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | \
      libresolv.so.* | libutil.so.* | libanl.so.* | libcuda.so.* | libnccl.so.*) return 0 ;;
  esac
  return 1
}

rm -rf "$OUT"
mkdir -p "$OUT/bin" "$OUT/lib" "$OUT/scripts" "$OUT/config" "$OUT/client/python" "$OUT/tests/gpu" "$OUT/tests/reference"
declare -A LIBS=()
for name in "${BINS[@]}"; do
  src=$(find_bin "$name")
  if ! grep -q 'ORIGIN/../lib' <(readelf -d "$src"); then
    echo "gpu-bundle: $src has no \$ORIGIN/../lib RPATH (stale build? reconfigure $BUILD)" >&2; exit 1
  fi
  strip --strip-all -o "$OUT/bin/$name" "$src"
  while read -r soname _ path _; do
    system_lib "$soname" && continue
    [ "$path" = "not" ] && { echo "gpu-bundle: $name needs $soname, which is not found here" >&2; exit 1; }
    LIBS[$soname]=$path
  done < <(ldd "$src" | awk '$2 == "=>" {print $1, $2, $3, $4}')
done
for soname in "${!LIBS[@]}"; do
  cp -L "${LIBS[$soname]}" "$OUT/lib/$soname"
  chmod 0644 "$OUT/lib/$soname"
done

cp scripts/gpu-check.sh "$OUT/scripts/"
cp -r config/layouts "$OUT/config/"
cp -r client/python/weightsync "$OUT/client/python/"
cp tests/gpu/*.py "$OUT/tests/gpu/"
cp tests/reference/*.py "$OUT/tests/reference/"
find "$OUT" -name __pycache__ -prune -exec rm -rf {} +

# The newest glibc symbol version anything in the bundle needs.
GLIBC_NEED=$(for f in "$OUT"/bin/* "$OUT"/lib/*; do objdump -T "$f"; done 2>/dev/null |
  grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -n 1)
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD 2>/dev/null || COMMIT="$COMMIT (with uncommitted changes)"
BYTES=$(du -sb "$OUT" | cut -f1)
MIB=$(awk -v b="$BYTES" 'BEGIN { printf "%.1f", b / 1048576 }')
{
  echo "weightsync GPU bundle"
  echo "commit: $COMMIT"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m), from $BUILD"
  echo "nvcc: $("$(sed -n 's/^CMAKE_CUDA_COMPILER:[A-Z]*=//p' "$BUILD/CMakeCache.txt")" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo unknown)"
  echo "cuda code: $GENCODE"
  echo "cuda runtime: static; needs the driver (libcuda.so.1) and libnccl.so.2 at run time"
  echo "glibc needed: $GLIBC_NEED"
  echo "size: $MIB MiB"
  echo "libraries: $(cd "$OUT/lib" && ls | tr '\n' ' ')"
} >"$OUT/BUNDLE.txt"
cat "$OUT/BUNDLE.txt"
echo "gpu-bundle: $OUT: $MIB MiB ($BYTES bytes; limit $MAX_MIB MiB)"
if [ "$BYTES" -gt $((MAX_MIB * 1048576)) ]; then
  echo "gpu-bundle: the bundle is larger than $MAX_MIB MiB" >&2
  exit 1
fi
