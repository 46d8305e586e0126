"""weightsyncctl health/status and weightsyncd start-up and logging behaviour."""
from __future__ import annotations

import json
import re

from conftest import Ctl, MockEngine, describe, run

SMALL = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=160, vocab_size=100, seed=1)


def test_health_serving(ctl):
    cp = ctl("health")
    assert cp.returncode == 0 and cp.stdout.strip() == "SERVING", describe(cp)


def test_health_without_daemon(binaries, tmp_path):
    cp = Ctl(binaries["weightsyncctl"], f"unix:{tmp_path}/nobody.sock")("health", "--timeout", "1", timeout=30)
    assert cp.returncode != 0, describe(cp)
    assert cp.stdout.strip() != "SERVING"
    assert cp.stderr.strip(), "a failed health check explains itself on stderr"


def test_status_without_daemon(binaries, tmp_path):
    cp = Ctl(binaries["weightsyncctl"], f"unix:{tmp_path}/nobody.sock")("status", timeout=30)
    assert cp.returncode != 0 and "nobody.sock" in cp.stderr, describe(cp)


def test_status_idle(ctl):
    cp = ctl("status", check=True)
    assert "weightsyncd" in cp.stdout and "engines:" in cp.stdout and "(none)" in cp.stdout, cp.stdout
    st = ctl.status_json()
    assert st["daemon_version"] and float(st["uptime_seconds"]) >= 0
    assert int(st["syncs_committed"]) == 0 and st.get("engines", []) == []


def test_status_after_sync(ctl, engines, checkpoint_cache):
    a = checkpoint_cache("Qwen2ForCausalLM", **SMALL)
    eng = engines("qwen-small", a, tp=2, replicas=2, syncs=1)
    st = ctl.status_json()
    assert len(st["engines"]) == 4
    assert {(int(e["replica_id"]), int(e["tp_rank"])) for e in st["engines"]} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(e["model"] == "qwen-small" and int(e["tp_size"]) == 2 and int(e["params"]) > 0
               and int(e["bytes"]) > 0 for e in st["engines"])
    [m] = st["models"]
    assert m["model"] == "qwen-small" and m["architecture"] == "Qwen2ForCausalLM"
    assert int(m["replicas"]) == 2 and int(m["engine_ranks"]) == 4 and int(m["committed_version"]) == 0
    text = ctl("status", check=True).stdout
    assert "qwen-small" in text and "Qwen2ForCausalLM" in text

    ctl.push(a, "qwen-small", 2, "--version", 3)
    assert eng.wait() == 0, eng.output()
    st = ctl.status_json()
    assert int(st["syncs_committed"]) == 1 and int(st["syncs_aborted"]) == 0
    last = st["last_sync"]
    assert last["state"] == "committed" and int(last["version"]) == 3 and last["model"] == "qwen-small"
    assert int(last["bytes_written"]) > 0 and int(last["world_size"]) == 2 and int(last["engines"]) == 4
    assert "committed" in ctl("status", check=True).stdout


def test_bad_layouts_dir(binaries, tmp_path):
    missing = tmp_path / "no-such-layouts"
    cp = run([binaries["weightsyncd"], "--listen", f"unix:{tmp_path}/d.sock", "--layouts-dir", missing],
             timeout=20)
    assert cp.returncode != 0, describe(cp)
    assert str(missing) in cp.stdout + cp.stderr, describe(cp)


def test_broken_layout_file(binaries, tmp_path):
    d = tmp_path / "layouts"
    d.mkdir()
    (d / "broken.json").write_text('{"name": "broken", "architectures": [')
    cp = run([binaries["weightsyncd"], "--listen", f"unix:{tmp_path}/d.sock", "--layouts-dir", d], timeout=20)
    assert cp.returncode != 0, describe(cp)
    assert "broken.json" in cp.stdout + cp.stderr, describe(cp)


def test_json_logs_with_one_summary_per_sync(binaries, daemon_factory, checkpoint_cache, tmp_path):
    d = daemon_factory(log_format="json")
    ctl = Ctl(binaries["weightsyncctl"], d.addr)
    a = checkpoint_cache("LlamaForCausalLM", **SMALL)
    eng = MockEngine(ctl, tmp_path, "m", a, tp=2, replicas=1, syncs=3)
    try:
        eng.wait_registered()
        out = ctl.push(a, "m", 2, "--version", 1, "--repeat", 2, "--json").stdout
        assert ctl.push(a, "m", 2, "--version", 9, "--inject", "oob-memref", check=False).returncode != 0
        out += ctl.push(a, "m", 2, "--version", 10, "--json").stdout
        ids = [json.loads(x)["sync_id"] for x in out.splitlines() if x.strip()]
        assert len(ids) == 3
        assert eng.wait() == 0, eng.output()
    finally:
        eng.stop()
    rc, _ = d.terminate()
    assert rc == 0, d.log()
    records = []
    for line in d.log().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {line!r}")
    assert records and all({"ts", "level", "msg"} <= r.keys() for r in records)
    summaries: dict[int, list[str]] = {}
    for r in records:
        m = re.match(r"sync (\d+) .*\boutcome=(\w+)", r["msg"])
        if m:
            summaries.setdefault(int(m.group(1)), []).append(m.group(2))
    assert {i: summaries.get(i) for i in ids} == {i: ["committed"] for i in ids}, summaries
    aborted = [i for i, v in summaries.items() if v == ["aborted"]]
    assert len(aborted) == 1 and len(summaries) == 4, summaries


def test_sigterm_idle_exits_zero_quickly(daemon, ctl):
    rc, secs = daemon.terminate()
    assert rc == 0 and secs < 5, (rc, secs, daemon.log())
    assert ctl.health().returncode != 0
