#!/usr/bin/env bash
# MoE-scale metadata benchmark (issue 12): tens of thousands of small tensors.
#   * generates a DeepseekV2-shaped checkpoint with tiny dims (so the bytes are
#     small and per-tensor overhead dominates),
#   * runs weightsyncd, a T-rank bf16 mock engine and a W-rank push repeated
#     N times (the first sync plans and maps; later ones are steady state),
#   * measures a memcpy of the same source bytes in the same run,
#   * reads the daemon's private (anonymous) RSS, the engines' registration
#     time, the copy ops the daemon ran (its per-sync summary line) and the
#     CPU time of the daemon and of the push client over the syncs.
# Prints a markdown table.
#   bench/moe_scale_bench.sh [BUILD_DIR]
#   WS_MOE_CONFIG=deepseek (60 layers x 256 experts, default) | kimi (61 x 384)
#   WS_MOE_TP (8), WS_MOE_WORLD (8), WS_MOE_REPEAT (4), WS_BENCH_DIR, WS_BENCH_THREADS,
#   WS_BENCH_PERF=1 (perf record the daemon during the syncs: \$WS_BENCH_DIR/\$CONFIG/perf.data)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${1:-$ROOT/build}
CONFIG=${WS_MOE_CONFIG:-deepseek}
TP=${WS_MOE_TP:-8}
WORLD=${WS_MOE_WORLD:-8}
REPEAT=${WS_MOE_REPEAT:-4}
THREADS=${WS_BENCH_THREADS:-$(nproc)}
case "$CONFIG" in
  deepseek) LAYERS=60; EXPERTS=256 ;;
  kimi) LAYERS=61; EXPERTS=384 ;;
  *) echo "WS_MOE_CONFIG must be deepseek or kimi" >&2; exit 2 ;;
esac
W=${WS_BENCH_DIR:-/tmp/weightsync-moe-bench}/$CONFIG
mkdir -p "$W"
rm -f "$W"/ws.sock
SOCK="unix:$W/ws.sock"
CTL=("$BIN/weightsyncctl" --daemon "$SOCK")

if [ ! -f "$W/ckpt/config.json" ]; then
  "$BIN/weightsyncctl" gen-checkpoint --arch DeepseekV2ForCausalLM --out "$W/ckpt" --layers "$LAYERS" \
    --experts "$EXPERTS" --hidden-size 64 --intermediate-size 32 --heads 8 --kv-heads 8 --vocab-size 512 >/dev/null
fi
MODEL_BYTES=$(stat -c %s "$W/ckpt/model.safetensors")

"$BIN/weightsyncd" --listen "$SOCK" --layouts-dir "$ROOT/config/layouts" --threads "$THREADS" \
  >"$W/daemon.log" 2>&1 &
DPID=$!
EPID=
trap 'if [ -n "$EPID" ]; then kill $EPID 2>/dev/null || true; fi; kill -TERM $DPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do "${CTL[@]}" health >/dev/null 2>&1 && break; sleep 0.1; done

mem() { awk -v k="$1" '$1==k":" {printf "%d\n", $2*1024}' /proc/$DPID/status; }
ANON0=$(mem RssAnon)
REG0=$(date +%s.%N)
"${CTL[@]}" mock-engine --model moe --checkpoint "$W/ckpt" --tp "$TP" --replicas 1 --dtype bf16 \
  --dump "$W/out" --syncs "$((REPEAT + 1))" --no-dump >"$W/engine.log" 2>&1 &
EPID=$!
for _ in $(seq 3000); do [ "$(grep -c ' registered' "$W/engine.log" || true)" -ge "$TP" ] && break; sleep 0.05; done
REG1=$(date +%s.%N)
ANON1=$(mem RssAnon)
PERF=
if [ -n "${WS_BENCH_PERF:-}" ]; then  # profile the daemon during the syncs
  perf record -F 499 -g -p "$DPID" -o "$W/perf.data" >/dev/null 2>&1 &
  PERF=$!
fi
cpu() { awk '{print $14 + $15}' /proc/$DPID/stat; }  # daemon user + system CPU, in clock ticks
CPU0=$(cpu)
TIMEFORMAT='%U %S'
{ time "${CTL[@]}" push --checkpoint "$W/ckpt" --model moe --world-size "$WORLD" --version 1 --repeat "$REPEAT" --json \
  >"$W/push.json" 2>"$W/push.err"; } 2>"$W/push.time"
CPU1=$(cpu)
DCPU=$(awk -v a="$CPU0" -v b="$CPU1" -v hz="$(getconf CLK_TCK)" 'BEGIN {printf "%.3f", (b - a) / hz}')
CCPU=$(tail -n 1 "$W/push.time" | awk '{printf "%.3f", $1 + $2}')  # the time line (push's own stderr: push.err)
if [ -n "$PERF" ]; then kill -INT $PERF; wait $PERF || true; fi
ANON2=$(mem RssAnon); HWM=$(mem VmHWM); SHM=$(mem RssShmem)
kill $EPID 2>/dev/null || true  # it waits for one more sync: the memory above is read while it is registered
wait $EPID 2>/dev/null || true
EPID=

"$BIN/bench/memcpy_floor" --bytes "$MODEL_BYTES" --threads "$THREADS" --repeats 5 >"$W/floor.json"

"$ROOT/.venv/bin/python" - "$W/push.json" "$W/floor.json" "$MODEL_BYTES" "$ANON0" "$ANON1" "$ANON2" "$HWM" "$SHM" \
  "$REG0" "$REG1" "$CONFIG" "$TP" "$WORLD" "$THREADS" "$W/daemon.log" "$DCPU" "$CCPU" <<'PY'
import json, re, sys, statistics
push_path, floor_path = sys.argv[1], sys.argv[2]
model, anon0, anon1, anon2, hwm, shm = map(int, sys.argv[3:9])
reg0, reg1 = float(sys.argv[9]), float(sys.argv[10])
config, tp, world, threads = sys.argv[11], int(sys.argv[12]), int(sys.argv[13]), int(sys.argv[14])
# The daemon's one summary line per sync states the copy ops it ran (after coalescing).
ops_run = [int(m.group(1)) for m in (re.search(r"\bsync \d+ model=.*\bcopy_ops_run=(\d+)", l) for l in open(sys.argv[15])) if m]
syncs = [json.loads(l) for l in open(push_path) if l.strip()]
floor = json.load(open(floor_path))
first, steady = syncs[0], syncs[1:] or syncs
med = lambda k: statistics.median(s[k] for s in steady)
tensors = first["tensors"]
floor_s = floor["seconds"] * first["bytes_read"] / floor["bytes"]
def row(k, v): print(f"| {k} | {v} |")
print("| metric | value |\n|---|---|")
row("config", f"{config}: {tensors} tensors, {first['layers']} layers, T={tp}, W={world}, {threads} daemon threads")
row("engine bytes written (bf16) / trainer bytes read", f"{first['bytes_written']/1e6:.1f} MB / {first['bytes_read']/1e6:.1f} MB")
row("registration of all engine ranks (wall)", f"{reg1-reg0:.2f} s")
row("syncs: client seconds", ", ".join(f"{s['client_seconds']:.3f}" for s in syncs))
for name, s in (("first", first), ("steady (median)", None)):
    g = (lambda k: s[k]) if s else med
    row(f"{name}: begin / push / commit s", f"{g('begin_seconds'):.3f} / {g('push_seconds'):.3f} / {g('commit_seconds'):.3f}")
    row(f"{name}: total s", f"{g('client_seconds'):.3f}")
    row(f"{name}: overhead per tensor (sync - memcpy) / tensors", f"{(g('client_seconds') - floor_s) / tensors * 1e6:.1f} us")
row("plan reused (per sync)", ", ".join(str(s.get("plan_reused", "n/a")) for s in syncs))
row("copy ops planned / run after coalescing (per sync)", f"{first['copy_ops']} / {', '.join(map(str, ops_run)) or 'n/a'}")
row(f"memcpy of the same source bytes, {threads} threads", f"{floor_s*1e3:.1f} ms")
row(f"CPU seconds over all {len(syncs)} syncs: daemon / push client", f"{float(sys.argv[16]):.2f} / {float(sys.argv[17]):.2f}")
row("daemon private RSS (anon): idle / after registration / after syncs", f"{anon0/1e6:.0f} / {anon1/1e6:.0f} / {anon2/1e6:.0f} MB")
row("daemon peak RSS incl. mapped shm / shm pages", f"{hwm/1e6:.0f} MB / {shm/1e6:.0f} MB")
PY
