"""Integration-test harness: a real weightsyncd on a unix socket, weightsyncctl
subprocesses (push, mock-engine, gen-checkpoint), and bit-exact comparison of
the engines' dumps with the independent reference in tests/reference.

Binaries come from $WS_BUILD_DIR (default <repo>/build). Missing binaries fail
every test with a clear message: CI always builds them first.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

REPO = Path(os.environ.get("WS_SOURCE_DIR", Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(REPO / "tests" / "reference"))

import st_io  # noqa: E402
import vllm_ref  # noqa: E402

BUILD_DIR = Path(os.environ.get("WS_BUILD_DIR", REPO / "build"))
LAYOUTS_DIR = Path(os.environ.get("WS_LAYOUTS_DIR", REPO / "config" / "layouts"))
REGISTERED_RE = re.compile(r"^replica (\d+) rank (\d+) registered\b", re.M)


# --------------------------------------------------------------------------
# Processes

def _find_binary(name: str) -> Path | None:
    for cand in (BUILD_DIR / name, BUILD_DIR / "bin" / name):
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = [p for p in BUILD_DIR.rglob(name) if p.is_file() and os.access(p, os.X_OK)] \
        if BUILD_DIR.is_dir() else []
    return found[0] if found else None


@pytest.fixture(scope="session")
def binaries() -> dict[str, Path]:
    bins = {n: _find_binary(n) for n in ("weightsyncd", "weightsyncctl")}
    missing = [n for n, p in bins.items() if p is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found under WS_BUILD_DIR={BUILD_DIR}: build first "
                    f"(scripts/build.sh) or point WS_BUILD_DIR at the build directory", pytrace=False)
    if not LAYOUTS_DIR.is_dir():
        pytest.fail(f"layout rules directory {LAYOUTS_DIR} does not exist (set WS_LAYOUTS_DIR)", pytrace=False)
    return bins


def _env() -> dict:
    env = dict(os.environ)
    env["WEIGHTSYNC_LAYOUTS_DIR"] = str(LAYOUTS_DIR)
    env.pop("WEIGHTSYNC_DAEMON", None)
    return env


def run(argv, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Runs a command in its own process group; on timeout kills the whole group
    and fails the test with what the command printed so far."""
    argv = [str(a) for a in argv]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=_env(), **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(p)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(argv)}\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(argv, p.returncode, out, err)


def _killpg(p: subprocess.Popen, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass


def describe(cp: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(cp.args)}\nexit {cp.returncode}\nstdout:\n{cp.stdout}\nstderr:\n{cp.stderr}"


class Ctl:
    """weightsyncctl bound to one daemon address."""

    def __init__(self, binary: Path, addr: str | None):
        self.binary = binary
        self.addr = addr

    def argv(self, *args) -> list:
        pre = [self.binary] + (["--daemon", self.addr] if self.addr else [])
        return pre + list(args)

    def __call__(self, *args, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
        cp = run(self.argv(*args), timeout=timeout)
        if check and cp.returncode != 0:
            pytest.fail("command failed:\n" + describe(cp))
        return cp

    def health(self) -> subprocess.CompletedProcess:
        return self("health", "--timeout", "2", timeout=20)

    def status_json(self) -> dict:
        cp = self("status", "--json", timeout=30, check=True)
        return json.loads(cp.stdout)

    def push(self, checkpoint, model, world_size, *extra, timeout=180, check=True):
        return self("push", "--checkpoint", checkpoint, "--model", model, "--world-size", world_size,
                    *extra, timeout=timeout, check=check)


class Daemon:
    def __init__(self, binary: Path, workdir: Path, layouts_dir=LAYOUTS_DIR,
                 log_format: str = "text", log_level: str = "info"):
        self.sock_dir = Path(tempfile.mkdtemp(prefix="ws-", dir="/tmp"))  # short: sun_path limit
        self.sock = self.sock_dir / "d.sock"
        self.addr = f"unix:{self.sock}"
        self.log_path = workdir / f"weightsyncd-{self.sock_dir.name}.log"
        self.argv = [str(binary), "--listen", self.addr, "--layouts-dir", str(layouts_dir),
                     "--log-format", log_format, "--log-level", log_level]
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None

    def start(self, ctl: Ctl, timeout: float = 20) -> "Daemon":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=_env())
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"weightsyncd exited with {self.proc.returncode} during startup:\n{self.log()}")
            if self.sock.exists():
                last = ctl.health()
                if last.returncode == 0 and last.stdout.strip() == "SERVING":
                    return self
            time.sleep(0.05)
        self.kill()
        pytest.fail(f"weightsyncd not SERVING after {timeout}s; last health: "
                    f"{describe(last) if last else 'socket never appeared'}\nlog:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 10) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took). Fails the test on a hang."""
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"weightsyncd did not exit within {timeout}s of SIGTERM\nlog:\n{self.log()}")
        self.returncode = rc
        return rc, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            _killpg(self.proc)
            self.proc.wait()

    def cleanup(self) -> None:
        self.kill()
        if getattr(self, "_log", None):
            self._log.close()
        shutil.rmtree(self.sock_dir, ignore_errors=True)


class MockEngine:
    """`weightsyncctl mock-engine` in the background (R*T forked rank processes)."""

    def __init__(self, ctl: Ctl, workdir: Path, model: str, checkpoint, tp: int, replicas: int = 2,
                 dtype: str = "bf16", syncs: int = 1, extra=(), name: str = "engine"):
        self.tp, self.replicas, self.dtype = tp, replicas, dtype
        self.dump = workdir / f"{name}-dump"
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        argv = ctl.argv("mock-engine", "--model", model, "--checkpoint", checkpoint, "--tp", tp,
                        "--replicas", replicas, "--dtype", dtype, "--dump", self.dump,
                        "--syncs", syncs, *extra)
        self.argv = [str(a) for a in argv]
        self._out, self._err = open(self.out_path, "wb"), open(self.err_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._out, stderr=self._err,
                                     start_new_session=True, env=_env())

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def output(self) -> str:
        return f"$ {' '.join(self.argv)}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"

    def registered(self) -> set[tuple[int, int]]:
        return {(int(a), int(b)) for a, b in REGISTERED_RE.findall(self.stdout)}

    def wait_registered(self, timeout: float = 30) -> None:
        want = {(i, r) for i in range(self.replicas) for r in range(self.tp)}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.registered() >= want:
                return
            if self.proc.poll() is not None:
                pytest.fail(f"mock-engine exited with {self.proc.returncode} before all ranks "
                            f"registered\n{self.output()}")
            time.sleep(0.05)
        pytest.fail(f"mock-engine ranks registered: {sorted(self.registered())}, want {sorted(want)} "
                    f"after {timeout}s\n{self.output()}")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"mock-engine still running after {timeout}s\n{self.output()}")

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        _killpg(self.proc)  # stray rank children, if any
        self.proc.wait()
        self._out.close()
        self._err.close()

    def versions(self) -> list[int]:
        return sorted(int(p.name[1:]) for p in self.dump.glob("v*") if p.name[1:].isdigit())

    def aborted(self) -> list[int]:
        return sorted(int(p.name[len("aborted-v"):]) for p in self.dump.glob("aborted-v*"))

    def rank_file(self, sub: str, replica: int, rank: int) -> Path:
        return self.dump / sub / f"replica{replica}-rank{rank}.safetensors"


# --------------------------------------------------------------------------
# Fixtures

@pytest.fixture
def workdir(tmp_path) -> Path:
    return tmp_path


SHM_RE = re.compile(r"^ws-(\d+)-")


def _shm_objects() -> set[str]:
    try:
        return {n for n in os.listdir("/dev/shm") if SHM_RE.match(n)}
    except FileNotFoundError:
        return set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@pytest.fixture(autouse=True)
def no_shm_leaks():
    """Trainer and engine shm objects (/dev/shm/ws-<pid>-...) must be gone once
    their processes are: a test that leaves one behind fails."""
    before = _shm_objects()
    yield
    leaked = sorted(n for n in _shm_objects() - before
                    if not _pid_alive(int(SHM_RE.match(n).group(1))))
    assert not leaked, f"shared-memory objects left behind: {leaked}"


@pytest.fixture
def daemon_factory(binaries, tmp_path):
    started: list[Daemon] = []

    def make(start: bool = True, **kw) -> Daemon:
        d = Daemon(binaries["weightsyncd"], tmp_path, **kw)
        started.append(d)
        if start:
            d.start(Ctl(binaries["weightsyncctl"], d.addr))
        return d

    yield make
    for d in started:
        d.cleanup()


@pytest.fixture
def daemon(daemon_factory, binaries):
    """A running daemon; at teardown it must be healthy, stop on SIGTERM and exit 0."""
    d = daemon_factory()
    yield d
    if d.returncode is None:
        assert d.alive(), f"weightsyncd died during the test:\n{d.log()}"
        rc, secs = d.terminate()
        assert rc == 0, f"weightsyncd exited {rc} on SIGTERM\nlog:\n{d.log()}"


@pytest.fixture
def ctl(binaries, daemon) -> Ctl:
    return Ctl(binaries["weightsyncctl"], daemon.addr)


@pytest.fixture
def engines(ctl, workdir):
    """Factory for mock engines bound to the test's daemon; all stopped at teardown."""
    made: list[MockEngine] = []

    def start(model, checkpoint, tp, replicas=2, dtype="bf16", syncs=1, extra=(), register=True):
        e = MockEngine(ctl, workdir, model, checkpoint, tp, replicas, dtype, syncs, extra,
                       name=f"engine{len(made)}")
        made.append(e)
        if register:
            e.wait_registered()
        return e

    yield start
    for e in made:
        e.stop()


@pytest.fixture(scope="session")
def checkpoint_cache(binaries, tmp_path_factory):
    """gen-checkpoint results, generated once per distinct argument list."""
    root = tmp_path_factory.mktemp("ckpt")
    cache: dict[tuple, Path] = {}

    def gen(arch: str, **flags) -> Path:
        key = (arch,) + tuple(sorted(flags.items()))
        if key not in cache:
            out = root / f"c{len(cache)}"
            args = ["gen-checkpoint", "--arch", arch, "--out", out]
            for k, v in sorted(flags.items()):
                args += [f"--{k.replace('_', '-')}", v]
            cp = Ctl(binaries["weightsyncctl"], None)(*args, timeout=120)
            if cp.returncode != 0:
                pytest.fail("gen-checkpoint failed:\n" + describe(cp))
            cache[key] = out
        return cache[key]

    return gen


# --------------------------------------------------------------------------
# Dumps and comparison

def load_dump(path: Path) -> dict[str, np.ndarray]:
    """A mock-engine dump; BF16 (which numpy lacks) is read raw as ml_dtypes.bfloat16."""
    header, _ = st_io.read_header(path)
    if any(v["dtype"] == "BF16" for v in header.values()):
        return {k: np.array(v) for k, v in st_io.load(path).items()}
    return safetensors.numpy.load_file(str(path))


@lru_cache(maxsize=256)
def _reference(ckpt: str, tp: int, rank: int, dtype: str, options: tuple) -> dict:
    return vllm_ref.expected_rank_tensors(ckpt, tp, rank, dtype=dtype, options=dict(options))


def reference(ckpt, tp, rank, dtype="bf16", options=None) -> dict[str, np.ndarray]:
    return _reference(str(ckpt), tp, rank, dtype, tuple(sorted((options or {}).items())))


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def compare_rank(got: dict, want: dict, label: str) -> None:
    """Bit-exact comparison; the failure names the param, rank and first differing index."""
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    assert not missing and not extra, \
        f"{label}: params differ from the reference: missing {missing[:8]}, unexpected {extra[:8]}"
    for name in sorted(want):
        g, w = got[name], want[name]
        assert g.shape == w.shape, f"{label}: {name}: shape {g.shape}, reference {w.shape}"
        assert g.dtype == w.dtype, f"{label}: {name}: dtype {g.dtype}, reference {w.dtype}"
        gb, wb = _bits(g), _bits(w)
        if not np.array_equal(gb, wb):
            diff = np.flatnonzero(gb.reshape(-1) != wb.reshape(-1))
            idx = np.unravel_index(diff[0], g.shape)
            raise AssertionError(
                f"{label}: {name}: {diff.size} of {g.size} elements differ; first at index "
                f"{tuple(int(i) for i in idx)}: got {g[idx]!r} (0x{int(gb[idx]):x}), "
                f"reference {w[idx]!r} (0x{int(wb[idx]):x})")


def check_version(engine: MockEngine, sub: str, ckpt, options=None) -> None:
    """Every replica's every rank of dump `sub` equals the reference of `ckpt`."""
    for i in range(engine.replicas):
        for r in range(engine.tp):
            path = engine.rank_file(sub, i, r)
            assert path.exists(), f"missing dump {path}\n{engine.output()}"
            compare_rank(load_dump(path), reference(ckpt, engine.tp, r, engine.dtype, options),
                         f"{sub} replica {i} rank {r}/{engine.tp}")


def check_same_as_initial(engine: MockEngine, sub: str) -> None:
    """Dump `sub` is byte-identical to the registration-time (garbage) dump."""
    for i in range(engine.replicas):
        for r in range(engine.tp):
            a = load_dump(engine.rank_file(sub, i, r))
            b = load_dump(engine.rank_file("initial", i, r))
            assert a.keys() == b.keys()
            for n in a:
                assert np.array_equal(_bits(a[n]), _bits(b[n])), \
                    f"{sub} replica {i} rank {r}: {n} changed although nothing was committed"


@pytest.fixture(scope="session")
def layout_covers(binaries, tmp_path_factory):
    """arch -> whether the layout rules cover it (probed with gen-checkpoint)."""
    root = tmp_path_factory.mktemp("probe")
    seen: dict[str, bool] = {}

    def covers(arch: str) -> bool:
        if arch not in seen:
            cp = Ctl(binaries["weightsyncctl"], None)("gen-checkpoint", "--arch", arch, "--out", root / arch)
            if cp.returncode != 0 and "no layout rules for architecture" not in cp.stderr:
                pytest.fail("gen-checkpoint probe failed:\n" + describe(cp))
            seen[arch] = cp.returncode == 0
        return seen[arch]

    return covers


# --------------------------------------------------------------------------
# Matrix summary of test_hf_checkpoints.py (architecture x TP size)

_RANK = {"passed": 0, "skipped": 1, "failed": 2}


def pytest_terminal_summary(terminalreporter):
    """Prints which TP sizes passed for each architecture and checkpoint variant,
    as a markdown table; only when test_hf_matrix ran."""
    cells: dict[tuple, str] = {}
    sources = set()
    for reports in terminalreporter.stats.values():
        for rep in reports:
            props = dict(getattr(rep, "user_properties", ()) or ())
            if "hf_matrix" not in props or not hasattr(rep, "outcome"):
                continue
            sources.add(props.get("hf_source", ""))
            key = tuple(props["hf_matrix"])
            if key not in cells or _RANK[rep.outcome] > _RANK[cells[key]]:
                cells[key] = rep.outcome
    if not cells:
        return
    tr = terminalreporter
    cols = [(T, False) for T in (1, 2, 4, 8)] + [(T, True) for T in (4, 8)]
    label = {"passed": "pass", "failed": "FAIL", "skipped": "skip"}
    tr.write_sep("=", "HF checkpoint matrix: W in {1,3,4} x shard dim {0,1}, bf16, bit-exact")
    for s in sorted(sources):
        tr.write_line(f"checkpoints: {s}")
    tr.write_line("| architecture | variant | " + " | ".join(f"T={T}{' EP' if ep else ''}" for T, ep in cols) + " |")
    tr.write_line("|---|---|" + "---|" * len(cols))
    rows = sorted({(a, v) for a, v, _, _ in cells})
    for a, v in rows:
        tr.write_line(f"| {a} | {v} | " + " | ".join(label.get(cells.get((a, v, T, ep)), "-")
                                                   for T, ep in cols) + " |")
    tr.write_line("")
    tr.write_line("| architecture | TP sizes passed (every variant) | failed |")
    tr.write_line("|---|---|---|")
    for a in sorted({a for a, _ in rows}):
        mine = {k: o for k, o in cells.items() if k[0] == a}
        ok = [f"{T}{' EP' if ep else ''}" for T, ep in cols
              if any(k[2:] == (T, ep) for k in mine)
              and all(o == "passed" for k, o in mine.items() if k[2:] == (T, ep))]
        bad = sorted(f"{v} T={T}{' EP' if ep else ''}" for (_, v, T, ep), o in mine.items() if o == "failed")
        tr.write_line(f"| {a} | {', '.join(ok) or '-'} | {', '.join(bad) or '-'} |")


@pytest.fixture
def net():
    """Hosts as network namespaces (netns.py); skipped, visibly, where they cannot be made."""
    import netns
    why = netns.unavailable_reason()
    if why:
        pytest.skip(f"multi-host tests need network namespaces: {why}")
    n = netns.Net()
    yield n
    n.close()
