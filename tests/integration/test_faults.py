"""Faults: corrupted manifests and data, a trainer that dies mid-sync, an engine
with a parameter no rule fills, and SIGTERM during a sync. In every case the
daemon stays healthy, nothing half-written is committed, and a following good
sync lands bit-exactly."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import _env, check_same_as_initial, check_version, describe

VALIDATION_KINDS = ["unknown-tensor", "wrong-shape", "wrong-dtype", "overlap", "gap", "drop-tensor"]
SMALL = dict(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=160, vocab_size=100, seed=1)
R, T, W = 2, 2, 3


def assert_serving(ctl, daemon):
    assert daemon.alive(), f"weightsyncd died:\n{daemon.log()}"
    h = ctl.health()
    assert h.returncode == 0 and h.stdout.strip() == "SERVING", describe(h)


def event_lines(engine, what: str, version: int) -> list[str]:
    return [l for l in engine.stdout.splitlines() if re.search(rf"\b{what}\b", l)
            and re.search(rf"\bversion {version}\b", l)]


def wait_for_abort_events(engine, version: int, quiet: float = 1.5, timeout: float = 20) -> int:
    """Waits until every rank that heard `version` start has also heard it aborted
    (each writes its aborted dump before printing). Returns how many ranks did."""
    deadline = time.monotonic() + timeout
    quiet_until = time.monotonic() + quiet
    n = engine.replicas * engine.tp
    while time.monotonic() < deadline:
        started = len(event_lines(engine, "started", version))
        aborted = len(event_lines(engine, "aborted", version))
        if aborted >= n or (started == 0 and time.monotonic() > quiet_until):
            return aborted
        time.sleep(0.05)
    pytest.fail(f"engines heard version {version} start but not all heard it aborted\n{engine.output()}")


def good_push_commits(ctl, engine, ckpt, version: int):
    ctl.push(ckpt, "m", W, "--version", version)
    assert engine.wait() == 0, engine.output()
    assert engine.versions() == [version], engine.output()
    check_version(engine, f"v{version}", ckpt)


@pytest.mark.parametrize("kind", VALIDATION_KINDS)
def test_validation_inject(ctl, daemon, engines, checkpoint_cache, kind):
    a = checkpoint_cache("LlamaForCausalLM", **SMALL)
    eng = engines("m", a, tp=T, replicas=R, syncs=1)
    cp = ctl.push(a, "m", W, "--version", 1, "--inject", kind, check=False)
    assert cp.returncode != 0, describe(cp)
    if kind == "unknown-tensor":
        culprit = "model.bogus.weight"
    else:
        m = re.search(r'--inject \S+ applied to tensor "([^"]+)"', cp.stderr)
        assert m, describe(cp)
        culprit = m.group(1)
    errors = [l for l in cp.stderr.splitlines() if "applied to tensor" not in l]
    assert any(culprit in l for l in errors), f"the error does not name {culprit}:\n{describe(cp)}"
    # Refused while planning: BeginSync fails, before any byte moves.
    assert any("BeginSync" in l for l in errors), describe(cp)
    assert_serving(ctl, daemon)

    aborted = wait_for_abort_events(eng, 1)
    assert eng.versions() == []
    for v in eng.aborted():
        check_same_as_initial(eng, f"aborted-v{v}")
    assert aborted == 0 or eng.aborted() == [1]
    st = ctl.status_json()
    assert int(st["syncs_committed"]) == 0
    assert all(int(m["committed_version"]) == 0 for m in st["models"]), st["models"]

    good_push_commits(ctl, eng, a, 2)


def test_oob_memref(ctl, daemon, engines, checkpoint_cache):
    a = checkpoint_cache("LlamaForCausalLM", **SMALL)
    eng = engines("m", a, tp=T, replicas=R, syncs=1)
    cp = ctl.push(a, "m", W, "--version", 1, "--inject", "oob-memref", check=False)
    assert cp.returncode != 0, describe(cp)
    # The error points at the memory reference: the shm object / offset / bounds.
    assert re.search(r"trainer0|offset|out of (range|bounds)|bounds|exceeds|beyond", cp.stderr, re.I), describe(cp)
    assert_serving(ctl, daemon)
    aborted = wait_for_abort_events(eng, 1)
    assert aborted == R * T, f"engines were told version 1 started; all must hear it aborted\n{eng.output()}"
    assert eng.versions() == [] and eng.aborted() == [1]
    st = ctl.status_json()
    assert int(st["syncs_committed"]) == 0 and int(st["syncs_aborted"]) == 1
    assert st["last_sync"]["state"] == "aborted" and st["last_sync"]["error"], st["last_sync"]
    good_push_commits(ctl, eng, a, 2)


def test_trainer_crash_mid_sync(ctl, daemon, engines, checkpoint_cache):
    a = checkpoint_cache("LlamaForCausalLM", **SMALL)
    eng = engines("m", a, tp=T, replicas=R, syncs=1)
    cp = ctl.push(a, "m", W, "--version", 1, "--crash-after-layers", 1, check=False)
    assert cp.returncode == 17, describe(cp)
    aborted = wait_for_abort_events(eng, 1)
    assert aborted == R * T, eng.output()
    assert eng.aborted() == [1] and eng.versions() == []
    assert_serving(ctl, daemon)
    deadline = time.monotonic() + 10
    while True:
        st = ctl.status_json()
        if int(st["syncs_aborted"]) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert int(st["syncs_aborted"]) == 1 and int(st["syncs_committed"]) == 0, st
    last = st["last_sync"]
    assert last["state"] == "aborted" and int(last["version"]) == 1 and last["error"], last
    assert not st.get("current_syncs"), st
    good_push_commits(ctl, eng, a, 2)


def test_engine_with_unfillable_param_refused(ctl, daemon, engines, checkpoint_cache):
    a = checkpoint_cache("LlamaForCausalLM", **SMALL)
    eng = engines("m", a, tp=T, replicas=1, extra=["--extra-param", "model.layers.0.extra_scale"],
                  register=False)
    rc = eng.wait(timeout=30)
    assert rc != 0, eng.output()
    assert "Some weights are not initialized" in eng.stderr, eng.output()
    assert "model.layers.0.extra_scale" in eng.stderr, eng.output()
    assert_serving(ctl, daemon)
    assert ctl.status_json().get("engines", []) == []


def test_sigterm_during_sync(ctl, daemon, engines, checkpoint_cache):
    big = checkpoint_cache("LlamaForCausalLM", hidden_size=512, layers=4, heads=8, kv_heads=2,
                           intermediate_size=1536, vocab_size=8000, seed=3)
    engines("m", big, tp=2, replicas=1, syncs=100000)
    push = subprocess.Popen([str(a) for a in ctl.argv("push", "--checkpoint", big, "--model", "m",
                                                      "--world-size", 2, "--repeat", 100000)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=_env())
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if push.poll() is not None:
                pytest.fail(f"push ended early ({push.returncode}): {push.communicate()}")
            if ctl.status_json().get("current_syncs"):
                break
            time.sleep(0.02)
        else:
            pytest.fail("no sync ever in progress")
        rc, secs = daemon.terminate(timeout=10)
        assert rc == 0, f"weightsyncd exited {rc} on SIGTERM during a sync\n{daemon.log()}"
        assert secs < 5, f"weightsyncd took {secs:.1f}s to stop"
        try:
            push.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("push hung after the daemon stopped")
        assert push.returncode != 0
    finally:
        if push.poll() is None:
            push.send_signal(signal.SIGKILL)
            push.wait()


def test_truncated_engine_memory_refused_at_begin(ctl, daemon, engines, checkpoint_cache):
    """An engine shm object that shrinks after registration is refused before any byte moves."""
    a = checkpoint_cache("LlamaForCausalLM", **SMALL)
    eng = engines("m", a, tp=T, replicas=R, syncs=1)
    # replica 0, rank 0 of this engine: the newest such object (older runs may have left some)
    victims = list(Path("/dev/shm").glob("ws-*-engine-r0-t0-*"))
    assert victims, "mock-engine's shm objects not found"
    os.truncate(max(victims, key=lambda p: p.stat().st_mtime_ns), 0)
    cp = ctl.push(a, "m", W, "--version", 1, check=False)
    assert cp.returncode != 0, describe(cp)
    assert "shrank" in cp.stderr and "param" in cp.stderr, describe(cp)
    assert_serving(ctl, daemon)
    assert eng.versions() == []
