"""Peer daemons on several hosts (network namespaces joined by a bridge, see netns.py): each daemon
is configured with the others, they authenticate each other with mutual TLS and the bearer token,
and `status` shows each peer's health as it changes: a daemon killed, a link taken down, a peer
answering under another node name, a peer presenting the wrong token."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

import netns
from certs import make_certs
from conftest import Ctl, Daemon, describe, run

PORT = 7070


@pytest.fixture
def cluster(binaries, net, tmp_path):
    """make(names, peers=None, extra=None) -> {name: Daemon}: a daemon per node, TLS (mutual) and a
    bearer token on 10.77.0.N:7070. peers[name] maps each peer name the daemon is given to the node
    whose address it is given for it (default: every other node under its own name)."""
    make_certs(tmp_path, ips=[f"{netns.SUBNET}.{i}" for i in range(1, 10)], client_cn="ws-peer")
    token = tmp_path / "token"
    token.write_text("cluster-token\n")
    os.chmod(token, 0o600)
    started: list[Daemon] = []

    def make(names, peers=None, extra=None):
        for n in names:
            if n not in net.nodes:
                net.add(n)
        out = {}
        for n in names:
            node = net.nodes[n]
            d = Daemon(binaries["weightsyncd"], tmp_path)
            d.argv += ["--listen", f"{node.ip}:{PORT}", "--tls-cert", tmp_path / "server.pem",
                       "--tls-key", tmp_path / "server.key", "--tls-client-ca", tmp_path / "ca.pem",
                       "--token-file", token, "--node-name", n, "--peer-tls-ca", tmp_path / "ca.pem",
                       "--peer-tls-cert", tmp_path / "client.pem", "--peer-tls-key", tmp_path / "client.key",
                       "--peer-probe-interval", "0.2"]
            mine = (peers or {}).get(n, {p: p for p in names if p != n})
            for name, at in mine.items():
                d.argv += ["--peer", f"{name}={net.nodes[at].ip}:{PORT}"]
            d.argv += [str(a) for a in (extra or {}).get(n, [])]
            d.argv = node.wrap(d.argv)
            d.name, d.node, d.token = n, node, token
            started.append(d)
            d.start(Ctl(binaries["weightsyncctl"], d.addr))
            out[n] = d
        return out

    yield make
    for d in started:
        d.cleanup()


def _status(binaries, d: Daemon) -> dict:
    cp = Ctl(binaries["weightsyncctl"], d.addr)("--token-file", d.token, "status", "--json", timeout=30)
    assert cp.returncode == 0, describe(cp)
    return json.loads(cp.stdout)


def _wait_peers(binaries, d: Daemon, want: dict, timeout: float = 20) -> dict:
    """Polls d's status until every peer in `want` has that state; returns its peers by name."""
    deadline = time.monotonic() + timeout
    peers = {}
    while time.monotonic() < deadline:
        peers = {p["name"]: p for p in _status(binaries, d)["peers"]}
        if all(peers.get(n, {}).get("state") == s for n, s in want.items()):
            return peers
        time.sleep(0.1)
    pytest.fail(f"peers of node {d.name} never reached {want}; last: {json.dumps(peers, indent=1)}\n{d.log()}")


def test_three_nodes_see_each_other_and_follow_failures(binaries, cluster):
    ds = cluster(["a", "b", "c"])
    for n, d in ds.items():
        peers = _wait_peers(binaries, d, {p: "up" for p in ds if p != n})
        for p in peers.values():
            assert p["last_error"] == "" and p["daemon_version"] and p["rtt_ms"] > 0, p
            assert 0 <= p["last_ok_age_seconds"] < 10, p
    st = _status(binaries, ds["a"])
    assert st["node_name"] == "a"
    assert {p["address"] for p in st["peers"]} == {f"{netns.SUBNET}.2:{PORT}", f"{netns.SUBNET}.3:{PORT}"}
    text = Ctl(binaries["weightsyncctl"], ds["a"].addr)("--token-file", ds["a"].token, "status", timeout=30)
    assert text.returncode == 0 and "node a" in text.stdout and "peers:" in text.stdout, describe(text)

    # A daemon killed outright: its peers see it down, with the reason; the others stay up.
    ds["b"].proc.send_signal(signal.SIGKILL)
    ds["b"].proc.wait()
    peers = _wait_peers(binaries, ds["a"], {"b": "down", "c": "up"})
    assert peers["b"]["last_error"] and int(peers["b"]["consecutive_failures"]) >= 1, peers["b"]
    _wait_peers(binaries, ds["c"], {"b": "down", "a": "up"})

    # A link taken down cuts c off from a both ways; back up, back to "up".
    ds["c"].node.link(False)
    _wait_peers(binaries, ds["a"], {"c": "down"})
    _wait_peers(binaries, ds["c"], {"a": "down"})
    ds["c"].node.link(True)
    _wait_peers(binaries, ds["a"], {"c": "up"})
    _wait_peers(binaries, ds["c"], {"a": "up"})
    assert ds["a"].alive() and ds["c"].alive()


def test_misconfigured_peers_are_down_naming_the_reason(binaries, cluster, tmp_path):
    # a is told that node "z" is at c's address: c answers as "c".
    ds = cluster(["a", "c"], peers={"a": {"c": "c", "z": "c"}, "c": {"a": "a"}})
    peers = _wait_peers(binaries, ds["a"], {"c": "up", "z": "down"})
    assert "answers as node 'c', configured as 'z'" in peers["z"]["last_error"], peers["z"]

    # b presents a token a does not accept: a refuses it, b says why.
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-cluster-token\n")
    os.chmod(wrong, 0o600)
    b = cluster(["b"], peers={"b": {"a": "a"}}, extra={"b": ["--peer-token-file", wrong]})["b"]
    peers = _wait_peers(binaries, b, {"a": "down"})
    assert "UNAUTHENTICATED" in peers["a"]["last_error"] and "wrong token" in peers["a"]["last_error"], peers["a"]

    # A daemon that names itself among its peers does not start.
    bad = Daemon(binaries["weightsyncd"], tmp_path)
    bad.argv += ["--node-name", "a", "--peer", "a=10.77.0.1:7070"]
    cp = run(bad.argv, timeout=30)
    bad.cleanup()
    assert cp.returncode == 2 and "names this node itself" in cp.stderr, describe(cp)
