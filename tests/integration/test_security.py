"""The trust boundary, tried by other Unix users (docs/security.md).

A root daemon (as the systemd unit runs it) on a unix socket every user may
connect to; two unprivileged users, a victim and an attacker, created with
useradd and running tests/integration/sec_actor.py under setpriv. Every trick
of the security review must fail with an error naming the culprit, the
daemon must stay SERVING, and nothing of another user's may be read or
written. Needs root (CI runs as root); skipped, visibly, otherwise.
"""
from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(os.environ.get("WS_SOURCE_DIR", Path(__file__).resolve().parents[2]))
BUILD_DIR = Path(os.environ.get("WS_BUILD_DIR", REPO / "build"))
SYS_PYTHON = "/usr/bin/python3"  # Debian's, with python3-grpcio: usable by any user
USERS = ("ws-sec-victim", "ws-sec-attacker")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: creates users, runs a root daemon")


def _ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True)
        return pwd.getpwnam(name)


@pytest.fixture(scope="module")
def stage():
    """A world-readable folder with the actor script, the Python package and the daemon binary."""
    for tool in ("useradd", "setpriv", "mkfifo"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is missing (scripts/install-deps.sh installs it)")
    probe = subprocess.run([SYS_PYTHON, "-c", "import grpc, google.protobuf"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.fail(f"{SYS_PYTHON} lacks grpcio/protobuf (Debian python3-grpcio, python3-protobuf): {probe.stderr}")
    users = {n: _ensure_user(n) for n in USERS}
    d = Path(tempfile.mkdtemp(prefix="ws-sec-", dir="/tmp"))
    shutil.copytree(REPO / "client" / "python" / "weightsync", d / "weightsync",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "tests" / "integration" / "sec_actor.py", d / "sec_actor.py")
    shutil.copy(BUILD_DIR / "weightsyncd", d / "weightsyncd")
    shutil.copytree(REPO / "config" / "layouts", d / "layouts")
    for root, dirs, files in os.walk(d):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o755)
    yield {"dir": d, "users": users}
    shutil.rmtree(d, ignore_errors=True)


class Daemon:
    def __init__(self, stage, *extra, user: str | None = None):
        self.stage_dir = stage["dir"]
        self.dir = Path(tempfile.mkdtemp(prefix="ws-secd-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.sock = self.dir / "d.sock"
        self.addr = f"unix:{self.sock}"
        self.log_path = self.dir / "weightsyncd.log"
        argv = [str(stage["dir"] / "weightsyncd"), "--listen", self.addr, "--layouts-dir",
                str(stage["dir"] / "layouts"), "--socket-mode", "0666", *extra]
        if user:
            u = stage["users"][user]
            os.chown(self.dir, u.pw_uid, u.pw_gid)
            argv = ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups", *argv]
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"weightsyncd did not start:\n{self.log()}")
            time.sleep(0.05)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving(self) -> bool:
        """Alive and answering GetStatus (as root)."""
        cp = subprocess.run([SYS_PYTHON, str(self.stage_dir / "sec_actor.py"), "--daemon", self.addr, "status"],
                            capture_output=True, text=True, timeout=30, env={"PYTHONPATH": str(self.stage_dir)})
        return self.proc.poll() is None and cp.returncode == 0 and '"ok": true' in cp.stdout

    def stop(self) -> float:
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return time.monotonic() - t0


@pytest.fixture()
def daemon(stage):
    d = Daemon(stage, "--sync-progress-timeout", "3")
    yield d
    d.stop()
    shutil.rmtree(d.dir, ignore_errors=True)


def actor(stage, user: str, daemon: Daemon, action: str, *args, timeout: float = 60) -> list[dict]:
    """Runs sec_actor.py ACTION as `user`; returns its JSON lines."""
    u = stage["users"][user]
    cmd = ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups",
           SYS_PYTHON, str(stage["dir"] / "sec_actor.py"), "--daemon", daemon.addr, action, *map(str, args)]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env={"PYTHONPATH": str(stage["dir"]), "PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"{action} as {user} failed: {cp.stderr}"
    return [json.loads(line) for line in cp.stdout.splitlines() if line.startswith("{")]


class Holder:
    """A registration held open by `user` (the engine lives while the stream does)."""

    def __init__(self, stage, user, daemon, *args):
        u = stage["users"][user]
        cmd = ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups",
               SYS_PYTHON, str(stage["dir"] / "sec_actor.py"), "--daemon", daemon.addr, "hold", *map(str, args)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env={"PYTHONPATH": str(stage["dir"]), "PATH": "/usr/bin:/bin"})
        self.result = json.loads(self.proc.stdout.readline() or "{}")

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def shm_object(name: str, owner: pwd.struct_passwd | None, mode: int, fill: bytes = b"\x00", size: int = 4096):
    path = Path("/dev/shm") / name.lstrip("/")
    if path.exists() or path.is_symlink():
        path.unlink()
    path.write_bytes(fill * size)
    os.chmod(path, mode)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
    return path


def refused(res: dict, code: str, *needles: str):
    assert not res["ok"], f"expected a refusal, got {res}"
    assert res["code"] == code, res
    for n in needles:
        assert n in res["message"], f"{n!r} not in {res['message']!r}"


# ---------------------------------------------------------------- memory

def test_other_users_and_root_objects_cannot_be_mapped(stage, daemon):
    victim = stage["users"]["ws-sec-victim"]
    secret = shm_object("ws-sec-root-secret", None, 0o600, b"S")          # root's, 0600
    theirs = shm_object("ws-sec-victim-obj", victim, 0o600, b"V")          # another user's, 0600
    try:
        for name in ("/ws-sec-root-secret", "/dev/shm/ws-sec-victim-obj"):
            [r] = actor(stage, "ws-sec-attacker", daemon, "register", "--name", name)
            refused(r, "PERMISSION_DENIED", name, "owned by uid", "not by the caller")
        assert secret.read_bytes() == b"S" * 4096 and theirs.read_bytes() == b"V" * 4096
        assert daemon.serving()
    finally:
        secret.unlink()
        theirs.unlink()


def test_links_paths_and_special_files_are_refused_promptly(stage, daemon, tmp_path):
    attacker = stage["users"]["ws-sec-attacker"]
    outside = tmp_path / "root-only"
    outside.write_bytes(b"R" * 4096)
    os.chmod(outside, 0o600)
    link = Path("/dev/shm/ws-sec-link")
    if link.exists() or link.is_symlink():
        link.unlink()
    os.symlink(outside, link)
    os.lchown(link, attacker.pw_uid, attacker.pw_gid)
    fifo = Path("/dev/shm/ws-sec-fifo")
    if fifo.exists():
        fifo.unlink()
    os.mkfifo(fifo)
    os.chown(fifo, attacker.pw_uid, attacker.pw_gid)
    sub = Path("/dev/shm/ws-sec-dir")
    sub.mkdir(exist_ok=True)
    os.chown(sub, attacker.pw_uid, attacker.pw_gid)
    shm_object("ws-sec-dir/x", attacker, 0o600)
    try:
        cases = {
            "/ws-sec-link": "symbolic link",
            "/ws-sec-fifo": "FIFO",
            "/dev/shm/ws-sec-dir/x": "directly under /dev/shm",
            "/dev/shm/../../etc/passwd": "directly under /dev/shm",
            str(outside): "directly under /dev/shm",
            "/ws-sec-dir": "directory",
        }
        for name, why in cases.items():
            [r] = actor(stage, "ws-sec-attacker", daemon, "register", "--name", name)
            assert not r["ok"], (name, r)
            assert why in r["message"], (name, r)
            assert r["seconds"] < 5, f"{name}: refusal took {r['seconds']:.1f} s"
        assert outside.read_bytes() == b"R" * 4096
        assert daemon.serving()
    finally:
        link.unlink()
        fifo.unlink()
        shutil.rmtree(sub, ignore_errors=True)


def test_directory_entry_swapped_for_a_symlink_while_the_daemon_opens_it(stage, daemon, tmp_path):
    """The classic check-then-open race: never maps the target of the link."""
    attacker = stage["users"]["ws-sec-attacker"]
    outside = tmp_path / "root-only"
    outside.write_bytes(b"R" * 4096)
    os.chmod(outside, 0o600)
    before = outside.stat()
    mine = shm_object("ws-sec-race-real", attacker, 0o600)
    entry = Path("/dev/shm/ws-sec-race")
    stop = threading.Event()

    def swap():
        link_tmp = Path("/dev/shm/ws-sec-race.l")
        while not stop.is_set():
            for src in ("link", "file"):
                tmp = link_tmp
                if tmp.exists() or tmp.is_symlink():
                    tmp.unlink()
                if src == "link":
                    os.symlink(outside, tmp)
                else:
                    os.link(mine, tmp)
                os.rename(tmp, entry)

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    try:
        results = actor(stage, "ws-sec-attacker", daemon, "register", "--name", "/ws-sec-race", "--repeat", 40)
    finally:
        stop.set()
        t.join()
    assert len(results) == 40
    for r in results:
        # Either the attacker's own file (registered, or refused as overlapping
        # the previous iteration's registration of that same file, which is
        # still being torn down), or the link was seen and refused.
        assert r["ok"] or "symbolic link" in r["message"] or "overlaps the memory of engine" in r["message"], r
        assert "owned by uid 0" not in r.get("message", ""), f"the daemon followed the link: {r}"
    assert outside.read_bytes() == b"R" * 4096 and outside.stat().st_mtime_ns == before.st_mtime_ns
    for p in (entry, mine):
        p.unlink(missing_ok=True)
    assert daemon.serving()


def test_parameter_memory_of_another_model_cannot_be_aliased(stage, daemon):
    attacker = stage["users"]["ws-sec-attacker"]
    shm_object("ws-sec-alias", attacker, 0o600)
    h = Holder(stage, "ws-sec-attacker", daemon, "--model", "m", "--name", "/ws-sec-alias")
    try:
        assert h.result.get("ok"), h.result
        [r] = actor(stage, "ws-sec-attacker", daemon, "register", "--model", "m2", "--name", "/ws-sec-alias",
                    "--offset", 16)
        refused(r, "INVALID_ARGUMENT", "overlaps the memory of engine", "(m replica 0 tp_rank 0")
        # Two params of one rank on the same bytes.
        shm_object("ws-sec-alias2", attacker, 0o600)
        [r] = actor(stage, "ws-sec-attacker", daemon, "register", "--model", "m3", "--name", "/ws-sec-alias2",
                    "--name", "/ws-sec-alias2")
        refused(r, "INVALID_ARGUMENT", "overlap in memory")
        # Misaligned for bf16.
        [r] = actor(stage, "ws-sec-attacker", daemon, "register", "--model", "m4", "--name", "/ws-sec-alias2",
                    "--offset", 1)
        refused(r, "INVALID_ARGUMENT", "not a multiple of the bf16 element size")
    finally:
        h.close()
        Path("/dev/shm/ws-sec-alias").unlink(missing_ok=True)
        Path("/dev/shm/ws-sec-alias2").unlink(missing_ok=True)


# ---------------------------------------------------------------- ownership

def test_engines_models_and_syncs_belong_to_their_owner(stage, daemon):
    victim = stage["users"]["ws-sec-victim"]
    shm_object("ws-sec-v-eng", victim, 0o600)
    shm_object("ws-sec-a-eng", stage["users"]["ws-sec-attacker"], 0o600)
    h = Holder(stage, "ws-sec-victim", daemon, "--model", "vm", "--name", "/ws-sec-v-eng")
    try:
        assert h.result.get("ok"), h.result
        eng = h.result["engine_id"]
        [r] = actor(stage, "ws-sec-attacker", daemon, "unregister", "--engine-id", eng)
        refused(r, "PERMISSION_DENIED", eng, "belongs to uid:%d" % victim.pw_uid)
        [r] = actor(stage, "ws-sec-attacker", daemon, "ack", "--engine-id", eng, "--version", 1)
        refused(r, "PERMISSION_DENIED", "belongs to")
        # A fake replica of the victim's model would block its syncs.
        [r] = actor(stage, "ws-sec-attacker", daemon, "register", "--model", "vm", "--replica", 1,
                    "--name", "/ws-sec-a-eng")
        refused(r, "PERMISSION_DENIED", "model vm belongs to")
        [r] = actor(stage, "ws-sec-attacker", daemon, "begin", "--model", "vm")
        refused(r, "PERMISSION_DENIED", "model vm belongs to")

        [b] = actor(stage, "ws-sec-victim", daemon, "begin", "--model", "vm", "--version", 1)
        assert b["ok"], b
        sync = b["sync_id"]
        for action in ("abort", "commit"):
            [r] = actor(stage, "ws-sec-attacker", daemon, action, "--sync-id", sync)
            refused(r, "PERMISSION_DENIED", f"sync {sync} belongs to uid:{victim.pw_uid}")
        [r] = actor(stage, "ws-sec-victim", daemon, "abort", "--sync-id", sync)
        assert r["ok"], r
        # Versions strictly increase; 0 is refused.
        [r] = actor(stage, "ws-sec-victim", daemon, "begin", "--model", "vm", "--version", 0)
        refused(r, "INVALID_ARGUMENT", "version must be at least 1")
        [r] = actor(stage, "ws-sec-attacker", daemon, "status")
        assert eng in r["engines"], "the victim's engine is still registered"
    finally:
        h.close()
        Path("/dev/shm/ws-sec-v-eng").unlink(missing_ok=True)
        Path("/dev/shm/ws-sec-a-eng").unlink(missing_ok=True)


# ---------------------------------------------------------------- wedges

def test_a_trainer_that_opens_its_streams_and_stalls_frees_the_model(stage, daemon):
    """BeginSync, a Push stream that never sends a layer: aborted after the progress deadline."""
    victim = stage["users"]["ws-sec-victim"]
    shm_object("ws-sec-stall", victim, 0o600)
    h = Holder(stage, "ws-sec-victim", daemon, "--model", "sm", "--name", "/ws-sec-stall")
    try:
        assert h.result.get("ok"), h.result
        [b] = actor(stage, "ws-sec-victim", daemon, "begin", "--model", "sm", "--version", 1)
        assert b["ok"], b
        u = victim
        push = subprocess.Popen(["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--clear-groups",
                                 SYS_PYTHON, str(stage["dir"] / "sec_actor.py"), "--daemon", daemon.addr,
                                 "push-nothing"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={"PYTHONPATH": str(stage["dir"]), "PATH": "/usr/bin:/bin"})
        try:
            assert json.loads(push.stdout.readline())["opened"]
            deadline = time.monotonic() + 15  # progress timeout 3 s, housekeeping every second
            while True:
                [r] = actor(stage, "ws-sec-victim", daemon, "begin", "--model", "sm", "--version", 2)
                if r["ok"]:
                    break
                assert time.monotonic() < deadline, f"model still busy: {r}"
                time.sleep(0.5)
        finally:
            push.kill()
        assert "no trainer activity for 3.0 s" in daemon.log()
    finally:
        h.close()
        Path("/dev/shm/ws-sec-stall").unlink(missing_ok=True)


def test_unprivileged_daemon_is_not_wedged_by_a_fifo_and_stops_promptly(stage):
    """The daemon as an ordinary user (as the unit may run it): a FIFO named as memory used to block it."""
    d = Daemon(stage, user="ws-sec-attacker")
    fifo = Path("/dev/shm/ws-sec-fifo2")
    try:
        if fifo.exists():
            fifo.unlink()
        os.mkfifo(fifo)
        attacker = stage["users"]["ws-sec-attacker"]
        os.chown(fifo, attacker.pw_uid, attacker.pw_gid)
        [r] = actor(stage, "ws-sec-attacker", d, "register", "--name", "/ws-sec-fifo2")
        assert not r["ok"] and "FIFO" in r["message"], r
        assert r["seconds"] < 5
        [r] = actor(stage, "ws-sec-attacker", d, "status")
        assert r["ok"], r
    finally:
        took = d.stop()
        fifo.unlink(missing_ok=True)
    assert took < 10, f"SIGTERM took {took:.1f} s"
    assert d.proc.returncode == 0, d.log()
