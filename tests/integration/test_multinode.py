"""Syncs whose engines are on other nodes (network namespaces joined by a bridge, netns.py; one
daemon per node, peered with mutual TLS and the bearer token as in test_peering.py). Node a runs
the trainer (weightsyncctl push, W=4) and no engine; nodes b and c each run an engine replica with
TP=2. The daemon of a plans once for every engine of every node, packs for each node exactly the
bytes its engines need, cast to their dtype, and sends them over UCX (TCP on eth0); b and c
scatter them into their engines. Checked: every rank bit-exact against the independent reference,
the bytes a sent each node equal what that node's engines need (replicated params once, padding
rows not at all), and a daemon killed or a link taken down mid-sync aborts the sync on every node,
after which the next sync succeeds without restarting the survivors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import Ctl, MockEngine, check_version, describe, reference
from test_peering import _wait_peers, cluster  # noqa: F401  (fixture)
from wire_bytes import needed_from

SMALL = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=160, vocab_size=100)
EXTRA = ["--peer-ucx-devices", "eth0", "--peer-transfer-timeout", "5", "--sync-progress-timeout", "20"]


class TokenCtl(Ctl):
    """weightsyncctl with the cluster's bearer token."""

    def __init__(self, binary, d):
        super().__init__(binary, d.addr)
        self.token = d.token

    def argv(self, *args) -> list:
        return super().argv("--token-file", self.token, *args)


def _status(ctl: Ctl) -> dict:
    cp = ctl("status", "--json", timeout=30)
    assert cp.returncode == 0, describe(cp)
    return json.loads(cp.stdout)


def _peer_bytes(ctl: Ctl) -> dict:
    return {p["name"]: (int(p.get("bytes_sent", 0)), int(p.get("bytes_received", 0)))
            for p in _status(ctl).get("peers", [])}


def _needed_bytes(ckpt, tp: int, dtype: str = "bf16") -> int:
    """Bytes one replica of TP `tp` needs from the trainer, from the reference alone: every rank's
    params, a param identical on every rank (replicated: norms) once, all-zero rows (vocab padding,
    filled on the node, never sent) not at all."""
    ranks = [reference(ckpt, tp, r, dtype) for r in range(tp)]
    total = 0
    for name in ranks[0]:
        arrays = [rk[name] for rk in ranks]
        replicated = all(a.shape == arrays[0].shape and np.array_equal(a.view(np.uint8), arrays[0].view(np.uint8))
                         for a in arrays[1:])
        for a in arrays[:1] if replicated else arrays:
            rows = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(1, -1)
            zero_rows = int((rows.view(np.uint8).reshape(rows.shape[0], -1) == 0).all(axis=1).sum())
            total += a.nbytes - zero_rows * rows.shape[1] * a.itemsize
    return total


def _nodes(names: str, binaries, cluster, workdir):
    """Daemons on the nodes `names` (all up to each other); yields (daemons, ctls, engine, restart):
    engine(node, ckpt, syncs, name) starts a TP=2 replica there, restart(node) a fresh daemon."""
    ds = cluster(list(names), extra={n: EXTRA for n in names})
    for n, d in ds.items():
        _wait_peers(binaries, d, {p: "up" for p in ds if p != n})
    ctls = {n: TokenCtl(binaries["weightsyncctl"], d) for n, d in ds.items()}
    engines: list[MockEngine] = []

    def engine(node, ckpt, syncs, name):
        e = MockEngine(ctls[node], workdir, "m", ckpt, tp=2, replicas=1, syncs=syncs, name=name)
        engines.append(e)
        e.wait_registered()
        return e

    def restart(node):
        d = cluster([node], peers={node: {p: p for p in names if p != node}}, extra={node: EXTRA})[node]
        ds[node] = d
        ctls[node] = TokenCtl(binaries["weightsyncctl"], d)
        for n, other in ds.items():
            _wait_peers(binaries, other, {p: "up" for p in ds if p != n})

    yield ds, ctls, engine, restart
    for e in engines:
        e.stop()


@pytest.fixture
def three(binaries, cluster, workdir):  # noqa: F811
    """Daemons on a, b, c."""
    yield from _nodes("abc", binaries, cluster, workdir)


def _push(ctl, ckpt, version, timeout=120):
    return ctl("push", "--checkpoint", ckpt, "--model", "m", "--world-size", 4, "--version", version,
               timeout=timeout)


def _freeze(e: MockEngine, stop: bool) -> None:
    os.killpg(e.proc.pid, signal.SIGSTOP if stop else signal.SIGCONT)


def _wait(pred, what, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out waiting for {what}")


def test_disaggregated_trainer_on_a_engines_on_b_and_c(three, checkpoint_cache):
    ds, ctls, engine, _ = three
    a = checkpoint_cache("LlamaForCausalLM", **SMALL, seed=1)
    b = checkpoint_cache("LlamaForCausalLM", **SMALL, seed=2)
    eb = engine("b", a, syncs=2, name="eb")
    ec = engine("c", a, syncs=2, name="ec")
    for v, ck in ((1, a), (2, b)):
        cp = _push(ctls["a"], ck, v)
        assert cp.returncode == 0, describe(cp) + "\n" + ds["a"].log()[-4000:]
    for e in (eb, ec):
        assert e.wait() == 0, e.output()
        assert e.versions() == [1, 2] and e.aborted() == []
        check_version(e, "v1", a)
        check_version(e, "v2", b)
    # Bytes on the wire: what each node's two ranks need, once, in bf16; the same at both ends.
    want = _needed_bytes(a, 2) + _needed_bytes(b, 2)
    assert want == sum(needed_from(ck, 2, "aaaa", "b")["a"] for ck in (a, b))  # two derivations agree
    sent = _peer_bytes(ctls["a"])
    assert sent["b"][0] == want and sent["c"][0] == want, (sent, want)
    assert _peer_bytes(ctls["b"])["a"][1] == want and _peer_bytes(ctls["c"])["a"][1] == want
    st = _status(ctls["a"])
    assert int(st["syncs_committed"]) == 2 and int(st["peer_staging_bytes"]) == 64 << 20

    for n in "bc":
        assert int(_status(ctls[n])["syncs_committed"]) == 2


def _failing_push(ctls, ck, version):
    """Starts a push from a in the background; returns (thread, result holder)."""
    out = {}

    def run():
        out["cp"] = _push(ctls["a"], ck, version)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _sync_in_flight(ctl) -> bool:
    return bool(_status(ctl).get("current_syncs"))


def test_remote_daemon_killed_mid_sync_aborts_and_the_next_sync_succeeds(three, checkpoint_cache):
    ds, ctls, engine, restart = three
    a = checkpoint_cache("LlamaForCausalLM", **SMALL, seed=1)
    eb = engine("b", a, syncs=1, name="eb")
    ec = engine("c", a, syncs=1, name="ec")
    # b's engine never pauses: its daemon holds the data phase; then b's daemon is killed.
    _freeze(eb, True)
    t, out = _failing_push(ctls, a, 1)
    _wait(lambda: _sync_in_flight(ctls["b"]), "the sync to start on b")
    ds["b"].proc.send_signal(signal.SIGKILL)
    ds["b"].proc.wait()
    t.join(60)
    cp = out["cp"]
    assert cp.returncode != 0 and "node b" in cp.stderr, describe(cp)
    _wait(lambda: ec.aborted() == [1], "c's engine to hear aborted")
    _freeze(eb, False)
    eb.stop()
    ec.stop()
    # b comes back; a and c were not restarted.
    restart("b")
    eb2 = engine("b", a, syncs=1, name="eb2")
    ec2 = engine("c", a, syncs=1, name="ec2")
    cp = _push(ctls["a"], a, 2)
    assert cp.returncode == 0, describe(cp) + "\n" + ds["a"].log()[-4000:]
    for e in (eb2, ec2):
        assert e.wait() == 0, e.output()
        check_version(e, "v2", a)


def test_link_down_mid_sync_aborts_and_the_next_sync_succeeds(three, checkpoint_cache):
    ds, ctls, engine, _ = three
    a = checkpoint_cache("LlamaForCausalLM", **SMALL, seed=1)
    b = checkpoint_cache("LlamaForCausalLM", **SMALL, seed=2)
    eb = engine("b", a, syncs=1, name="eb")
    ec = engine("c", a, syncs=1, name="ec")
    _freeze(ec, True)  # c's daemon holds the data phase until its engine pauses
    t, out = _failing_push(ctls, a, 1)
    _wait(lambda: _sync_in_flight(ctls["c"]), "the sync to start on c")
    ds["c"].node.link(False)
    t.join(90)
    cp = out["cp"]
    assert cp.returncode != 0 and "node c" in cp.stderr, describe(cp)
    _wait(lambda: eb.aborted() == [1], "b's engine to hear aborted")
    _freeze(ec, False)
    _wait(lambda: ec.aborted() == [1], "c's engine to hear aborted (c's daemon lost its leader)", timeout=60)
    ds["c"].node.link(True)
    _wait(lambda: all(p["state"] == "up" for p in _status(ctls["a"])["peers"]), "a to see b and c up")
    cp = _push(ctls["a"], b, 2)
    assert cp.returncode == 0, describe(cp) + "\n" + ds["a"].log()[-4000:] + "\nC:\n" + ds["c"].log()[-4000:]
    for e in (eb, ec):
        assert e.wait() == 0, e.output()
        assert e.versions() == [2] and e.aborted() == [1]
        check_version(e, "v2", b)


# ---------------------------------------------------------------- colocated on two nodes
# Trainer ranks and engine ranks on both nodes: W=4 with some ranks pushing to a's daemon (the
# leader: rank 0's) and the others to b's (weightsyncctl push --rank-daemon), a TP=2 replica on each
# node. Each node copies its own ranks' shards into its own engine and packs, for the other node,
# exactly the bytes that node's engine needs from them.


@pytest.fixture
def two(binaries, cluster, workdir):  # noqa: F811
    """Daemons on a and b."""
    yield from _nodes("ab", binaries, cluster, workdir)


def _push_spread(ctls, ds, ck, version, rank_nodes="aabb", timeout=120):
    """weightsyncctl push (W=4) through a's daemon, trainer rank r pushing to node rank_nodes[r]'s daemon."""
    assert rank_nodes[0] == "a"
    spread = [a for r, n in enumerate(rank_nodes) if n != "a" for a in ("--rank-daemon", f"{r}={ds[n].addr}")]
    return ctls["a"]("push", "--checkpoint", ck, "--model", "m", "--world-size", 4, "--version", version,
                     *spread, timeout=timeout)


def test_colocated_trainer_and_engines_on_two_nodes(two, checkpoint_cache):
    ds, ctls, engine, _ = two
    a = checkpoint_cache("LlamaForCausalLM", **SMALL, seed=1)
    b = checkpoint_cache("LlamaForCausalLM", **SMALL, seed=2)
    ea = engine("a", a, syncs=2, name="ea")
    eb = engine("b", a, syncs=2, name="eb")
    # Version 1: ranks 0-1 on a, 2-3 on b; version 2: rank 0 on a, 1-3 on b (the two directions differ).
    for v, ck, rank_nodes in ((1, a, "aabb"), (2, b, "abbb")):
        before = (_peer_bytes(ctls["a"]), _peer_bytes(ctls["b"]))
        cp = _push_spread(ctls, ds, ck, v, rank_nodes)
        assert cp.returncode == 0, describe(cp) + "\nA:\n" + ds["a"].log()[-4000:] + "\nB:\n" + ds["b"].log()[-4000:]
        after = (_peer_bytes(ctls["a"]), _peer_bytes(ctls["b"]))
        a_to_b = after[0]["b"][0] - before[0]["b"][0]
        b_to_a = after[1]["a"][0] - before[1]["a"][0]
        # Each end counts the same bytes.
        assert after[1]["a"][1] - before[1]["a"][1] == a_to_b and after[0]["b"][1] - before[0]["b"][1] == b_to_a
        # Each direction: exactly what the destination's replica needs from the source's ranks
        # (wire_bytes.py: from the reference and FSDP's row split alone), replicated params once,
        # padding never; together one replica's needs from all four ranks.
        want_a_to_b = needed_from(ck, 2, rank_nodes, "b")["a"]
        want_b_to_a = needed_from(ck, 2, rank_nodes, "a")["b"]
        assert (a_to_b, b_to_a) == (want_a_to_b, want_b_to_a), (v, rank_nodes)
        assert want_a_to_b + want_b_to_a == _needed_bytes(ck, 2)
    assert needed_from(a, 2, "abbb", "b")["a"] < needed_from(a, 2, "abbb", "a")["b"]  # not symmetric
    for e in (ea, eb):
        assert e.wait() == 0, e.output()
        assert e.versions() == [1, 2] and e.aborted() == []
        check_version(e, "v1", a)
        check_version(e, "v2", b)
    for n in "ab":
        assert int(_status(ctls[n])["syncs_committed"]) == 2


def test_colocated_remote_daemon_killed_mid_sync_aborts_and_the_next_sync_succeeds(two, checkpoint_cache):
    ds, ctls, engine, restart = two
    a = checkpoint_cache("LlamaForCausalLM", **SMALL, seed=1)
    ea = engine("a", a, syncs=1, name="ea")
    eb = engine("b", a, syncs=1, name="eb")
    # b's engine never pauses: b's daemon holds its writes (from its own ranks and from a); then
    # b's daemon is killed.
    _freeze(eb, True)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("cp", _push_spread(ctls, ds, a, 1)))
    t.start()
    _wait(lambda: _sync_in_flight(ctls["b"]), "the sync to start on b")
    ds["b"].proc.send_signal(signal.SIGKILL)
    ds["b"].proc.wait()
    t.join(90)
    cp = out["cp"]
    assert cp.returncode != 0 and "node b" in cp.stderr, describe(cp)
    _wait(lambda: ea.aborted() == [1], "a's engine to hear aborted")
    assert int(_status(ctls["a"])["syncs_aborted"]) == 1
    _freeze(eb, False)
    eb.stop()
    ea.stop()
    restart("b")
    ea2 = engine("a", a, syncs=1, name="ea2")
    eb2 = engine("b", a, syncs=1, name="eb2")
    cp = _push_spread(ctls, ds, a, 2)
    assert cp.returncode == 0, describe(cp) + "\nA:\n" + ds["a"].log()[-4000:] + "\nB:\n" + ds["b"].log()[-4000:]
    for e in (ea2, eb2):
        assert e.wait() == 0, e.output()
        check_version(e, "v2", a)
