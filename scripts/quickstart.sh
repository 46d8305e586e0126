#!/usr/bin/env bash
# One command from a fresh Debian machine to a working sync:
#   installs dependencies, builds, starts weightsyncd on a local unix socket,
#   starts a stand-in vLLM engine (TP=2, bf16, host shared memory), generates a
#   small Llama checkpoint, pushes it from a stand-in FSDP trainer (4 ranks,
#   fp32 dim-0 shards), and checks what landed in the engine's memory against
#   an independent numpy implementation of vLLM's loader rules.
# Everything lives under ${WS_QUICKSTART_DIR:-/tmp/weightsync-quickstart}.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
[ "${WS_SKIP_DEPS:-0}" = 1 ] || WS_NO_TORCH=${WS_NO_TORCH:-1} scripts/install-deps.sh  # the check needs numpy only
[ "${WS_SKIP_BUILD:-0}" = 1 ] || scripts/build.sh

W=${WS_QUICKSTART_DIR:-/tmp/weightsync-quickstart}
rm -rf "$W"; mkdir -p "$W"
SOCK="unix:$W/weightsync.sock"
BIN=$ROOT/build
CTL=("$BIN/weightsyncctl" --daemon "$SOCK")

cleanup() {
  [ -n "${ENGINE_PID:-}" ] && kill "$ENGINE_PID" 2>/dev/null || true
  [ -n "${DAEMON_PID:-}" ] && kill -TERM "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
}
trap cleanup EXIT

echo "== starting weightsyncd on $SOCK"
"$BIN/weightsyncd" --listen "$SOCK" --layouts-dir "$ROOT/config/layouts" >"$W/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do "${CTL[@]}" health >/dev/null 2>&1 && break; sleep 0.1; done
"${CTL[@]}" health

echo "== generating a Llama checkpoint"
"$BIN/weightsyncctl" gen-checkpoint --arch LlamaForCausalLM --out "$W/ckpt" \
  --hidden-size 256 --layers 4 --heads 8 --kv-heads 2 --intermediate-size 688 --vocab-size 1000

echo "== starting a mock engine (1 replica x TP 2, bf16)"
"${CTL[@]}" mock-engine --model demo --checkpoint "$W/ckpt" --tp 2 --replicas 1 --dtype bf16 \
  --dump "$W/engine" >"$W/engine.log" 2>&1 &
ENGINE_PID=$!
for _ in $(seq 100); do [ "$(grep -c registered "$W/engine.log" || true)" -ge 2 ] && break; sleep 0.1; done
cat "$W/engine.log"

echo "== pushing from a 4-rank FSDP stand-in trainer"
"${CTL[@]}" push --checkpoint "$W/ckpt" --model demo --world-size 4 --version 1

echo "== daemon status"
"${CTL[@]}" status
kill -TERM "$ENGINE_PID"; wait "$ENGINE_PID" || true; ENGINE_PID=

echo "== checking the engine's memory against the independent reference"
"$ROOT/.venv/bin/python" "$ROOT/tests/reference/check_dump.py" --checkpoint "$W/ckpt" \
  --dump "$W/engine/v1" --tp 2 --replicas 1 --dtype bf16
echo "quickstart OK: files in $W (daemon.log, engine.log, engine/v1/*.safetensors)"
