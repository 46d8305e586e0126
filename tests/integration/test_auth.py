"""Access control end to end: weightsyncctl against a daemon with a token, on a TLS port, and the
owners status reports."""
from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest

from certs import make_certs
from conftest import Ctl, _env, describe, run

SMALL = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=160, vocab_size=100, seed=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _token_file(path, token: str, mode: int = 0o600):
    path.write_text(token + "\n")
    os.chmod(path, mode)
    return path


def test_token_file_on_every_call_but_health(binaries, daemon_factory, tmp_path):
    tok = _token_file(tmp_path / "token", "integration-token-1")
    d = daemon_factory(start=False)
    d.argv += ["--token-file", str(tok)]
    ctl = Ctl(binaries["weightsyncctl"], d.addr)
    d.start(ctl)  # waits for health: no token needed
    assert "integration-token-1" not in d.log()

    cp = ctl("status")
    assert cp.returncode == 1 and "UNAUTHENTICATED" in cp.stderr and "no token" in cp.stderr, describe(cp)
    cp = ctl("--token-file", _token_file(tmp_path / "wrong", "nope"), "status")
    assert cp.returncode == 1 and "wrong token" in cp.stderr, describe(cp)
    cp = ctl("--token-file", tok, "status", "--json")
    assert cp.returncode == 0, describe(cp)
    assert json.loads(cp.stdout)["daemon_version"]
    # The same through the environment, file or token itself.
    for extra in ({"WEIGHTSYNC_TOKEN_FILE": str(tok)}, {"WEIGHTSYNC_TOKEN": "integration-token-1"}):
        env = dict(_env(), **extra)
        cp = subprocess.run([str(a) for a in ctl.argv("status")], capture_output=True, text=True, env=env,
                            timeout=60)
        assert cp.returncode == 0, f"{extra}: {describe(cp)}"


def test_token_file_readable_by_others_is_refused(binaries, tmp_path):
    tok = _token_file(tmp_path / "token", "integration-token-2", mode=0o644)
    cp = run([binaries["weightsyncd"], "--listen", f"unix:{tmp_path}/d.sock", "--token-file", tok], timeout=30)
    assert cp.returncode == 2, describe(cp)
    assert f"token file {tok} has mode 0644" in cp.stderr and "integration-token-2" not in cp.stderr, describe(cp)


def test_tcp_without_tls_is_refused(binaries, tmp_path):
    cp = run([binaries["weightsyncd"], "--listen", f"127.0.0.1:{_free_port()}"], timeout=30)
    assert cp.returncode == 2, describe(cp)
    assert "is TCP, which needs TLS" in cp.stderr and "--insecure-tcp" in cp.stderr, describe(cp)


def test_tls_port_health_and_status(binaries, daemon_factory, tmp_path):
    make_certs(tmp_path)
    port = _free_port()
    d = daemon_factory(start=False)
    d.argv += ["--listen", f"127.0.0.1:{port}", "--tls-cert", str(tmp_path / "server.pem"),
               "--tls-key", str(tmp_path / "server.key")]
    d.start(Ctl(binaries["weightsyncctl"], d.addr))
    tcp = Ctl(binaries["weightsyncctl"], f"127.0.0.1:{port}")
    ca = ["--tls-ca", tmp_path / "ca.pem"]

    cp = tcp(*ca, "health", "--timeout", "5", timeout=30)
    assert cp.returncode == 0 and cp.stdout.strip() == "SERVING", describe(cp)
    cp = tcp(*ca, "status", "--json", timeout=30)
    assert cp.returncode == 0 and json.loads(cp.stdout)["daemon_version"], describe(cp)
    cp = tcp("health", "--timeout", "2", timeout=30)  # plaintext against TLS
    assert cp.returncode != 0 and cp.stdout.strip() != "SERVING", describe(cp)


def test_mutual_tls_requires_a_client_certificate(binaries, daemon_factory, tmp_path):
    make_certs(tmp_path)
    port = _free_port()
    d = daemon_factory(start=False)
    d.argv += ["--listen", f"127.0.0.1:{port}", "--tls-cert", str(tmp_path / "server.pem"),
               "--tls-key", str(tmp_path / "server.key"), "--tls-client-ca", str(tmp_path / "ca.pem")]
    d.start(Ctl(binaries["weightsyncctl"], d.addr))
    tcp = Ctl(binaries["weightsyncctl"], f"127.0.0.1:{port}")
    ca = ["--tls-ca", tmp_path / "ca.pem"]
    cp = tcp(*ca, "health", "--timeout", "2", timeout=30)
    assert cp.returncode != 0, describe(cp)
    cp = tcp(*ca, "--tls-cert", tmp_path / "client.pem", "--tls-key", tmp_path / "client.key", "health",
             "--timeout", "5", timeout=30)
    assert cp.returncode == 0 and cp.stdout.strip() == "SERVING", describe(cp)


def test_status_shows_engine_owners(ctl, engines, checkpoint_cache):
    a = checkpoint_cache("Qwen2ForCausalLM", **SMALL)
    engines("qwen-owned", a, tp=1, replicas=1, syncs=1)
    st = ctl.status_json()
    assert [e["owner"] for e in st["engines"]] == [f"uid:{os.geteuid()}"], st
    text = ctl("status", check=True).stdout
    assert "OWNER" in text and f"uid:{os.geteuid()}" in text, text
