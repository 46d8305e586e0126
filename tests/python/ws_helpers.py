"""Test helpers: the source-tree package on sys.path, multi-process runs, the daemon process."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "client" / "python"
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(PKG))
sys.path.insert(0, str(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dist(scenario: str, world: int, args: dict, timeout: float = 600, *, wrap=None,
             master_addr: str = "127.0.0.1", env: "dict | None" = None) -> list:
    """Runs dist_worker.py SCENARIO on `world` gloo ranks; returns every rank's JSON result.

    Ranks on several hosts (network namespaces, tests/integration/netns.py): wrap(rank, argv) returns the
    argv that runs rank `rank` on its host, master_addr is rank 0's address as the others reach it, and env
    adds variables (GLOO_SOCKET_IFNAME). The port is free here, and in a fresh namespace any port is."""
    out = tempfile.mkdtemp(prefix="ws-dist-")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PKG), str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", WS_DIST_MASTER_ADDR=master_addr, **(env or {}))
    port = _free_port()
    procs, logs = [], []
    for r in range(world):
        log = open(os.path.join(out, f"rank{r}.log"), "w")
        logs.append(log)
        argv = [sys.executable, str(HERE / "dist_worker.py"), scenario, str(r), str(world), str(port), out,
                json.dumps(args)]
        procs.append(subprocess.Popen(wrap(r, argv) if wrap else argv, stdout=log, stderr=subprocess.STDOUT,
                                      env=env))
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    failed = [r for r, p in enumerate(procs) if p.returncode != 0]
    if failed:
        text = ""
        for r in failed[:2]:
            text += f"\n--- rank {r} (rc {procs[r].returncode}) ---\n" + Path(out, f"rank{r}.log").read_text()[-6000:]
        pytest.fail(f"{scenario} on {world} ranks failed on ranks {failed}:{text}", pytrace=False)
    results = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    shutil.rmtree(out, ignore_errors=True)
    return results


def daemon_binary() -> Path:
    return Path(os.environ.get("WS_BUILD_DIR", REPO / "build")) / "weightsyncd"


class DaemonProcess:
    """weightsyncd on a unix socket in `tmp`, plus `args`; `connect`: weightsync.Daemon options
    for the readiness check (e.g. the token)."""

    def __init__(self, tmp: str, args=(), connect: "dict | None" = None):
        binary = daemon_binary()
        if not binary.exists():
            pytest.fail(f"the daemon binary {binary} does not exist: build it (scripts/build.sh) or point "
                        "WS_BUILD_DIR at the build directory", pytrace=False)
        self.sock = os.path.join(tmp, "ws.sock")
        self.address = "unix:" + self.sock
        self.log_path = os.path.join(tmp, "weightsyncd.log")
        self._log = open(self.log_path, "w")
        layouts = os.environ.get("WS_LAYOUTS_DIR", str(REPO / "config" / "layouts"))
        self.proc = subprocess.Popen([str(binary), "--listen", self.address, "--layouts-dir", layouts,
                                      *[str(a) for a in args]],
                                     stdout=self._log, stderr=subprocess.STDOUT)
        import weightsync
        deadline = time.time() + 30
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"weightsyncd exited with {self.proc.returncode}:\n{self.log()}", pytrace=False)
            if os.path.exists(self.sock):
                try:
                    with weightsync.Daemon(self.address, **(connect or {})) as d:
                        d.status(timeout=2)
                    break
                except weightsync.WeightSyncError:
                    pass
            if time.time() > deadline:
                self.stop()
                pytest.fail(f"weightsyncd did not come up on {self.address}:\n{self.log()}", pytrace=False)
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return Path(self.log_path).read_text()[-8000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def fail_nth_export(trainer, n: int = 3):
    """Makes the trainer's n-th shard export raise (a fault in the middle of its stream); returns the
    real export, to put back."""
    real, calls = trainer._export, [0]

    def faulty(*a, **kw):
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("injected fault")
        return real(*a, **kw)
    trainer._export = faulty
    return real


def walk_facts(prep) -> list:
    """What a trainer rank derived from its walk (Trainer._prepare), as plain values: its manifest entries, tied
    names and the shards it holds (name, box, and where and how it reads each: address, dtype, shape, strides)."""
    held = [(q.name, q.dim, q.start, q.length, q.local.data_ptr(), str(q.local.dtype), list(q.local.shape),
             list(q.local.stride()), str(dtype), pos) for q, dtype, pos in prep.held]
    entries = [(name, list(shape), dtype, list(box) if box is not None else None)
               for name, shape, dtype, box in prep.entries]
    return [entries, sorted(prep.dropped), held]
