"""Connection options of the Python client against a daemon that wants a token and serves TLS."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile

import pytest

import weightsync
from ws_helpers import DaemonProcess

TOKEN = "py-test-token-7"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_certs(d: str) -> None:
    """ca.pem, server.pem/.key (127.0.0.1, localhost), client.pem/.key (CN ws-test-client)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (scripts/install-deps.sh installs it)",
                    pytrace=False)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    with open(os.path.join(d, "server.ext"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for argv in (["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ws-test-ca"],
                 ["req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
                 ["x509", "-req", "-in", "server.csr", *sign, "-out", "server.pem", "-extfile", "server.ext"],
                 ["req", *key, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=ws-test-client"],
                 ["x509", "-req", "-in", "client.csr", *sign, "-out", "client.pem"]):
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True)


@pytest.fixture(scope="module")
def secured():
    """A daemon with a token, a mutual-TLS TCP port and its files: (daemon, tcp address, dir)."""
    tmp = tempfile.mkdtemp(prefix="ws-py-auth-")
    _make_certs(tmp)
    tok = os.path.join(tmp, "token")
    with open(tok, "w") as f:
        f.write(TOKEN + "\n")
    os.chmod(tok, 0o600)
    tcp = f"127.0.0.1:{_free_port()}"
    d = DaemonProcess(tmp, args=["--token-file", tok, "--listen", tcp,
                                 "--tls-cert", os.path.join(tmp, "server.pem"),
                                 "--tls-key", os.path.join(tmp, "server.key"),
                                 "--tls-client-ca", os.path.join(tmp, "ca.pem")],
                      connect={"token": TOKEN})
    yield d, tcp, tmp
    d.stop()
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def no_env_defaults(monkeypatch):
    for k in ("WEIGHTSYNC_TOKEN", "WEIGHTSYNC_TOKEN_FILE", "WEIGHTSYNC_TLS_CA", "WEIGHTSYNC_TLS_CERT",
              "WEIGHTSYNC_TLS_KEY"):
        monkeypatch.delenv(k, raising=False)


def test_token_missing_wrong_and_right(secured):
    d, _, tmp = secured
    with pytest.raises(weightsync.WeightSyncError, match="UNAUTHENTICATED.*no token"):
        weightsync.Daemon(d.address).status()
    with pytest.raises(weightsync.WeightSyncError, match="UNAUTHENTICATED.*wrong token"):
        weightsync.Daemon(d.address, token="nope").status()
    assert weightsync.Daemon(d.address, token=TOKEN).status().daemon_version
    assert weightsync.Daemon(d.address, token_file=os.path.join(tmp, "token")).status().daemon_version
    with pytest.raises(weightsync.WeightSyncError, match="not printable ASCII"):
        weightsync.Daemon(d.address, token="two words")
    with pytest.raises(weightsync.WeightSyncError, match="missing-token-file"):
        weightsync.Daemon(d.address, token_file=os.path.join(tmp, "missing-token-file"))


def test_token_from_the_environment(secured, monkeypatch):
    d, _, tmp = secured
    monkeypatch.setenv("WEIGHTSYNC_TOKEN", TOKEN)
    assert weightsync.Daemon(d.address).status().daemon_version
    monkeypatch.delenv("WEIGHTSYNC_TOKEN")
    monkeypatch.setenv("WEIGHTSYNC_TOKEN_FILE", os.path.join(tmp, "token"))
    assert weightsync.Daemon(d.address).status().daemon_version


def test_mutual_tls(secured):
    _, tcp, tmp = secured
    ca, cert, key = (os.path.join(tmp, n) for n in ("ca.pem", "client.pem", "client.key"))
    with weightsync.Daemon(tcp, tls_ca=ca, tls_cert=cert, tls_key=key, token=TOKEN) as dm:
        assert dm.tls and dm.status().daemon_version
    with open(ca, "rb") as f:
        ca_pem = f.read()
    with weightsync.Daemon(tcp, tls_ca=ca_pem, tls_cert=cert, tls_key=key, token=TOKEN) as dm:  # PEM bytes
        assert dm.status().daemon_version
    with pytest.raises(weightsync.WeightSyncError, match="UNAVAILABLE"):
        weightsync.Daemon(tcp, tls_ca=ca, token=TOKEN).status(timeout=3)  # no client certificate
    with pytest.raises(weightsync.WeightSyncError, match="UNAVAILABLE"):
        weightsync.Daemon(tcp, token=TOKEN).status(timeout=3)  # plaintext
    with pytest.raises(weightsync.WeightSyncError, match="needs its key"):
        weightsync.Daemon(tcp, tls_ca=ca, tls_cert=cert)
    with pytest.raises(weightsync.WeightSyncError, match="connection options"):
        from weightsync.daemon import as_daemon
        as_daemon(weightsync.Daemon(tcp, tls_ca=ca, tls_cert=cert, tls_key=key), token=TOKEN)


def test_engine_and_trainer_take_the_token(secured, checkpoints, monkeypatch):
    torch = pytest.importorskip("torch", reason="torch is not installed")
    import models
    from engines import EngineSet
    d, _, _ = secured
    sd = models.load_checkpoint(checkpoints["llama"])
    cfg = models.config("llama")
    monkeypatch.setenv("WEIGHTSYNC_TOKEN", TOKEN)  # EngineSet makes its Engines from the address
    es = EngineSet(d.address, "auth-llama", "llama", sd, cfg, 1, 1, torch.bfloat16)
    monkeypatch.delenv("WEIGHTSYNC_TOKEN")
    try:
        st = weightsync.Daemon(d.address, token=TOKEN).status()
        assert [e.owner for e in st.engines] == [f"uid:{os.geteuid()}"]
        with pytest.raises(weightsync.WeightSyncError, match="UNAUTHENTICATED"):
            with weightsync.Trainer(d.address, "auth-llama", world_size=1) as tr:
                tr.push(sd, version=1)
        with weightsync.Trainer(d.address, "auth-llama", world_size=1, token=TOKEN) as tr:
            tr.push(sd, version=1)
        es.check(sd, 1)
    finally:
        es.close()
