"""weightsync.Engine survives its daemon: callback errors end in a clean unregister, a restarted daemon
gets the same buffers re-registered, waits have deadlines, and restarted version counters are visible."""
import os
import shutil
import tempfile
import threading
import time

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed")

import models  # noqa: E402
import weightsync  # noqa: E402
from engines import EngineSet  # noqa: E402
from weightsync import engine as engine_mod  # noqa: E402
from ws_helpers import DaemonProcess  # noqa: E402


def _sd(seed):
    return {k: v.detach().clone() for k, v in models.make_model("llama", seed).state_dict().items()}


def _push(address, model, sd, version):
    with weightsync.Trainer(address, model, world_size=1, timeout=30) as tr:
        res = tr.push(sd, version=version)
    assert res.stats["state"] == "committed", res.stats
    return res


def _engines_of(address, model):
    with weightsync.Daemon(address) as d:
        return [e for e in d.status().engines if e.model == model]


def _until(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.05)


def test_on_abort_error_unregisters_the_engine(daemon):
    sd = _sd(1)
    cfg = models.config("llama")
    es = EngineSet(daemon.address, "llama-abort-cb", "llama", sd, cfg, 1)
    eng = es.engines[0]

    def bad_callback(version, reason):
        raise RuntimeError("callback bug")
    eng.on_abort(bad_callback)
    try:
        with weightsync.Trainer(daemon.address, "llama-abort-cb", world_size=1,
                                timeout=30) as tr:
            def failing_stream(*args, **kwargs):
                raise RuntimeError("injected fault")
            tr._stream = failing_stream
            with pytest.raises(weightsync.WeightSyncError, match="injected fault"):
                tr.push(sd, version=1)
        _until(lambda: eng.state()["closed"], 10, "the engine ends after its on_abort callback raised")
        assert "on_abort callback for version 1 failed (RuntimeError: callback bug)" in eng.state()["error"]
        _until(lambda: not _engines_of(daemon.address, "llama-abort-cb"), 10, "the daemon drops the engine")
        with pytest.raises(weightsync.WeightSyncError, match="on_abort callback"):
            eng.wait_for_version(2, timeout=5)
        # The rank's slot is free again: a new engine registers and a push commits without stalling.
        es2 = EngineSet(daemon.address, "llama-abort-cb", "llama", sd, cfg, 1)
        try:
            t0 = time.monotonic()
            _push(daemon.address, "llama-abort-cb", sd, 2)
            assert time.monotonic() - t0 < 20
            es2.check(sd, 2)
        finally:
            es2.close()
    finally:
        es.close()


def test_engine_reregisters_after_daemon_restart():
    tmp = tempfile.mkdtemp(prefix="ws-restart-")
    d = DaemonProcess(tmp)
    cfg = models.config("llama")
    es = None
    try:
        sd1, sd2, sd3, sd4 = (_sd(s) for s in (1, 2, 3, 4))
        es = EngineSet(d.address, "llama-restart", "llama", sd1, cfg, 2)
        for e in es.engines:
            assert e.state()["connected"] and e.reconnects == 0
        _push(d.address, "llama-restart", sd1, 1)
        es.check(sd1, 1)
        _push(d.address, "llama-restart", sd2, 2)
        es.check(sd2, 2)

        d.proc.kill()  # no goodbye: the engines only see their streams break
        d.proc.wait()
        d.stop()
        _until(lambda: not any(e.connected for e in es.engines), 10, "the engines notice the daemon is gone")
        d = DaemonProcess(tmp)  # same socket
        # (the daemon lists an engine before the engine has read its registration's answer: wait for both)
        _until(lambda: len(_engines_of(d.address, "llama-restart")) == 2 and all(e.connected for e in es.engines),
               30, "both engines re-register with the restarted daemon")
        for e in es.engines:
            assert e.reconnects == 1 and e.connected, e.state()
            assert e.last_error and "RegisterEngine" in e.last_error

        # The trainer restarted its counter too: version 1 again is applied, visible as a reset.
        _push(d.address, "llama-restart", sd3, 1)
        es.check(sd3, 1)
        for e in es.engines:
            assert e.applied_version == 1 and e.version_resets == 1, e.state()
        _push(d.address, "llama-restart", sd4, 2)
        es.check(sd4, 2)
        assert all(e.applied_version == 2 and e.version_resets == 1 for e in es.engines)
    except BaseException:
        print(d.log())
        raise
    finally:
        if es is not None:
            es.close()
        d.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def test_operator_unregister_stops_the_engine(daemon):
    """An operator's UnregisterEngine ends the stream cleanly: the engine stops instead of re-registering."""
    sd = _sd(1)
    es = EngineSet(daemon.address, "llama-unreg", "llama", sd, models.config("llama"), 1)
    eng = es.engines[0]
    try:
        with weightsync.Daemon(daemon.address) as dd:
            dd.stub.UnregisterEngine(weightsync.pb.UnregisterEngineRequest(engine_id=eng.engine_id), timeout=10)
        _until(lambda: eng.state()["closed"], 10, "the engine stops")
        assert eng.reconnects == 0 and "closed the event stream" in eng.state()["error"]
        assert not _engines_of(daemon.address, "llama-unreg")
    finally:
        es.close()


def test_waits_have_a_default_deadline(daemon, monkeypatch):
    es = EngineSet(daemon.address, "llama-wait", "llama", _sd(1), models.config("llama"), 1)
    monkeypatch.setattr(engine_mod, "DEFAULT_WAIT_TIMEOUT", 0.5)
    outcome = []

    def wait():
        try:
            es.engines[0].wait_for_version(7, timeout=None)
            outcome.append("returned")
        except weightsync.WeightSyncError as e:
            outcome.append(str(e))
    try:
        t = threading.Thread(target=wait, daemon=True)
        t.start()
        t.join(10)
        assert outcome and "version 7 not applied within 0.5 s" in outcome[0], outcome
    finally:
        es.close()


def test_start_deadline(tmp_path):
    """A daemon that accepts the connection but never answers: start() raises within its deadline."""
    import socket
    path = str(tmp_path / "mute.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(8)
    try:
        eng = weightsync.Engine("unix:" + path, "m", models.config("llama"), register_timeout=1.0)
        eng.empty("model.norm.weight", (64,), torch.bfloat16)
        t0 = time.monotonic()
        with pytest.raises(weightsync.WeightSyncError, match="within 1.0 s"):
            eng.start()
        assert time.monotonic() - t0 < 10
        eng.close()
    finally:
        srv.close()
        if os.path.exists(path):
            os.unlink(path)
