"""The Python trainer (weightsync.Trainer) with its ranks on two nodes: four FSDP2 ranks of a real
transformers Llama (torch.distributed over gloo, CPU), ranks 0-1 on node a and ranks 2-3 on node b
(network namespaces, netns.py; gloo between them over the veths, rank 0's address on a as the
master), each rank pushing to its own node's daemon; a TP=2 mock-engine replica on each node
(colocated). Rank 0 learns each rank's node from its daemon (GetStatus) and sends BeginSync.rank_nodes;
each node copies its own ranks' shards into its engine and sends the other node what that node's
engine needs from them. Checked: both versions bit-exact against the independent reference, the
bytes each node sent the other equal to what the other's engine needs from its ranks (wire_bytes.py),
and a rank pointed at the daemon of a node that is not a peer fails on every rank naming the node,
without starting a sync."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("transformers", reason="transformers is not installed")

from conftest import REPO, check_version  # noqa: E402
from test_multinode import _peer_bytes, _status, two  # noqa: E402,F401  (fixture)
from test_peering import cluster  # noqa: E402,F401  (fixture)
from wire_bytes import needed_from  # noqa: E402

sys.path.insert(0, str(REPO / "tests" / "python"))
from ws_helpers import run_dist  # noqa: E402

# transformers' save_pretrained output (tests/reference/hf_fixtures.py): fp32, 2 layers, vocab 100.
CKPT = REPO / "tests" / "reference" / "hf_checkpoints" / "llama"
RANK_NODES = "aabb"
DELTA = 0.25


def test_python_trainer_ranks_on_two_nodes(two, cluster, tmp_path):  # noqa: F811
    ds, ctls, engine, _ = two
    ea = engine("a", CKPT, syncs=2, name="ea")
    eb = engine("b", CKPT, syncs=2, name="eb")
    # A daemon on a third node that is no peer of a or b: a rank pointed at it is refused.
    stray = cluster(["c"], peers={"c": {}})["c"]
    nodes = {n: d.node for n, d in ds.items()}
    before = {n: _peer_bytes(ctls[n]) for n in ds}
    out = tmp_path / "versions"
    results = run_dist("push_nodes", 4, {
        "checkpoint": str(CKPT), "model": "m", "token_file": str(ds["a"].token), "delta": DELTA, "out": str(out),
        "daemons": [ds[n].addr for n in RANK_NODES], "wrong": {"3": stray.addr}},
        timeout=300, wrap=lambda r, argv: nodes[RANK_NODES[r]].wrap(argv), master_addr=nodes["a"].ip,
        env={"GLOO_SOCKET_IFNAME": "eth0"})

    for r, res in enumerate(results):
        assert res["wrong"] and "trainer rank 3 pushes to node c" in res["wrong"] and \
            "not an up peer of node a" in res["wrong"], (r, res["wrong"])
        assert [p["state"] for p in res["pushes"]] == ["committed", "committed"], (r, res)
        assert all(p["engines"] == 4 for p in res["pushes"]), res  # two on each node
    assert not _status(ctls["a"]).get("current_syncs") and int(_status(ctls["a"])["syncs_aborted"]) == 0

    for e in (ea, eb):
        assert e.wait() == 0, e.output()
        assert e.versions() == [1, 2] and e.aborted() == []
        check_version(e, "v1", CKPT)
        check_version(e, "v2", out / "v2")
    check_version(ea, "v1", out / "v1")  # what the trainer held is the checkpoint

    # Each direction carries exactly what the destination's engine needs from the source's ranks, twice.
    after = {n: _peer_bytes(ctls[n]) for n in ds}
    moved = {(s, d): after[s][d][0] - before[s].get(d, (0, 0))[0] for s in ds for d in ds if s != d}
    got = {(s, d): after[d][s][1] - before[d].get(s, (0, 0))[1] for s in ds for d in ds if s != d}
    want = {(s, d): 2 * needed_from(CKPT, 2, RANK_NODES, d)[s] for s in ds for d in ds if s != d}
    assert moved == want and got == want, (moved, got, want)
