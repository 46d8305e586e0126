#!/usr/bin/env bash
# Host data-plane benchmark (issue: steady-state sync vs a memcpy floor).
#   * generates a Llama-shaped fp32 checkpoint of >= 2 GB,
#   * runs weightsyncd, a bf16 mock engine with TP=2 and a W=4 push repeated
#     N times (the first sync is a warm-up: it maps the shm objects),
#   * measures the memcpy floor over the same source bytes with the same number
#     of threads, in the same run,
#   * reads the daemon's memory counters before and after the syncs.
# Prints a markdown table. Usage: bench/host_sync_bench.sh [BUILD_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${1:-$ROOT/build}
THREADS=${WS_BENCH_THREADS:-$(nproc)}
REPEAT=${WS_BENCH_REPEAT:-5}
W=${WS_BENCH_DIR:-/tmp/weightsync-bench}
mkdir -p "$W"
SOCK="unix:$W/ws.sock"
CTL=("$BIN/weightsyncctl" --daemon "$SOCK")

if [ ! -f "$W/ckpt/config.json" ]; then
  # 8 layers, H 2048, I 5632, V 32000, 16 heads / 16 kv heads: ~542M params, ~2.17 GB fp32
  "$BIN/weightsyncctl" gen-checkpoint --arch LlamaForCausalLM --out "$W/ckpt" \
    --hidden-size 2048 --layers 8 --heads 16 --kv-heads 16 --intermediate-size 5632 --vocab-size 32000
fi
MODEL_BYTES=$(stat -c %s "$W/ckpt/model.safetensors")

"$BIN/weightsyncd" --listen "$SOCK" --layouts-dir "$ROOT/config/layouts" --threads "$THREADS" \
  >"$W/daemon.log" 2>&1 &
DPID=$!
trap 'kill $EPID 2>/dev/null || true; kill -TERM $DPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do "${CTL[@]}" health >/dev/null 2>&1 && break; sleep 0.1; done

"${CTL[@]}" mock-engine --model bench --checkpoint "$W/ckpt" --tp 2 --replicas 1 --dtype bf16 \
  --dump "$W/out" --syncs "$REPEAT" --no-dump >"$W/engine.log" 2>&1 &
EPID=$!
for _ in $(seq 300); do [ "$(grep -c registered "$W/engine.log" || true)" -ge 2 ] && break; sleep 0.1; done

mem() { awk -v k="$1" '$1==k":" {printf "%d\n", $2*1024}' /proc/$DPID/status; }
ANON0=$(mem RssAnon)
"${CTL[@]}" push --checkpoint "$W/ckpt" --model bench --world-size 4 --version 1 --repeat "$REPEAT" --json \
  >"$W/push.json"
ANON1=$(mem RssAnon); HWM=$(mem VmHWM); SHM=$(mem RssShmem)
wait $EPID || true

"$BIN/bench/memcpy_floor" --bytes "$MODEL_BYTES" --threads "$THREADS" --repeats 5 >"$W/floor.json"

"$ROOT/.venv/bin/python" - "$W/push.json" "$W/floor.json" "$MODEL_BYTES" "$ANON0" "$ANON1" "$HWM" "$SHM" "$THREADS" <<'EOF'
import json, sys, statistics
push_path, floor_path = sys.argv[1], sys.argv[2]
model, anon0, anon1, hwm, shm, threads = map(int, sys.argv[3:])
syncs = [json.loads(l) for l in open(push_path) if l.strip()]
floor = json.load(open(floor_path))
steady = syncs[1:] or syncs
secs = statistics.median(s["client_seconds"] for s in steady)
read = steady[0]["bytes_read"]; written = steady[0]["bytes_written"]
floor_s = floor["seconds"] * read / floor["bytes"]
print(f"| model (fp32 source bytes) | {model/1e9:.2f} GB |")
print(f"| engine bytes written (bf16, TP=2) | {written/1e9:.2f} GB |")
print(f"| syncs (first = warm-up) | {len(syncs)}: " + ", ".join(f'{s["client_seconds"]:.3f}' for s in syncs) + " s |")
print(f"| steady-state sync (median of {len(steady)}) | {secs:.3f} s |")
print(f"| effective bandwidth (source bytes / s) | {read/secs/1e9:.2f} GB/s |")
print(f"| memcpy floor, same bytes, {threads} threads | {floor_s:.3f} s ({floor['gbps']:.2f} GB/s) |")
print(f"| ratio floor / sync (target >= 0.7) | {floor_s/secs:.2f} |")
# The sync reads the fp32 source once and writes half as many bf16 bytes; a
# memcpy of S bytes reads and writes S. Same memory traffic: 0.75 of the floor.
print(f"| ratio at equal memory traffic (floor x {(read + written) / (2 * read):.2f}) / sync | {floor_s*(read+written)/(2*read)/secs:.2f} |")
print(f"| daemon private RSS growth during syncs | {(anon1-anon0)/1e6:.1f} MB ({100*(anon1-anon0)/model:.2f}% of model; target < 5%) |")
print(f"| daemon peak RSS incl. mapped shm pages | {hwm/1e9:.2f} GB (shared trainer/engine pages {shm/1e9:.2f} GB) |")
EOF
