#!/usr/bin/env python3
"""A sync across nodes GPU to GPU over NCCL, on one machine with two GPUs:
two daemons as two "nodes" (processes a and b, distinct --node-name, peered
over loopback TCP with a bearer token, each restricted to one GPU with
CUDA_VISIBLE_DEVICES: a gets GPU 0, b GPU 1). Node a runs the trainer
(`weightsyncctl push --device cuda:0`, W=2, one process per rank, shards in
cudaMalloc'ed memory) and no engine; node b runs an engine (`mock-engine
--device cuda:0`, TP=2, bf16). NCCL is told not to use peer-to-peer or shared
memory (NCCL_P2P_DISABLE=1, NCCL_SHM_DISABLE=1, NCCL_SOCKET_IFNAME=lo), so
its bytes take the network path as between two hosts.

Checked: two syncs, each engine dump bit for bit against the independent
numpy reference (tests/reference/check_dump.py); the chunks went GPU to GPU
(node a's metrics: weightsync_peer_device_bytes_sent_total to b equals
weightsync_peer_bytes_sent_total and is above zero); node a made the NCCL
communicator once and reused it for the second sync (one "new nccl
communicator" log line).

With fewer than two GPUs it prints SKIP and exits 0.

  nccl_two_nodes.py --build DIR --out DIR
"""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_e2e import (CHECK_DUMP, LAYOUTS, env, find_binary, free_port, gen_checkpoint, gpu_count,  # noqa: E402
                     killpg, log, run, start_daemon, stop_daemon, tail)

SMALL = ["--hidden-size", 64, "--layers", 2, "--heads", 4, "--kv-heads", 2, "--intermediate-size", 160,
         "--vocab-size", 100]


def node_env(gpu: int) -> dict:
    e = env()
    e["CUDA_VISIBLE_DEVICES"] = str(gpu)
    e["NCCL_P2P_DISABLE"] = "1"
    e["NCCL_SHM_DISABLE"] = "1"
    e["NCCL_SOCKET_IFNAME"] = "lo"
    e.setdefault("NCCL_DEBUG", "WARN")
    return e


class Node:
    def __init__(self, build: Path, out: Path, name: str, gpu: int, port: int, peer: str, peer_port: int,
                 token: Path):
        self.name, self.gpu, self.token = name, gpu, token
        self.sock = Path(f"/tmp/ws-nccl-{os.getpid()}-{name}.sock")
        self.sock.unlink(missing_ok=True)
        self.addr = f"unix:{self.sock}"
        self.metrics_port = free_port()
        self.ctl = find_binary(build, "weightsyncctl")
        self.log_path = out / f"weightsyncd-{name}.log"
        argv = [find_binary(build, "weightsyncd"), "--listen", self.addr, "--listen", f"127.0.0.1:{port}",
                "--insecure-tcp", "--token-file", token, "--node-name", name,
                "--peer", f"{peer}=127.0.0.1:{peer_port}", "--peer-probe-interval", 0.2,
                "--peer-ucx-devices", "lo", "--peer-transfer-timeout", 60,
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--layouts-dir", LAYOUTS, "--require-cuda",
                "--log-level", "debug"]
        self.proc, self._log = start_daemon(argv, self.log_path, node_env(gpu))

    def ctl_argv(self, *args) -> list:
        return [self.ctl, "--daemon", self.addr, "--token-file", self.token, *args]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_peer_up(self, peer: str, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"node {self.name}'s daemon exited {self.proc.returncode}:\n{tail(self.log_text())}"
            cp = subprocess.run([str(a) for a in self.ctl_argv("status", "--json")], capture_output=True, text=True,
                                env=node_env(self.gpu))
            if cp.returncode == 0:
                peers = {p.get("name"): p.get("state") for p in json.loads(cp.stdout).get("peers", [])}
                if peers.get(peer) == "up":
                    return None
            time.sleep(0.2)
        return f"node {self.name} does not see peer {peer} up after {timeout}s:\n{tail(self.log_text())}"

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def stop(self) -> None:
        stop_daemon(self.proc, self._log, self.sock)


def metric(text: str, name: str, peer: str) -> int:
    m = re.search(r'^%s\{peer="%s"\} (\d+)$' % (re.escape(name), re.escape(peer)), text, re.M)
    return int(m.group(1)) if m else -1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", required=True, help="folder with weightsyncd and weightsyncctl (a build or bundle bin/)")
    ap.add_argument("--out", required=True, help="directory for the checkpoint, dumps and logs")
    a = ap.parse_args()
    n = gpu_count()
    if n < 2:
        log(f"SKIP: NCCL between two nodes needs two GPUs; {n} visible")
        return 0
    build, out = Path(a.build), Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ctl = find_binary(build, "weightsyncctl")
    ckpt = out / "ckpt"
    ok, text = gen_checkpoint(ctl, "LlamaForCausalLM", ckpt, out / "gen.log", *SMALL)
    if not ok:
        log("FAIL: gen-checkpoint:\n" + tail(text))
        return 1
    token = out / "token"
    token.write_text(secrets.token_hex(16) + "\n")
    token.chmod(0o600)
    pa, pb = free_port(), free_port()
    nodes = {"a": Node(build, out, "a", 0, pa, "b", pb, token), "b": Node(build, out, "b", 1, pb, "a", pa, token)}
    engine = None
    failure = None
    try:
        for name, other in (("a", "b"), ("b", "a")):
            failure = failure or nodes[name].wait_peer_up(other, 60)
        if failure is None:
            elog = open(out / "engine.log", "w")
            argv = nodes["b"].ctl_argv("mock-engine", "--model", "m", "--checkpoint", ckpt, "--tp", 2, "--replicas", 1,
                                       "--dtype", "bf16", "--dump", out / "dump", "--syncs", 2, "--device", "cuda:0")
            engine = subprocess.Popen([str(x) for x in argv], stdout=elog, stderr=subprocess.STDOUT,
                                      start_new_session=True, env=node_env(1))
            deadline = time.monotonic() + 120
            while (out / "engine.log").read_text().count(" registered (") < 2:
                if engine.poll() is not None or time.monotonic() > deadline:
                    failure = "mock-engine did not register:\n" + tail((out / "engine.log").read_text())
                    break
                time.sleep(0.1)
        if failure is None:
            push = nodes["a"].ctl_argv("push", "--checkpoint", ckpt, "--model", "m", "--world-size", 2,
                                       "--version", 1, "--repeat", 2, "--device", "cuda:0")
            # run() uses gpu_e2e's environment; the trainer must see only node a's GPU.
            os.environ.update({k: v for k, v in node_env(0).items() if k.startswith(("CUDA_", "NCCL_"))})
            rc, text = run(push, out / "push.log", 300)
            if rc != 0:
                failure = f"push exited {rc}:\n{tail(text)}\nnode a:\n{tail(nodes['a'].log_text())}\n" \
                          f"node b:\n{tail(nodes['b'].log_text())}"
        if failure is None:
            try:
                rc = engine.wait(timeout=120)
            except subprocess.TimeoutExpired:
                rc = 124
            if rc != 0:
                failure = f"mock-engine exited {rc}:\n" + tail((out / "engine.log").read_text())
        if failure is None:
            m = nodes["a"].metrics()
            sent = metric(m, "weightsync_peer_bytes_sent_total", "b")
            device = metric(m, "weightsync_peer_device_bytes_sent_total", "b")
            made = nodes["a"].log_text().count("new nccl communicator with node b")
            log(f"node a -> b: {sent} bytes sent, {device} of them GPU to GPU; communicators made: {made}")
            if sent <= 0 or device != sent:
                failure = f"the chunks did not all go GPU to GPU: sent {sent}, device {device}"
            elif made != 1:
                failure = f"node a made {made} NCCL communicators with b for two syncs (want 1, reused)"
        for v in (1, 2):
            if failure is None:
                rc, text = run([sys.executable, CHECK_DUMP, "--checkpoint", ckpt, "--dump", out / "dump" / f"v{v}",
                                "--tp", 2, "--replicas", 1, "--dtype", "bf16"], out / f"check-v{v}.log", 600)
                if rc != 0:
                    failure = f"version {v}: engine bytes differ from the reference:\n{tail(text)}"
    finally:
        if engine is not None:
            killpg(engine, signal.SIGTERM)
            try:
                engine.wait(timeout=15)
            except subprocess.TimeoutExpired:
                killpg(engine)
        for node in nodes.values():
            node.stop()
    if failure is not None:
        log("FAIL: " + failure)
        return 1
    log("OK: two syncs a (GPU 0) -> b (GPU 1) over NCCL, bit-exact, one communicator reused")
    return 0


if __name__ == "__main__":
    sys.exit(main())
