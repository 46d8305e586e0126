"""systemd integration: the daemon under a notify socket the test owns
(READY=1, STATUS=, WATCHDOG=1 pings, STOPPING=1). The unit file itself is
verified by the server unit tests (DeployUnit.SystemdAnalyzeVerify)."""
from __future__ import annotations

import os
import socket
import time

from conftest import Ctl


def _receive(sock: socket.socket, until, timeout: float) -> list[str]:
    """Datagrams until `until(messages)` holds or `timeout` passes."""
    msgs: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(msgs):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            msgs.append(sock.recv(4096).decode())
        except socket.timeout:
            break
    return msgs


def test_notify_ready_watchdog_stopping(binaries, daemon_factory, tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # ping every 200 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        d = daemon_factory(start=False)
        ctl = Ctl(binaries["weightsyncctl"], d.addr)
        d.start(ctl)
        msgs = _receive(sock, lambda m: sum("WATCHDOG=1" in x for x in m) >= 3, timeout=15)
        assert msgs, f"no notification at all\n{d.log()}"
        first = msgs[0].split("\n")
        assert "READY=1" in first, msgs
        [status] = [x for x in first if x.startswith("STATUS=")]
        assert f"serving on {d.addr}" in status and "0 engines" in status and "no sync yet" in status, status
        pings = [x for x in msgs if "WATCHDOG=1" in x.split("\n")]
        assert len(pings) >= 3, f"{msgs}\n{d.log()}"
        assert "systemd watchdog: pinging every 200 ms" in d.log()

        d.proc.send_signal(15)
        msgs = _receive(sock, lambda m: any("STOPPING=1" in x for x in m), timeout=15)
        stopping = [x for x in msgs if "STOPPING=1" in x.split("\n")]
        assert stopping and "STATUS=stopping: " in stopping[0], msgs
        assert d.proc.wait(timeout=15) == 0, d.log()
        # No pings after STOPPING=1.
        after = msgs[msgs.index(stopping[0]) + 1:] + _receive(sock, lambda m: False, timeout=0.5)
        assert not [x for x in after if "WATCHDOG=1" in x], after
    finally:
        sock.close()


def test_no_notify_socket_no_notifications(daemon, ctl):
    # The default harness has no NOTIFY_SOCKET: the daemon serves as before.
    assert "NOTIFY_SOCKET" not in os.environ
    assert ctl.health().stdout.strip() == "SERVING"
    assert "systemd watchdog" not in daemon.log()
