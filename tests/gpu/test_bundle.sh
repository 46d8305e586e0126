#!/usr/bin/env bash
# Self-containment test of the GPU bundle (scripts/gpu-bundle.sh), no GPU needed:
#   1. ldd: every library the bundle's binaries resolve is in the bundle, or
#      is glibc, the CUDA driver, the CUDA runtime or NCCL;
#   2. a root directory holding only the dynamic loader and glibc (copied from
#      this host), NCCL (as the GPU machine's torch provides it) and a copy of
#      the bundle, entered with chroot: weightsyncd --version, the daemon
#      started and SERVING to the bundle's weightsyncctl, ws_gpu_tests
#      skipping without a driver;
#   3. the bundle's gpu-check.sh, run from a copy of the bundle in a temp
#      folder with no build folder and no LD_LIBRARY_PATH, to its "no GPU"
#      ending (exit 3) within its time budget.
# Usage: tests/gpu/test_bundle.sh [BUNDLE]   (default .gpu-bundle)
# Environment: WS_PYTHON (a Python with numpy, grpcio, protobuf; default
# .venv/bin/python), WS_NCCL_LIB (a libnccl.so.2; default: torch's, else the
# system's).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
BUNDLE=$(cd "${1:-.gpu-bundle}" && pwd)
PY=${WS_PYTHON:-$ROOT/.venv/bin/python}
[ -f "$BUNDLE/BUNDLE.txt" ] || { echo "no bundle at $BUNDLE (scripts/gpu-bundle.sh)"; exit 1; }
WORK=$(mktemp -d /tmp/ws-bundle-test.XXXXXX)
DAEMON_PID=""
cleanup() {
  [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
fail() { echo "FAIL: $*"; exit 1; }
echo "bundle: $BUNDLE, $(du -sh "$BUNDLE" | cut -f1)"

# ---------------------------------------------------------------- 1. ldd
echo "== ldd"
bad=0
for b in "$BUNDLE"/bin/*; do
  while read -r soname arrow path _; do
    [ "$arrow" = "=>" ] || continue
    case "$soname" in
      libc.so.* | libm.so.* | libpthread.so.* | libdl.so.* | librt.so.* | libresolv.so.* | libutil.so.* | \
        libcuda.so.* | libcudart.so.* | libnccl.so.*) continue ;;
    esac
    case "$path" in
      "$BUNDLE"/bin/../lib/* | "$BUNDLE"/lib/*) ;;
      *) echo "$(basename "$b"): $soname => $path (not in the bundle)"; bad=1 ;;
    esac
  done < <(ldd "$b")
done
[ "$bad" -eq 0 ] || fail "libraries resolved outside the bundle"
echo "every library is the bundle's, glibc's, or CUDA driver/runtime/NCCL"

# ---------------------------------------------------------------- NCCL
NCCL=${WS_NCCL_LIB:-}
if [ -z "$NCCL" ] && [ -x "$PY" ]; then
  d=$("$PY" -c 'import os, nvidia.nccl as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)
  [ -n "$d" ] && [ -f "$d/libnccl.so.2" ] && NCCL=$d/libnccl.so.2
fi
[ -n "$NCCL" ] || NCCL=$(ldconfig -p | awk '/libnccl\.so\.2 /{print $NF; exit}')
[ -f "$NCCL" ] || fail "no libnccl.so.2 to stand in for the GPU machine's (set WS_NCCL_LIB)"
echo "NCCL for the test: $NCCL"

# ---------------------------------------------------------------- 2. chroot
echo "== minimal root: loader + glibc + NCCL + bundle"
R=$WORK/root
mkdir -p "$R/tmp" "$R/dev/shm" "$R/opt/nccl" "$R/etc" "$R/proc"
chmod 1777 "$R/tmp"
# glibc as the binaries resolve it (the loader and libc.so.6, libm.so.6, ...)
for f in $(ldd "$BUNDLE"/bin/* "$NCCL" | awk '
    $1 ~ /^(libc|libm|libpthread|libdl|librt|libresolv|libutil)\.so/ && $2 == "=>" {print $3}
    $1 ~ /ld-linux/ {print $1}' | sort -u); do
  mkdir -p "$R$(dirname "$f")"
  cp -L "$f" "$R$f"
done
cp -L "$NCCL" "$R/opt/nccl/libnccl.so.2"
cp -a "$BUNDLE" "$R/bundle"
ln -sfn /opt/nccl/libnccl.so.2 "$R/bundle/lib/libnccl.so.2"
echo "root: $(find "$R" -type f | wc -l) files; $(find "$R" -name 'libstdc++*' | sed "s#$R##" | paste -sd' ' -)"
# The loader resolves $ORIGIN through /proc/self/exe: the root gets its own
# /proc, mounted in a private mount namespace (gone when the process exits).
# unshare and bash exec into chroot and then the binary: one PID throughout.
ENTER="$(command -v mount) -t proc proc \"\$0/proc\" && exec $(command -v chroot) \"\$0\" \"\$@\""
UNSHARE=("$(command -v unshare)" --mount --propagation private)
[ "$(id -u)" = 0 ] || UNSHARE+=(-r)
CHROOT=("${UNSHARE[@]}" -- "$(command -v bash)" -c "$ENTER" "$R")
in_root() { env -i PATH=/bundle/bin "${CHROOT[@]}" "$@"; }

v=$(in_root /bundle/bin/weightsyncd --version) || fail "weightsyncd --version in the minimal root"
echo "weightsyncd --version: $v"
in_root /bundle/bin/weightsyncctl --version >/dev/null || fail "weightsyncctl --version in the minimal root"
env -i "${CHROOT[@]}" /bundle/bin/weightsyncd --listen unix:/tmp/d.sock --layouts-dir /bundle/config/layouts \
  >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
state=""
for _ in $(seq 1 100); do
  state=$(in_root /bundle/bin/weightsyncctl --daemon unix:/tmp/d.sock health --timeout 2 2>/dev/null || true)
  [ "$state" = SERVING ] && break
  kill -0 "$DAEMON_PID" 2>/dev/null || { cat "$WORK/daemon.log"; fail "weightsyncd exited in the minimal root"; }
  sleep 0.2
done
[ "$state" = SERVING ] || { cat "$WORK/daemon.log"; fail "weightsyncd not SERVING in the minimal root"; }
echo "daemon in the minimal root: $state"
in_root /bundle/bin/weightsyncctl --daemon unix:/tmp/d.sock status >/dev/null || fail "weightsyncctl status"
kill -TERM "$DAEMON_PID"
wait "$DAEMON_PID" || fail "weightsyncd exited non-zero on SIGTERM: $(tail -n 5 "$WORK/daemon.log")"
DAEMON_PID=""
in_root /bundle/bin/ws_gpu_tests --gtest_brief=1 >"$WORK/gpu_tests.log" 2>&1 ||
  { tail -n 20 "$WORK/gpu_tests.log"; fail "ws_gpu_tests in the minimal root"; }
grep -q 'SKIPPED' "$WORK/gpu_tests.log" || fail "ws_gpu_tests ran GPU tests without a GPU?"
echo "ws_gpu_tests in the minimal root: $(grep -c '^\[  SKIPPED \]' "$WORK/gpu_tests.log") skipped without a driver"

# ---------------------------------------------------------------- 3. gpu-check.sh
echo "== gpu-check.sh from a copy of the bundle"
cp -a "$BUNDLE" "$WORK/copy"
rm -f "$WORK/copy/lib/libnccl.so.2"
t0=$SECONDS
set +e
(cd / && env -u LD_LIBRARY_PATH WS_PYTHON="$PY" WS_NCCL_LIB_DIR="$(dirname "$NCCL")" WS_GPU_OUT="$WORK/out" \
  CUDA_VISIBLE_DEVICES= "$WORK/copy/scripts/gpu-check.sh") >"$WORK/check.log" 2>&1
rc=$?
set -e
secs=$((SECONDS - t0))
tail -n 15 "$WORK/check.log"
[ "$rc" -eq 3 ] || fail "gpu-check.sh exited $rc, expected 3 (no GPU)"
grep -q '^== result: NO GPU' "$WORK/check.log" || fail "gpu-check.sh did not end with its no-GPU result"
[ -f "$WORK/out/results.md" ] || fail "no results.md"
[ "$secs" -le 480 ] || fail "gpu-check.sh took $secs s"
grep -q '^| NCCL across nodes.*| skipped (needs 2 GPUs, 0 visible) |' "$WORK/out/results.md" ||
  fail "results.md does not show the NCCL-across-nodes step skipped"
# The NCCL check itself, from the bundle, with no GPU: a visible SKIP and exit 0.
out=$(CUDA_VISIBLE_DEVICES= "$PY" "$WORK/copy/tests/gpu/nccl_two_nodes.py" --build "$WORK/copy/bin" --out "$WORK/nccl") ||
  fail "nccl_two_nodes.py without GPUs exited $?: $out"
case "$out" in SKIP:*) echo "nccl_two_nodes.py: $out" ;; *) fail "nccl_two_nodes.py without GPUs: $out" ;; esac
echo "gpu-check.sh: no-GPU ending (exit 3) in $secs s"
echo "PASS: bundle self-contained ($(sed -n 's/^size: //p' "$BUNDLE/BUNDLE.txt"))"
