"""Test certificates made with the openssl CLI: one CA, server and client certificates signed by it."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def make_certs(d: Path, ips=("127.0.0.1",), client_cn: str = "ws-test-client") -> None:
    """d/ca.pem, d/server.pem/.key (the given IPs and localhost), d/client.pem/.key (CN client_cn)."""
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (scripts/install-deps.sh installs it)",
                    pytrace=False)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sign = ["-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    san = ",".join([f"IP:{ip}" for ip in ips] + ["DNS:localhost"])
    (d / "server.ext").write_text(f"subjectAltName={san}\n")
    for argv in (["req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ws-test-ca"],
                 ["req", *key, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost"],
                 ["x509", "-req", "-in", "server.csr", *sign, "-out", "server.pem", "-extfile", "server.ext"],
                 ["req", *key, "-keyout", "client.key", "-out", "client.csr", "-subj", f"/CN={client_cn}"],
                 ["x509", "-req", "-in", "client.csr", *sign, "-out", "client.pem"]):
        subprocess.run(["openssl", *argv], cwd=d, check=True, capture_output=True)
