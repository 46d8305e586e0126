"""The UCX host transport between two hosts (network namespaces joined by a bridge, netns.py):
bytes arrive intact over the veth link, and a link taken down or a peer killed mid-transfer fails
both sides within their deadline, naming the peer, after which a new transfer succeeds."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest



@pytest.fixture
def bulk():
    build = Path(os.environ.get("WS_BUILD_DIR", "build"))
    exe = build / "bench" / "ucx_bulk"
    if not exe.exists():
        if os.environ.get("WS_SANITIZED"):  # scripts/sanitize.sh builds without bench/
            pytest.skip(f"{exe} is not built in the sanitizer build (WS_BUILD_BENCH=OFF)")
        pytest.fail(f"{exe} is not built (cmake with WS_BUILD_BENCH=ON)", pytrace=False)
    return exe


@pytest.fixture
def hosts(net):
    net.add("a")
    net.add("b")
    return net


def _start(bulk, node, role, peer, d, *extra):
    argv = node.wrap([bulk, "--role", role, "--name", node.name, "--peer", peer, "--dir", d,
                      "--devices", "eth0", "--transports", "tcp", *extra])
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _finish(p, timeout=60):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"ucx_bulk hung past {timeout}s\nstdout:{out}\nstderr:{err}")
    return p.returncode, out, err


def _transfer(bulk, hosts, d, *extra):
    d.mkdir(exist_ok=True)
    r = _start(bulk, hosts.nodes["b"], "recv", "a", d, *extra)
    s = _start(bulk, hosts.nodes["a"], "send", "b", d, *extra)
    return _finish(s), _finish(r)


def test_bytes_cross_the_link_intact(bulk, hosts, tmp_path):
    (src, so, se), (rrc, ro, re_) = _transfer(bulk, hosts, tmp_path / "x", "--bytes", "48M", "--chunk", "1M",
                                            "--repeats", "3")
    assert src == 0 and rrc == 0, f"send: {se}\nrecv: {re_}"
    got = json.loads(ro.strip().splitlines()[-1])
    assert got["verified"] == 3 and got["bytes"] == 48 << 20 and got["gbps"] > 0, got
    assert json.loads(so.strip().splitlines()[-1])["verified"] == 3


def _endless(bulk, hosts, d):
    """A receiver on b and a sender on a, transferring until something breaks (3 s deadlines)."""
    d.mkdir()
    args = ("--bytes", "64M", "--chunk", "1M", "--repeats", "100000", "--timeout-ms", "3000")
    return (_start(bulk, hosts.nodes["b"], "recv", "a", d, *args), _start(bulk, hosts.nodes["a"], "send", "b", d, *args))


def _wait_started(p, timeout=30):
    deadline = time.monotonic() + timeout
    line = p.stdout.readline()
    assert line.strip() == "started" and time.monotonic() < deadline, line


def test_link_down_mid_transfer_fails_both_sides_then_recovers(bulk, hosts, tmp_path):
    r, s = _endless(bulk, hosts, tmp_path / "down")
    _wait_started(r)
    time.sleep(0.5)  # mid-transfer
    hosts.nodes["b"].link(False)
    t0 = time.monotonic()
    (src, _, se), (rrc, _, re_) = _finish(s), _finish(r)
    assert src == 1 and rrc == 1, f"send {src}: {se}\nrecv {rrc}: {re_}"
    assert time.monotonic() - t0 < 30
    assert "peer b" in se and "peer a" in re_, f"send: {se}\nrecv: {re_}"
    hosts.nodes["b"].link(True)
    (src, _, se), (rrc, ro, re_) = _transfer(bulk, hosts, tmp_path / "again", "--bytes", "8M", "--repeats", "2")
    assert src == 0 and rrc == 0, f"send: {se}\nrecv: {re_}"


def test_sender_killed_mid_transfer_fails_the_receiver_naming_it(bulk, hosts, tmp_path):
    r, s = _endless(bulk, hosts, tmp_path / "kill")
    _wait_started(s)
    time.sleep(0.5)
    os.killpg(s.pid, signal.SIGKILL)
    s.wait()
    rrc, _, re_ = _finish(r)
    assert rrc == 1 and "peer a" in re_, re_
