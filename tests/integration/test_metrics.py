"""Prometheus metrics (--metrics-listen): scraped directly over HTTP during
syncs, and through a real Prometheus server (Debian's `prometheus` package)
whose HTTP query API must return the daemon's metrics."""
from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from conftest import Ctl, MockEngine, describe, run

SMALL = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=160, vocab_size=100, seed=1)
SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?) (\S+)$")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert line.startswith(("# HELP ", "# TYPE ")), line
            continue
        m = SAMPLE_RE.match(line)
        assert m, f"not a sample line: {line!r}"
        samples[m.group(1)] = float(m.group(2))
    return samples


def metrics_daemon(daemon_factory, binaries):
    port = free_port()
    d = daemon_factory(start=False)
    d.argv += ["--metrics-listen", f"127.0.0.1:{port}"]
    ctl = Ctl(binaries["weightsyncctl"], d.addr)
    d.start(ctl)
    return d, ctl, port


def test_metrics_during_syncs(binaries, daemon_factory, checkpoint_cache, tmp_path):
    d, ctl, port = metrics_daemon(daemon_factory, binaries)
    assert f"metrics on http://127.0.0.1:{port}/metrics" in d.log()
    m = scrape(port)
    [build] = [k for k in m if k.startswith("weightsync_build_info{")]
    assert re.match(r'weightsync_build_info\{version="\d+\.\d+\.\d+",cuda="(true|false)"\}$', build), build
    assert m[build] == 1
    assert m["weightsync_engines_registered"] == 0 and m["weightsync_syncs_in_flight"] == 0
    assert m['weightsync_syncs_total{outcome="committed"}'] == 0

    a = checkpoint_cache("LlamaForCausalLM", **SMALL)
    eng = MockEngine(ctl, tmp_path, "m", a, tp=2, replicas=1, syncs=2)
    try:
        eng.wait_registered()
        assert scrape(port)["weightsync_engines_registered"] == 2
        ctl.push(a, "m", 2, "--version", 3)
        assert ctl.push(a, "m", 2, "--version", 9, "--inject", "oob-memref", check=False).returncode != 0
        m = scrape(port)
        assert m['weightsync_syncs_total{outcome="committed"}'] == 1, m
        assert m['weightsync_syncs_total{outcome="aborted"}'] == 1, m
        assert m['weightsync_model_committed_version{model="m"}'] == 3
        applied = {k: v for k, v in m.items() if k.startswith("weightsync_engine_applied_version{")}
        assert len(applied) == 2 and set(applied.values()) == {3}, applied
        lag = {k: v for k, v in m.items() if k.startswith("weightsync_engine_version_lag{")}
        assert len(lag) == 2 and set(lag.values()) == {0}, lag
        assert m["weightsync_sync_duration_seconds_count"] == 2
        assert m['weightsync_sync_duration_seconds_bucket{le="+Inf"}'] == 2
        assert m["weightsync_bytes_written_total"] > 0 and m["weightsync_bytes_read_total"] > 0
        assert m["weightsync_last_sync_throughput_bytes_per_second"] > 0
        errors = {k: v for k, v in m.items() if k.startswith("weightsync_rpc_errors_total{")}
        assert errors and all('code="OK"' not in k for k in errors), errors
        ctl.push(a, "m", 2, "--version", 4)
        assert eng.wait() == 0, eng.output()
    finally:
        eng.stop()
    m = scrape(port)
    assert m['weightsync_syncs_total{outcome="committed"}'] == 2
    assert m["weightsync_engines_registered"] == 0
    # A housekeeping pass runs every second.
    deadline = time.monotonic() + 10
    while scrape(port)["weightsync_housekeeping_passes_total"] < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scrape(port)["weightsync_housekeeping_passes_total"] >= 2
    rc, _ = d.terminate()
    assert rc == 0, d.log()


def test_metrics_listen_refuses_bad_address(binaries, tmp_path):
    cp = run([binaries["weightsyncd"], "--listen", f"unix:{tmp_path}/d.sock", "--metrics-listen", "nohost"],
             timeout=20)
    assert cp.returncode == 2, describe(cp)
    assert "--metrics-listen nohost" in cp.stdout + cp.stderr, describe(cp)


def _query(api: str, promql: str) -> list:
    url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_server_scrapes_daemon(binaries, daemon_factory, checkpoint_cache, tmp_path):
    prom = shutil.which("prometheus")
    if prom is None:
        pytest.skip("prometheus binary not installed (scripts/install-deps.sh installs Debian's prometheus)")
    d, ctl, port = metrics_daemon(daemon_factory, binaries)
    prom_port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(f"""
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: weightsync
    static_configs:
      - targets: ["127.0.0.1:{port}"]
""")
    log = open(tmp_path / "prometheus.log", "wb")
    p = subprocess.Popen([prom, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                          f"--web.listen-address=127.0.0.1:{prom_port}"],
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    api = f"http://127.0.0.1:{prom_port}"
    a = checkpoint_cache("LlamaForCausalLM", **SMALL)
    # Two syncs: the engine stays registered (and its model listed) after the first.
    eng = MockEngine(ctl, tmp_path, "m", a, tp=2, replicas=1, syncs=2)
    try:
        eng.wait_registered()
        ctl.push(a, "m", 2, "--version", 7)
        deadline = time.monotonic() + 90
        last = None
        while time.monotonic() < deadline:
            assert p.poll() is None, (tmp_path / "prometheus.log").read_text(errors="replace")
            try:
                last = _query(api, 'weightsync_model_committed_version{job="weightsync",model="m"}')
                up = _query(api, 'up{job="weightsync"}')
                syncs = _query(api, 'weightsync_syncs_total{outcome="committed"}')
                if last and float(last[0]["value"][1]) == 7 and syncs and float(syncs[0]["value"][1]) == 1:
                    assert up and float(up[0]["value"][1]) == 1, up
                    break
            except (urllib.error.URLError, ConnectionError):
                pass  # not listening yet
            time.sleep(0.5)
        else:
            try:
                with urllib.request.urlopen(f"{api}/api/v1/targets", timeout=10) as r:
                    targets = r.read().decode()
            except OSError as e:
                targets = str(e)
            pytest.fail(f"Prometheus never returned the committed version; last answer {last}\n"
                        f"targets: {targets}\n" + (tmp_path / "prometheus.log").read_text(errors="replace")[-4000:])
        ctl.push(a, "m", 2, "--version", 8)
        assert eng.wait() == 0, eng.output()
    finally:
        eng.stop()
        p.terminate()
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        log.close()
    rc, _ = d.terminate()
    assert rc == 0, d.log()
