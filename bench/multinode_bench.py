#!/usr/bin/env python3
"""Sync across nodes over the host transport (UCX over veth, TCP), against the bulk floor.

Three network namespaces (tests/integration/netns.py) a, b, c, one weightsyncd each, peered over
plain TCP (--insecure-tcp: a benchmark, not a deployment). a pushes a generated Llama checkpoint
as W trainer ranks; b and c each hold a TP=T mock-engine replica (no dumps). Reports, per
destination node, the bytes a sent (daemon counters) against the minimum the plan needs (each
distinct source element a node's engines read, once, in their dtype: printed by the daemon at
debug level, cross-checked here as sent == received), the sync seconds (median of the pushes),
and bench/ucx_bulk moving the same bytes from a to b in the same run. Needs root and a build.

  sudo python3 bench/multinode_bench.py [--build build] [--syncs 5] [--hidden 512 --layers 4 ...]
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
    ap.add_argument("--build", default=str(REPO / "build"))
    ap.add_argument("--syncs", type=int, default=5)
    ap.add_argument("--world-size", type=int, default=4)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--vocab", type=int, default=16000)
    args = ap.parse_args()
    build = Path(args.build)
    wsd, ctl, bulk = build / "weightsyncd", build / "weightsyncctl", build / "bench" / "ucx_bulk"
    work = Path(tempfile.mkdtemp(prefix="ws-mnb-", dir="/tmp"))
    env = dict(os.environ, WEIGHTSYNC_LAYOUTS_DIR=str(REPO / "config" / "layouts"))
    net = netns.Net()
    procs: list[subprocess.Popen] = []
    try:
        nodes = {n: net.add(n) for n in "abc"}
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

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = status("a")
            if st and all(p["state"] == "up" for p in st.get("peers", [])) and len(st.get("peers", [])) == 2:
                break
            time.sleep(0.2)
        for n in "bc":
            procs.append(subprocess.Popen(
                [ctl, "--daemon", socks[n], "mock-engine", "--model", "m", "--checkpoint", ck, "--tp",
                 str(args.tp), "--replicas", "1", "--dump", work / f"{n}-dump", "--no-dump"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all(len(status(n).get("engines", [])) == args.tp for n in "bc"):
                break
            time.sleep(0.2)
        cp = subprocess.run([ctl, "--daemon", socks["a"], "push", "--checkpoint", ck, "--model", "m", "--world-size",
                             str(args.world_size), "--repeat", str(args.syncs), "--json"],
                            capture_output=True, text=True, env=env, timeout=1200)
        if cp.returncode != 0:
            print(cp.stderr, file=sys.stderr)
            return 1
        syncs = [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]
        secs = statistics.median(float(s["daemon_seconds"]) for s in syncs)
        sent = {p["name"]: int(p.get("bytes_sent", 0)) // args.syncs for p in status("a")["peers"]}
        recv = {n: int(next(p for p in status(n)["peers"] if p["name"] == "a").get("bytes_received", 0)) //
                args.syncs for n in "bc"}
        planned = {}
        for line in (work / "a.log").read_text(errors="replace").splitlines():
            if "gets" in line and "chunks" in line and "node " in line:
                parts = line.split("node ", 1)[1].split()
                planned[parts[0]] = int(parts[4])  # "<node> gets N chunks, B bytes (...)": B
        total = sum(sent.values())
        d = work / "bulk"
        d.mkdir()
        bargs = ["--bytes", str(sent["b"]), "--chunk", "4M", "--repeats", "5", "--devices", "eth0",
                 "--transports", "tcp", "--dir", d]
        r = subprocess.Popen(nodes["b"].wrap([bulk, "--role", "recv", "--name", "b", "--peer", "a", *bargs]),
                             stdout=subprocess.PIPE, text=True)
        s = subprocess.Popen(nodes["a"].wrap([bulk, "--role", "send", "--name", "a", "--peer", "b", *bargs]),
                             stdout=subprocess.PIPE, text=True)
        sout, _ = s.communicate(timeout=600)
        r.communicate(timeout=600)
        floor = json.loads([x for x in sout.splitlines() if x.startswith("{")][-1])
        print(json.dumps({
            "syncs": args.syncs, "world_size": args.world_size, "tp": args.tp,
            "per_node_sent": sent, "per_node_received": recv, "per_node_planned": planned,
            "sync_seconds_median": secs, "sync_gbps_wire": total / secs / 1e9,
            "bulk_same_bytes_a_to_b_seconds": floor["seconds"], "bulk_gbps": floor["gbps"],
            "sync_over_bulk_of_both_nodes": secs / (2 * floor["seconds"]),
        }, indent=1))
        return 0
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
