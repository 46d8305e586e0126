#!/usr/bin/env python3
"""Sync across nodes over the host transport (UCX over veth, TCP), against the bulk floor.

Network namespaces (tests/integration/netns.py), one weightsyncd each, peered over plain TCP
(--insecure-tcp: a benchmark, not a deployment); a generated Llama checkpoint pushed as W trainer
ranks (weightsyncctl push --repeat) into TP=T mock-engine replicas (no dumps). Two topologies:

  disaggregated (default): nodes a, b, c; a runs the W ranks, b and c one replica each.
  colocated: nodes a, b; ranks 0..W/2-1 push to a's daemon (the leader), the others to b's
      (--rank-daemon); one replica on each node.

Reports, per direction (source node -> destination node): the bytes the source sent (daemon
counters, per sync) and the destination received, the packing plan's bytes for that destination (the
leader's debug line) and, with --check-minimum, the minimum derived from the checkpoint alone
(tests/integration/wire_bytes.py: each distinct element the destination's engines read from the
source's ranks, once, in their dtype; needs numpy and ml_dtypes, e.g. the repo's .venv); the sync
seconds (median of the pushes, daemon side) and bench/ucx_bulk moving the bytes of every direction
together from a to b in the same run. Needs root and a build.

  sudo python3 bench/multinode_bench.py [--topology colocated] [--build build] [--syncs 5] [--hidden 512 ...]
  sudo .venv/bin/python bench/multinode_bench.py --topology colocated --check-minimum
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))
import netns  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topology", choices=("disaggregated", "colocated"), default="disaggregated")
    ap.add_argument("--build", default=str(REPO / "build"))
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--check-minimum", action="store_true",
                    help="derive each direction's minimum from the checkpoint (tests/integration/wire_bytes.py)")
    args = ap.parse_args()
    colocated = args.topology == "colocated"
    names, engine_nodes = ("ab", "ab") if colocated else ("abc", "bc")
    # Trainer rank r pushes to node rank_nodes[r]'s daemon.
    half = args.world_size // 2
    rank_nodes = "a" * half + "b" * (args.world_size - half) if colocated else "a" * args.world_size
    build = Path(args.build)
    wsd, ctl, bulk = build / "weightsyncd", build / "weightsyncctl", build / "bench" / "ucx_bulk"
    work = Path(tempfile.mkdtemp(prefix="ws-mnb-", dir="/tmp"))
    env = dict(os.environ, WEIGHTSYNC_LAYOUTS_DIR=str(REPO / "config" / "layouts"))
    net = netns.Net()
    procs: list[subprocess.Popen] = []
    try:
        nodes = {n: net.add(n) for n in names}
        ck = work / "ckpt"
        subprocess.run([ctl, "gen-checkpoint", "--arch", "LlamaForCausalLM", "--out", ck, "--hidden-size",
                        str(args.hidden), "--layers", str(args.layers), "--heads", "8", "--kv-heads", "4",
                        "--intermediate-size", str(args.intermediate), "--vocab-size", str(args.vocab)],
                       check=True, env=env, capture_output=True)
        socks = {}
        for n, node in nodes.items():
            socks[n] = f"unix:{work}/{n}.sock"
            argv = [wsd, "--listen", socks[n], "--listen", f"{node.ip}:7070", "--insecure-tcp",
                    "--layouts-dir", REPO / "config" / "layouts", "--node-name", n, "--peer-probe-interval", "0.5",
                    "--peer-ucx-devices", "eth0", "--log-level", "debug"]
            for p, pn in nodes.items():
                if p != n:
                    argv += ["--peer", f"{p}={pn.ip}:7070"]
            log = open(work / f"{n}.log", "wb")
            procs.append(subprocess.Popen(node.wrap(argv), stdout=log, stderr=subprocess.STDOUT, env=env))

        def status(n):
            cp = subprocess.run([ctl, "--daemon", socks[n], "status", "--json"], capture_output=True, text=True,
                                env=env)
            return json.loads(cp.stdout) if cp.returncode == 0 else {}

        def peers(n):
            return {p["name"]: (int(p.get("bytes_sent", 0)), int(p.get("bytes_received", 0)))
                    for p in status(n).get("peers", [])}

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            sts = [status(n) for n in names]
            if all(st and len(st.get("peers", [])) == len(names) - 1 and all(p["state"] == "up" for p in st["peers"])
                   for st in sts):
                break
            time.sleep(0.2)
        for n in engine_nodes:
            procs.append(subprocess.Popen(
                [ctl, "--daemon", socks[n], "mock-engine", "--model", "m", "--checkpoint", ck, "--tp",
                 str(args.tp), "--replicas", "1", "--dump", work / f"{n}-dump", "--no-dump"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(len(status(n).get("engines", [])) == args.tp for n in engine_nodes):
                break
            time.sleep(0.2)
        spread = [x for r, n in enumerate(rank_nodes) if n != "a" for x in ("--rank-daemon", f"{r}={socks[n]}")]
        before = {n: peers(n) for n in names}
        cp = subprocess.run([ctl, "--daemon", socks["a"], "push", "--checkpoint", ck, "--model", "m", "--world-size",
                             str(args.world_size), "--repeat", str(args.syncs), "--json", *spread],
                            capture_output=True, text=True, env=env, timeout=1200)
        if cp.returncode != 0:
            print(cp.stderr, file=sys.stderr)
            return 1
        syncs = [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
        secs = statistics.median(float(s["daemon_seconds"]) for s in syncs)
        after = {n: peers(n) for n in names}
        planned = {}
        for line in (work / "a.log").read_text(errors="replace").splitlines():
            if "gets" in line and "chunks" in line and "node " in line:
                parts = line.split("node ", 1)[1].split()
                planned[parts[0]] = int(parts[4])  # "<node> gets N chunks, B bytes (...)": B, the last sync's
        minimum = {}
        if args.check_minimum:
            sys.path.insert(0, str(REPO / "tests" / "integration"))
            from wire_bytes import needed_from
            minimum = {(s, d): b for d in engine_nodes for s, b in needed_from(ck, args.tp, rank_nodes, d).items()}
        directions = {}
        for s in names:
            for d in engine_nodes:
                if s == d or s not in rank_nodes:
                    continue
                sent = (after[s][d][0] - before[s][d][0]) // args.syncs
                recv = (after[d][s][1] - before[d][s][1]) // args.syncs
                # The leader's line is per destination; a destination with one source node gets it all from it.
                sources = {x for x in rank_nodes if x != d}
                directions[f"{s}->{d}"] = {"sent": sent, "received": recv,
                                           "planned": planned.get(d) if len(sources) == 1 else None,
                                           "minimum": minimum.get((s, d))}
        total = sum(v["sent"] for v in directions.values())
        d = work / "bulk"
        d.mkdir()
        bargs = ["--bytes", str(total), "--chunk", "4M", "--repeats", "5", "--devices", "eth0",
                 "--transports", "tcp", "--dir", d]
        r = subprocess.Popen(nodes["b"].wrap([bulk, "--role", "recv", "--name", "b", "--peer", "a", *bargs]),
                             stdout=subprocess.PIPE, text=True)
        s = subprocess.Popen(nodes["a"].wrap([bulk, "--role", "send", "--name", "a", "--peer", "b", *bargs]),
                             stdout=subprocess.PIPE, text=True)
        sout, _ = s.communicate(timeout=600)
        r.communicate(timeout=600)
        floor = json.loads([x for x in sout.splitlines() if x.startswith("{")][-1])
        print(json.dumps({
            "topology": args.topology, "syncs": args.syncs, "world_size": args.world_size, "tp": args.tp,
            "rank_nodes": rank_nodes, "per_direction_bytes_per_sync": directions,
            "sync_seconds_median": secs, "sync_gbps_wire": total / secs / 1e9,
            "bulk_all_directions_bytes_a_to_b_seconds": floor["seconds"], "bulk_gbps": floor["gbps"],
            "sync_over_bulk": secs / floor["seconds"],
            "load_average": os.getloadavg(),
        }, indent=1))
        ok = all(v["sent"] == v["received"] and v["planned"] in (None, v["sent"]) and
                 v["minimum"] in (None, v["sent"]) for v in directions.values())
        if not ok:
            print("bytes sent differ from bytes received, planned or the minimum (above)", file=sys.stderr)
        return 0 if ok else 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        net.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
