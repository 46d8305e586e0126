"""Engine side: register parameter buffers with the daemon and apply committed versions.

    eng = weightsync.Engine("unix:/run/weightsync.sock", model="policy", hf_config=config,
                            tp_rank=0, tp_size=2)
    w = eng.empty("model.layers.0.self_attn.qkv_proj.weight", (640, 1024), torch.bfloat16)
    eng.on_commit(lambda version: ...)      # post-load steps, before the ack
    eng.on_pause(lambda version: ...)       # stop work reading the weights (before in-place writes)
    eng.on_resume(lambda version: ...)      # after the version was applied, or aborted
    eng.start()
    eng.wait_for_version(3)

The daemon writes straight into the registered buffers while a sync streams;
`committed` means every byte of that version is in place. The engine then
runs its on_commit callbacks and acknowledges (AckVersion ok, or the
callback's error). `aborted` means the version will not be committed: buffers
may hold a mix of versions until the next committed one (staged buffers:
never the live weights).

Pause barrier: `started` is answered with AckPaused after the on_pause
callbacks returned (the engine stopped issuing work that reads its weights
and synchronized its device); the daemon's in-place writes into this engine
wait for it. on_resume runs once the version was applied (after on_commit)
or aborted, or the stream broke. Buffers registered staged=True are applied
only by on_commit: an engine with nothing but staged buffers is not paused.

Surviving the daemon: when the event stream breaks after a successful
registration (the daemon restarted or the connection dropped), the engine
re-registers the same buffers with exponential backoff until it succeeds or
is closed; `reconnects`, `connected` and `last_error` show it. A refusal that
cannot heal (invalid or unauthorised registration), an explicit unregister by
the daemon's operator, and an on_abort callback that raises end the engine:
its stream is cancelled and it is unregistered, and waits raise the reason.

Versions: `applied_version` is the last applied version. A committed version
that is not above it (a trainer or daemon whose counter restarted) is applied,
logged and counted in `version_resets`; waits then count from it.

Thread-safety: register()/empty()/on_commit()/on_abort() before start(); after
that, wait_for_version/applied_version/state/close may be called from any
thread. Callbacks run on the engine's event thread, one at a time.
"""
from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
from typing import Callable

import grpc
import torch

from ._proto import weightsync_pb2 as pb
from .cuda_ipc import export_tensor
from .daemon import as_daemon
from .dtypes import parse_dtype, to_wire
from .errors import WeightSyncError, rpc_error
from .shm import ShmArena, ShmIndex

log = logging.getLogger("weightsync.engine")

# wait_for_version's deadline when none is given (None means this, never "forever").
DEFAULT_WAIT_TIMEOUT = 300.0
# Status codes after which a registration can never succeed as sent: no reconnect.
_PERMANENT = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED,
                        grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNIMPLEMENTED,
                        grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE})
_KEEP_OUTCOMES = 1024  # aborted/failed versions remembered for waiters


def _config_json(hf_config) -> str:
    if hf_config is None:
        raise WeightSyncError("Engine needs the model's HF config (dict, JSON text or a transformers config)")
    if isinstance(hf_config, str):
        return hf_config
    if isinstance(hf_config, dict):
        return json.dumps(hf_config)
    if hasattr(hf_config, "to_json_string"):
        return hf_config.to_json_string(use_diff=False)
    if hasattr(hf_config, "to_dict"):
        return json.dumps(hf_config.to_dict(), default=str)
    raise WeightSyncError(f"cannot serialise an HF config of type {type(hf_config).__name__}")


class _Stop(Exception):
    """The event stream must end for good (a callback failed); carries the reason."""


class Engine:
    def __init__(self, daemon, model: str, hf_config, *, architecture: "str | None" = None, tp_rank: int = 0,
                 tp_size: int = 1, replica_id: int = 0, dtype=torch.bfloat16, options: "dict | None" = None,
                 label: "str | None" = None, shm_mode: int = 0o600, segment_bytes: int = 256 << 20,
                 tls_ca=None, tls_cert=None, tls_key=None, token: "str | None" = None, token_file=None,
                 reconnect: bool = True, register_timeout: float = 60.0, ack_timeout: float = 60.0,
                 backoff: "tuple[float, float]" = (0.1, 5.0)):
        # daemon: address or Daemon; tls_*/token/token_file: connection options (see weightsync.Daemon).
        # reconnect: re-register after the stream breaks; register_timeout: deadline of each registration;
        # ack_timeout: deadline of each AckVersion; backoff: (first, longest) delay between reconnect attempts.
        self.daemon = as_daemon(daemon, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key, token=token,
                                token_file=token_file)
        self.model = model
        self.config_json = _config_json(hf_config)
        if architecture is None:
            archs = json.loads(self.config_json).get("architectures") or []
            if not archs:
                raise WeightSyncError("the HF config has no 'architectures'; pass architecture=")
            architecture = archs[0]
        self.architecture = architecture
        self.tp_rank, self.tp_size, self.replica_id = tp_rank, tp_size, replica_id
        self.dtype = parse_dtype(dtype)
        self.options = dict(options or {})
        self.label = label or f"{socket.gethostname()}:{os.getpid()}"
        if register_timeout <= 0 or ack_timeout <= 0 or not 0 < backoff[0] <= backoff[1]:
            raise WeightSyncError("Engine: register_timeout and ack_timeout must be positive and "
                                  "backoff = (first, longest) with 0 < first <= longest")
        self.reconnect, self.register_timeout, self.ack_timeout = reconnect, register_timeout, ack_timeout
        self.backoff = (float(backoff[0]), float(backoff[1]))
        self.arena = ShmArena(segment_bytes, prefix=f"ws-engine-{replica_id}-{tp_rank}", mode=shm_mode)
        self.tensors: dict = {}
        self._mappings: dict = {}
        self._on_commit: list = []
        self._on_abort: list = []
        self._on_pause: list = []
        self._on_resume: list = []
        self._staged: set = set()
        self._paused_for: "int | None" = None  # version the engine paused for (event thread only)
        self.engine_id: "str | None" = None
        self._cv = threading.Condition()
        self._applied = 0
        self._aborted: dict = {}
        self._failed: dict = {}
        self._error: "str | None" = None
        self._closed = False
        self._started = False
        self._call = None
        self._req: "pb.RegisterEngineRequest | None" = None
        self._thread: "threading.Thread | None" = None
        # operator-visible state (read with state())
        self._connected = False
        self._reconnects = 0
        self._attempts = 0
        self._version_resets = 0
        self._last_error: "str | None" = None

    def _where(self) -> str:
        return f"engine {self.model} replica {self.replica_id} tp {self.tp_rank}/{self.tp_size}"

    # ---- before start ----

    def empty(self, name: str, shape, dtype=None, mapping_json: str = "", staged: bool = False) -> torch.Tensor:
        """Allocates a zeroed buffer in host shared memory and registers it under `name`."""
        t = self.arena.empty(shape, parse_dtype(dtype) or self.dtype)
        t.zero_()
        self.register(name, t, mapping_json, staged=staged)
        return t

    def register(self, name: str, tensor: torch.Tensor, mapping_json: str = "", staged: bool = False) -> None:
        """Registers an existing buffer: a CUDA tensor, or a CPU tensor in a named /dev/shm object.

        staged: a staging buffer that on_commit applies to the live weights; the daemon writes it
        without waiting for the engine to pause.
        """
        if self._started:
            raise WeightSyncError(f"parameter {name}: register() after start()")
        if name in self.tensors:
            raise WeightSyncError(f"parameter {name} is registered twice")
        if not tensor.is_contiguous():
            raise WeightSyncError(f"parameter {name}: the buffer must be contiguous")
        to_wire(tensor.dtype, f"parameter {name}")
        self.tensors[name] = tensor
        self._mappings[name] = mapping_json
        if staged:
            self._staged.add(name)

    def on_commit(self, fn: Callable[[int], None]) -> None:
        self._on_commit.append(fn)

    def on_pause(self, fn: Callable[[int], "bool | None"]) -> None:
        """fn(version) returns once nothing reads the in-place weights (until on_resume).

        Returning False means it could not pause: no AckPaused is sent (the daemon's in-place
        writes keep waiting, up to its timeout) and on_resume is not called for this version.
        """
        self._on_pause.append(fn)

    def on_resume(self, fn: Callable[[int], None]) -> None:
        self._on_resume.append(fn)

    @property
    def needs_pause(self) -> bool:
        """Whether any buffer is written in place (not staged)."""
        return any(n not in self._staged for n in self.tensors)

    def on_abort(self, fn: Callable[[int, str], None]) -> None:
        self._on_abort.append(fn)

    def _request(self) -> pb.RegisterEngineRequest:
        index = ShmIndex()
        req = pb.RegisterEngineRequest(
            model=self.model, architecture=self.architecture, hf_config_json=self.config_json,
            replica_id=self.replica_id, tp_rank=self.tp_rank, tp_size=self.tp_size,
            dtype=to_wire(self.dtype, "engine dtype"), options={k: int(v) for k, v in self.options.items()},
            engine_label=self.label, acks_pause=True)
        for name, t in self.tensors.items():
            nbytes = t.numel() * t.element_size()
            what = f"parameter {name}"
            if t.device.type == "cpu":
                loc = index.locate_tensor(t)
                if loc is None:
                    raise WeightSyncError(
                        f"{what}: the CPU buffer is not in a named shared-memory object; allocate it with "
                        "Engine.empty() or weightsync.shm_empty()")
                mem = pb.MemoryRef(host_shm=pb.HostShmRef(name=loc.name, offset=loc.offset, length=nbytes))
            elif t.device.type == "cuda":
                ipc = export_tensor(t, what)
                mem = pb.MemoryRef(cuda_ipc=pb.CudaIpcRef(handle=ipc.handle, device_uuid=ipc.device_uuid,
                                                          offset=ipc.offset, length=ipc.length))
            else:
                raise WeightSyncError(f"{what}: buffers on {t.device} cannot be registered")
            req.params.append(pb.EngineParam(name=name, shape=list(t.shape), dtype=to_wire(t.dtype, what),
                                             memory=mem, mapping_json=self._mappings[name],
                                             staged=name in self._staged))
        return req

    # ---- lifecycle ----

    def start(self, timeout: "float | None" = None) -> str:
        """Registers every buffer; returns the engine id once the daemon accepted them.

        timeout: deadline of this first registration (default: register_timeout). A refusal or a
        missed deadline raises; reconnecting applies only once a registration succeeded.
        """
        if self._started:
            raise WeightSyncError("Engine.start() called twice")
        timeout = self.register_timeout if timeout is None else timeout
        req = self._request()
        self._req = req  # re-registrations send the same buffers
        self._started = True
        registered = threading.Event()
        with self._cv:
            self._call = self.daemon.stub.RegisterEngine(req)
        self._thread = threading.Thread(target=self._run, args=(self._call, registered, timeout), daemon=True,
                                        name=f"weightsync-engine-{self.replica_id}-{self.tp_rank}")
        self._thread.start()
        if not registered.wait(timeout):
            with self._cv:
                self._closed = True
                self._error = (f"the daemon at {self.daemon.address} did not answer the registration "
                               f"within {timeout} s")
                self._cv.notify_all()
            self._call.cancel()
            raise WeightSyncError(self._error)
        with self._cv:
            if self.engine_id is None or self._closed:
                raise WeightSyncError(self._error or "registration failed")
            return self.engine_id

    def _run(self, call, registered: threading.Event, first_timeout: float) -> None:
        """The event thread: consumes the stream; after a break, re-registers with backoff."""
        ever_registered = False
        delay = self.backoff[0]
        while True:
            got_id, code, end, fatal = self._consume(
                call, registered, self.register_timeout if ever_registered else first_timeout)
            self._resume(None)  # a broken stream: the daemon stopped writing
            ever_registered = ever_registered or got_id
            if fatal:  # a callback failed: the daemon must drop this engine now, not at its next Commit
                call.cancel()
                self._unregister(got_id)
            with self._cv:
                self._connected = False
                # a clean end (OK) is an explicit UnregisterEngine: the operator's decision, not a failure
                retry = (ever_registered and self.reconnect and not self._closed and not fatal
                         and code not in (None, grpc.StatusCode.OK) and code not in _PERMANENT)
                if not retry:
                    if not self._closed:  # else close() or start()'s deadline ended it
                        self._error = self._last_error = end
                    self._closed = True
                    self._cv.notify_all()
                    break
                self._last_error = end
                if got_id:
                    delay = self.backoff[0]
            registered.set()
            if got_id:
                log.warning("%s; re-registering with backoff", end)
            else:
                log.info("re-registration attempt failed: %s", end)
            call = self._reregister(delay)
            if call is None:
                break
            delay = min(delay * 2, self.backoff[1])
        registered.set()

    def _reregister(self, delay: float):
        """Waits `delay` (interrupted by close), then opens a new registration stream; None once closed."""
        with self._cv:
            if self._cv.wait_for(lambda: self._closed, delay * random.uniform(0.5, 1.0)):
                return None
            self._attempts += 1
            call = self.daemon.stub.RegisterEngine(self._req)
            self._call = call
        return call

    def _consume(self, call, registered: threading.Event, timeout: float):
        """Reads one stream to its end: (registered?, status code or None, reason, fatal?)."""
        where = self._where()
        got_id = False
        expired = threading.Event()

        def expire():
            expired.set()
            call.cancel()
        deadline = threading.Timer(timeout, expire)  # the registration's deadline
        deadline.daemon = True
        deadline.start()
        try:
            for ev in call:
                kind = ev.WhichOneof("event")
                if kind == "registered":
                    deadline.cancel()
                    got_id = True
                    with self._cv:
                        reconnect = self.engine_id is not None
                        self.engine_id = ev.registered.engine_id
                        self._connected = True
                        if reconnect:
                            self._reconnects += 1
                    if reconnect:
                        log.warning("%s: re-registered as %s (reconnect %d)", where, self.engine_id,
                                    self._reconnects)
                    registered.set()
                elif kind == "started":
                    self._pause(ev.started.sync_id, ev.started.version)
                elif kind == "committed":
                    self._apply(ev.committed.version)
                    self._resume(ev.committed.version)
                elif kind == "aborted":
                    self._resume(ev.aborted.version)
                    with self._cv:
                        self._aborted[ev.aborted.version] = ev.aborted.reason
                        _trim(self._aborted)
                        self._cv.notify_all()
                    for fn in self._on_abort:
                        try:
                            fn(ev.aborted.version, ev.aborted.reason)
                        except Exception as e:
                            raise _Stop(f"{where}: on_abort callback for version {ev.aborted.version} "
                                        f"failed ({type(e).__name__}: {e}); the engine unregistered") from e
            return got_id, grpc.StatusCode.OK, (f"{where}: the daemon closed the event stream (the engine was "
                                                f"unregistered)"), False
        except grpc.RpcError as e:
            code = e.code() if callable(getattr(e, "code", None)) else grpc.StatusCode.UNKNOWN
            if expired.is_set() and not got_id:
                return got_id, code, (f"{where}: the daemon at {self.daemon.address} did not answer the "
                                      f"registration within {timeout} s"), False
            return got_id, code, str(rpc_error(e, f"{where}: RegisterEngine")), False
        except _Stop as e:
            return got_id, None, str(e), True
        except Exception as e:  # a bug in the event handling: end loudly rather than hang waiters
            log.exception("%s: event thread failed", where)
            return got_id, None, f"{where}: event thread failed: {type(e).__name__}: {e}", True
        finally:
            deadline.cancel()

    def _pause(self, sync_id: int, version: int) -> None:
        if not self.needs_pause:
            return  # staged only: written while the engine serves, applied at commit
        where = self._where()
        if self._paused_for is None:
            for i, fn in enumerate(self._on_pause):
                try:
                    ok = fn(version)
                except Exception as e:
                    ok, err = False, e
                else:
                    err = None
                if ok is False or err is not None:
                    if i > 0:  # earlier callbacks paused: resume them
                        self._paused_for = version
                        self._resume(version)
                    if err is not None:
                        raise _Stop(f"{where}: on_pause callback for version {version} failed "
                                    f"({type(err).__name__}: {err}); the engine unregistered") from err
                    log.warning("%s: could not pause for version %d; not acknowledging it", where, version)
                    return
            self._paused_for = version
        try:
            self.daemon.stub.AckPaused(pb.AckPausedRequest(engine_id=self.engine_id, sync_id=sync_id),
                                       timeout=self.ack_timeout)
        except grpc.RpcError as e:  # the daemon aborts the sync without it (its progress timeout)
            msg = str(rpc_error(e, f"AckPaused sync {sync_id}"))
            log.warning("%s: %s", where, msg)
            with self._cv:
                self._last_error = msg

    def _resume(self, version: "int | None") -> None:
        if self._paused_for is None:
            return
        paused_for, self._paused_for = self._paused_for, None
        for fn in self._on_resume:
            try:
                fn(paused_for if version is None else version)
            except Exception:  # never leave the engine paused over a callback's error
                log.exception("%s: on_resume callback failed", self._where())

    def _unregister(self, registered: bool) -> None:
        if registered and self.engine_id is not None:
            try:
                self.daemon.stub.UnregisterEngine(pb.UnregisterEngineRequest(engine_id=self.engine_id), timeout=10)
            except grpc.RpcError as e:  # the cancelled stream unregisters it as well
                log.warning("%s: %s", self._where(), rpc_error(e, "UnregisterEngine"))

    def _apply(self, version: int) -> None:
        error = ""
        for fn in self._on_commit:
            try:
                fn(version)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                break
        # The engine's own state first: once the daemon has every ack, the
        # trainer's push returns, and whoever it tells must see this version
        # applied here (the bytes are in place and the callbacks ran).
        self._record_outcome(version, error)
        try:
            self.daemon.stub.AckVersion(pb.AckVersionRequest(engine_id=self.engine_id, version=version,
                                                             ok=not error, error=error), timeout=self.ack_timeout)
        except grpc.RpcError as e:
            # The daemon aborts the version without this ack (its ack deadline);
            # the engine holds its bytes all the same.
            msg = str(rpc_error(e, f"AckVersion {version}"))
            log.warning("%s: %s", self._where(), msg)
            with self._cv:
                self._last_error = msg

    def _record_outcome(self, version: int, error: str) -> None:
        with self._cv:
            if error:
                self._failed[version] = error
                _trim(self._failed)
            else:
                if version < self._applied:  # a restarted counter: visible, never hidden by max()
                    self._version_resets += 1
                    log.warning("%s: committed version %d is not above the last applied version %d "
                                "(the trainer's or daemon's version counter restarted); waits count from %d",
                                self._where(), version, self._applied, version)
                    for outcomes in (self._aborted, self._failed):
                        for v in [v for v in outcomes if v > version]:
                            del outcomes[v]
                self._applied = version
            self._cv.notify_all()

    @property
    def applied_version(self) -> int:
        """The last version applied (0 before the first)."""
        with self._cv:
            return self._applied

    @property
    def connected(self) -> bool:
        with self._cv:
            return self._connected

    @property
    def reconnects(self) -> int:
        """Successful re-registrations after the stream broke."""
        with self._cv:
            return self._reconnects

    @property
    def version_resets(self) -> int:
        """Committed versions that were not above the last applied one."""
        with self._cv:
            return self._version_resets

    @property
    def last_error(self) -> "str | None":
        """Why the event stream last ended (kept after a successful reconnect)."""
        with self._cv:
            return self._last_error

    def state(self) -> dict:
        """For operators: registration, reconnect and version counters."""
        with self._cv:
            return {"engine_id": self.engine_id, "connected": self._connected, "closed": self._closed,
                    "reconnects": self._reconnects, "reconnect_attempts": self._attempts,
                    "applied_version": self._applied, "version_resets": self._version_resets,
                    "last_error": self._last_error, "error": self._error}

    def wait_for_version(self, version: int, timeout: "float | None" = DEFAULT_WAIT_TIMEOUT) -> None:
        """Blocks until `version` (or a later one) is applied; raises if it was aborted or failed.

        timeout: seconds; None means DEFAULT_WAIT_TIMEOUT (300 s): no wait is unbounded. A wait
        survives reconnects; "later" counts from the last version reset (see version_resets).
        """
        if timeout is None:
            timeout = DEFAULT_WAIT_TIMEOUT
        with self._cv:
            ok = self._cv.wait_for(
                lambda: self._applied >= version or version in self._aborted or version in self._failed
                or self._closed, timeout)
            if self._applied >= version:
                return
            if version in self._aborted:
                raise WeightSyncError(f"version {version} was aborted: {self._aborted[version]}")
            if version in self._failed:
                raise WeightSyncError(f"version {version} could not be applied: {self._failed[version]}")
            if self._closed:
                raise WeightSyncError(self._error or "the engine was closed")
            if not ok:
                raise WeightSyncError(f"{self._where()}: version {version} not applied within {timeout} s "
                                      f"(applied: {self._applied}, connected: {self._connected}, "
                                      f"reconnects: {self._reconnects})")

    def close(self) -> None:
        with self._cv:
            already = self._closed
            self._closed = True
            call = self._call
            self._cv.notify_all()
        if self.engine_id is not None and not already:
            try:
                self.daemon.stub.UnregisterEngine(pb.UnregisterEngineRequest(engine_id=self.engine_id), timeout=10)
            except grpc.RpcError:
                pass
        if call is not None:
            call.cancel()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.arena.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _trim(outcomes: dict) -> None:
    while len(outcomes) > _KEEP_OUTCOMES:
        del outcomes[next(iter(outcomes))]
