"""The `weightsync` weight-transfer backend of vLLM, worker side.

Selected with `--weight-transfer-config '{"backend": "weightsync"}'` or
`LLM(weight_transfer_config={"backend": "weightsync"})` (the entry point in weightsync.vllm_plugin
registers it); the trainer side is weightsync.vllm_trainer. Written against vLLM's
`vllm/distributed/weight_transfer/base.py` as of vllm 0.32 (explicit start/finish, `model` in the
constructor; vLLM >= ~0.22). Older vLLMs: weightsync.vllm.WorkerExtension.

Per worker, vLLM calls (offline `LLM` methods and the HTTP routes alike):
- init_transfer_engine(init_info): registers this worker's parameters with the local weightsyncd
  (weightsync.vllm.WorkerSync: in place, or staged where vLLM's post-load step repacked them).
  init_info: {"daemon": address (default $WEIGHTSYNC_DAEMON), "model": name the trainer pushes to
  (default: the served model name), optional "staging", "stage", "in_place", "exclude",
  "options", "replica_id", "timeout", "apply_timeout", "tls_ca", "tls_cert", "tls_key",
  "token_file"}.
- start_weight_update(): opens an update.
- update_weights({"version": V}): parks this worker (its thread stays inside the call, so vLLM
  runs no model step on it) until the daemon commits V, applies V on this thread (staged copies,
  then vLLM's post-load step) and returns once applied; raises if V is aborted. The daemon's
  in-place writes into this worker wait until it is parked (the pause barrier: it acknowledges
  `started` only then); staged writes go on while it generates.
- finish_weight_update(): checks the version named by update_weights was applied.
- abort_weight_update(): forgets the open update; a version that never committed never reached
  the live weights of staged parameters (in-place ones hold a mix until the next commit).
- shutdown(): unregisters from the daemon.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from typing import Any

from vllm.distributed.weight_transfer.base import (WeightTransferEngine, WeightTransferInitInfo,
                                                   WeightTransferUpdateInfo)

from .errors import WeightSyncError
from .vllm import WorkerSync, _tp

log = logging.getLogger("weightsync.vllm_backend")


@dataclasses.dataclass
class WeightsyncInitInfo(WeightTransferInitInfo):
    daemon: str = ""
    model: str = ""
    replica_id: "int | None" = None
    staging: str = "auto"
    stage: list = dataclasses.field(default_factory=list)
    in_place: list = dataclasses.field(default_factory=list)
    exclude: list = dataclasses.field(default_factory=list)
    options: dict = dataclasses.field(default_factory=dict)
    timeout: float = 60.0         # the registration's deadline
    apply_timeout: float = 300.0  # update_weights' wait for the version
    tls_ca: "str | None" = None
    tls_cert: "str | None" = None
    tls_key: "str | None" = None
    token_file: "str | None" = None


@dataclasses.dataclass
class WeightsyncUpdateInfo(WeightTransferUpdateInfo):
    version: int = 0
    timeout: "float | None" = None  # default: init_info.apply_timeout
    # An engine that writes in place hears `started` while parked here; if no sync of this
    # version (or a later one) starts within this long, the trainer failed before it began.
    start_timeout: float = 120.0


class WeightsyncWeightTransferEngine(WeightTransferEngine[WeightsyncInitInfo, WeightsyncUpdateInfo]):
    init_info_cls = WeightsyncInitInfo
    update_info_cls = WeightsyncUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._sync: "WorkerSync | None" = None
        self._apply_timeout = 300.0
        self._cv = threading.Condition()
        self._parked = False     # a thread is inside update_weights, applying what commits
        self._jobs = collections.deque()  # committed versions for the parked thread to apply
        self._done: dict = {}    # version -> error ("" when applied), from the parked thread
        self._aborted: dict = {}  # version -> reason
        self._started = 0        # the latest version whose sync started (engines that write in place)
        self._target: "int | None" = None  # the version update_weights named in the open update
        self.last_parked_seconds = 0.0  # how long the last update_weights held this worker (generation blocked)

    # ---- vLLM's lifecycle ----

    def init_transfer_engine(self, init_info: WeightsyncInitInfo) -> None:
        if self._sync is not None:
            raise WeightSyncError("weightsync: init_transfer_engine called twice on this worker")
        daemon = init_info.daemon or os.environ.get("WEIGHTSYNC_DAEMON", "")
        if not daemon:
            raise WeightSyncError("weightsync: no daemon address (init_info 'daemon' or $WEIGHTSYNC_DAEMON)")
        model = init_info.model or getattr(self.model_config, "served_model_name", None) or ""
        if isinstance(model, (list, tuple)):
            model = model[0] if model else ""
        if not model:
            raise WeightSyncError("weightsync: no model name (init_info 'model')")
        worker = _WorkerView(self.parallel_config)
        tp_rank, tp_size = _tp(worker)
        sync = WorkerSync(self.model, self.model_config, self.parallel_config, self.device, self.vllm_config,
                          tp_rank, tp_size, daemon, model, init_info.replica_id, init_info.options,
                          tuple(init_info.exclude), init_info.staging, tuple(init_info.stage),
                          tuple(init_info.in_place), tls_ca=init_info.tls_ca, tls_cert=init_info.tls_cert,
                          tls_key=init_info.tls_key, token_file=init_info.token_file)
        self._apply_timeout = float(init_info.apply_timeout)
        eng = sync.engine
        eng.on_pause(self._wait_parked)
        eng.on_commit(self._hand_over)
        eng.on_abort(self._note_abort)
        try:
            eng.start(init_info.timeout)
        except BaseException:
            sync.close()
            raise
        self._sync = sync
        log.info("weightsync: %s registered %d parameters (%d staged, %d bytes of staging) for model %s",
                 eng.engine_id, len(eng.tensors), len(sync.staged), sync.staging_bytes, model)

    def start_weight_update(self) -> None:
        self._engine()
        with self._cv:
            # Outcomes heard before this update belong to earlier attempts (a version number
            # may be retried after an abort).
            self._target, self._started = None, 0
            self._aborted.clear()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # Not the base class's: it ends with torch.accelerator.synchronize(), and the apply
        # synchronizes this worker's device itself.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: WeightsyncUpdateInfo) -> None:
        eng = self._engine()
        v = int(update_info.version)
        if v <= 0:
            raise WeightSyncError(f"weightsync: update_weights needs a version >= 1, got {update_info.version!r}")
        timeout = self._apply_timeout if update_info.timeout is None else float(update_info.timeout)
        start_deadline = time.monotonic() + float(update_info.start_timeout)
        with self._cv:
            self._target = v
        if eng.applied_version >= v:
            return
        parked_at = time.monotonic()
        self._sync.synchronize()  # nothing queued on the device reads the weights while parked
        deadline = time.monotonic() + timeout
        with self._cv:
            self._parked = True
            self._cv.notify_all()
            try:
                while True:
                    while self._jobs:
                        job = self._jobs.popleft()
                        self._cv.release()
                        try:
                            self._sync.apply(job)
                            err = ""
                        except Exception as e:
                            err = f"{type(e).__name__}: {e}"
                        finally:
                            self._cv.acquire()
                        self._done[job] = err
                        self._cv.notify_all()
                        if err:
                            raise WeightSyncError(f"weightsync: applying version {job} failed: {err}")
                        if job >= v:
                            return
                    if v in self._aborted:
                        raise WeightSyncError(f"weightsync: version {v} was aborted: {self._aborted[v]}")
                    if eng.state()["closed"]:
                        raise WeightSyncError(f"weightsync: the engine closed while waiting for version {v}: "
                                              f"{eng.last_error}")
                    if (eng.needs_pause and self._started < v and time.monotonic() > start_deadline):
                        raise WeightSyncError(f"weightsync: no sync of version {v} started within "
                                              f"{update_info.start_timeout} s of update_weights")
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise WeightSyncError(f"weightsync: version {v} was not committed within {timeout} s "
                                              f"(applied: {eng.applied_version})")
                    self._cv.wait(min(left, 1.0))
            finally:
                self._parked = False
                self.last_parked_seconds = time.monotonic() - parked_at

    def finish_weight_update(self) -> None:
        eng = self._engine()
        with self._cv:
            target, self._target = self._target, None
        if target is not None and eng.applied_version < target:
            raise WeightSyncError(f"weightsync: finish_weight_update: version {target} is not applied on this "
                                  f"worker (applied: {eng.applied_version})")

    def abort_weight_update(self) -> None:
        with self._cv:
            self._target = None

    def shutdown(self) -> None:
        sync, self._sync = self._sync, None
        if sync is not None:
            sync.close()
        with self._cv:
            self._cv.notify_all()

    # ---- the engine's event thread ----

    def _wait_parked(self, version: int) -> bool:
        """on_pause: paused once update_weights holds this worker's thread (no model step runs)."""
        with self._cv:
            self._started = max(self._started, version)
            if self._cv.wait_for(lambda: self._parked, self._apply_timeout):
                return True
        log.warning("weightsync: version %d started but no update_weights is running on this worker within %.0f s; "
                    "in-place writes wait for it (call update_weights while the trainer pushes)",
                    version, self._apply_timeout)
        return False

    def _hand_over(self, version: int) -> None:
        """on_commit: the parked thread applies the version; the ack follows its outcome."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._parked, self._apply_timeout):
                raise WeightSyncError(f"version {version} committed but no update_weights ran on this worker "
                                      f"within {self._apply_timeout} s (the backend applies versions there)")
            self._jobs.append(version)
            self._cv.notify_all()
            self._cv.wait_for(lambda: version in self._done or (not self._parked and version in self._jobs))
            if version not in self._done:  # update_weights gave up before taking it
                self._jobs.remove(version)
                raise WeightSyncError(f"version {version} committed but update_weights on this worker stopped "
                                      "waiting before applying it")
            err = self._done.pop(version)
        if err:
            raise WeightSyncError(err)

    def _note_abort(self, version: int, reason: str) -> None:
        with self._cv:
            self._aborted[version] = reason
            while len(self._aborted) > 64:
                del self._aborted[next(iter(self._aborted))]
            self._cv.notify_all()

    # ---- helpers ----

    def _engine(self):
        if self._sync is None:
            raise WeightSyncError("weightsync: init_weight_transfer_engine has not run on this worker")
        return self._sync.engine

    def status(self) -> dict:
        """WorkerSync.status() plus last_parked_seconds."""
        if self._sync is None:
            return {}
        return {**self._sync.status(), "last_parked_seconds": self.last_parked_seconds}


class _WorkerView:
    """What _tp() reads when vLLM's TP groups are not reachable."""

    def __init__(self, pc):
        self.parallel_config = pc
        self.rank = int(getattr(pc, "rank", 0) or 0)
