"""Engine side: register parameter buffers with the daemon and apply committed versions.

    eng = weightsync.Engine("unix:/run/weightsync.sock", model="policy", hf_config=config,
                            tp_rank=0, tp_size=2)
    w = eng.empty("model.layers.0.self_attn.qkv_proj.weight", (640, 1024), torch.bfloat16)
    eng.on_commit(lambda version: ...)      # post-load steps, before the ack
    eng.start()
    eng.wait_for_version(3)

The daemon writes straight into the registered buffers while a sync streams;
`committed` means every byte of that version is in place. The engine then
runs its on_commit callbacks and acknowledges (AckVersion ok, or the
callback's error). `aborted` means the version will not be committed: buffers
may hold a mix of versions until the next committed one.

Thread-safety: register()/empty()/on_commit() before start(); after that,
wait_for_version/applied_version/close may be called from any thread.
Callbacks run on the engine's event thread, one at a time.
"""
from __future__ import annotations

import json
import os
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


class Engine:
    def __init__(self, daemon, model: str, hf_config, *, architecture: "str | None" = None, tp_rank: int = 0,
                 tp_size: int = 1, replica_id: int = 0, dtype=torch.bfloat16, options: "dict | None" = None,
                 label: "str | None" = None, shm_mode: int = 0o600, segment_bytes: int = 256 << 20,
                 tls_ca=None, tls_cert=None, tls_key=None, token: "str | None" = None, token_file=None):
        # daemon: address or Daemon; tls_*/token/token_file: connection options (see weightsync.Daemon)
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
        self.arena = ShmArena(segment_bytes, prefix=f"ws-engine-{replica_id}-{tp_rank}", mode=shm_mode)
        self.tensors: dict = {}
        self._mappings: dict = {}
        self._on_commit: list = []
        self._on_abort: list = []
        self.engine_id: "str | None" = None
        self._cv = threading.Condition()
        self._applied = 0
        self._aborted: dict = {}
        self._failed: dict = {}
        self._error: "str | None" = None
        self._closed = False
        self._call = None
        self._thread: "threading.Thread | None" = None

    # ---- before start ----

    def empty(self, name: str, shape, dtype=None, mapping_json: str = "") -> torch.Tensor:
        """Allocates a zeroed buffer in host shared memory and registers it under `name`."""
        t = self.arena.empty(shape, parse_dtype(dtype) or self.dtype)
        t.zero_()
        self.register(name, t, mapping_json)
        return t

    def register(self, name: str, tensor: torch.Tensor, mapping_json: str = "") -> None:
        """Registers an existing buffer: a CUDA tensor, or a CPU tensor in a named /dev/shm object."""
        if self._call is not None:
            raise WeightSyncError(f"parameter {name}: register() after start()")
        if name in self.tensors:
            raise WeightSyncError(f"parameter {name} is registered twice")
        if not tensor.is_contiguous():
            raise WeightSyncError(f"parameter {name}: the buffer must be contiguous")
        to_wire(tensor.dtype, f"parameter {name}")
        self.tensors[name] = tensor
        self._mappings[name] = mapping_json

    def on_commit(self, fn: Callable[[int], None]) -> None:
        self._on_commit.append(fn)

    def on_abort(self, fn: Callable[[int, str], None]) -> None:
        self._on_abort.append(fn)

    def _request(self) -> pb.RegisterEngineRequest:
        index = ShmIndex()
        req = pb.RegisterEngineRequest(
            model=self.model, architecture=self.architecture, hf_config_json=self.config_json,
            replica_id=self.replica_id, tp_rank=self.tp_rank, tp_size=self.tp_size,
            dtype=to_wire(self.dtype, "engine dtype"), options={k: int(v) for k, v in self.options.items()},
            engine_label=self.label)
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
                                             memory=mem, mapping_json=self._mappings[name]))
        return req

    # ---- lifecycle ----

    def start(self, timeout: float = 60.0) -> str:
        """Registers every buffer; returns the engine id once the daemon accepted them."""
        if self._call is not None:
            raise WeightSyncError("Engine.start() called twice")
        req = self._request()
        self._call = self.daemon.stub.RegisterEngine(req)
        registered = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(registered,), daemon=True,
                                        name=f"weightsync-engine-{self.replica_id}-{self.tp_rank}")
        self._thread.start()
        if not registered.wait(timeout):
            self._call.cancel()
            raise WeightSyncError(f"the daemon at {self.daemon.address} did not answer the registration "
                                  f"within {timeout} s")
        with self._cv:
            if self.engine_id is None:
                raise WeightSyncError(self._error or "registration failed")
        return self.engine_id

    def _run(self, registered: threading.Event) -> None:
        where = f"engine {self.model} replica {self.replica_id} tp {self.tp_rank}/{self.tp_size}"
        try:
            for ev in self._call:
                kind = ev.WhichOneof("event")
                if kind == "registered":
                    with self._cv:
                        self.engine_id = ev.registered.engine_id
                    registered.set()
                elif kind == "committed":
                    self._apply(ev.committed.version)
                elif kind == "aborted":
                    with self._cv:
                        self._aborted[ev.aborted.version] = ev.aborted.reason
                        self._cv.notify_all()
                    for fn in self._on_abort:
                        fn(ev.aborted.version, ev.aborted.reason)
            end = f"{where}: the daemon closed the event stream"
        except grpc.RpcError as e:
            end = str(rpc_error(e, f"{where}: RegisterEngine"))
        except Exception as e:  # a callback failed outside an ack (on_abort)
            end = f"{where}: {e}"
        with self._cv:
            if not self._closed:
                self._error = end
            self._closed = True
            self._cv.notify_all()
        registered.set()

    def _apply(self, version: int) -> None:
        error = ""
        for fn in self._on_commit:
            try:
                fn(version)
            except Exception as e:
                error = f"{type(e).__name__}: {e}"
                break
        try:
            self.daemon.stub.AckVersion(pb.AckVersionRequest(engine_id=self.engine_id, version=version,
                                                             ok=not error, error=error), timeout=60)
        except grpc.RpcError as e:
            error = error or str(rpc_error(e, f"AckVersion {version}"))
        with self._cv:
            if error:
                self._failed[version] = error
            else:
                self._applied = max(self._applied, version)
            self._cv.notify_all()

    @property
    def applied_version(self) -> int:
        with self._cv:
            return self._applied

    def wait_for_version(self, version: int, timeout: "float | None" = None) -> None:
        """Blocks until `version` (or a later one) is applied; raises if it was aborted or failed."""
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
                raise WeightSyncError(f"version {version} not applied within {timeout} s "
                                      f"(applied: {self._applied})")

    def close(self) -> None:
        with self._cv:
            already = self._closed
            self._closed = True
        if self.engine_id is not None and not already:
            try:
                self.daemon.stub.UnregisterEngine(pb.UnregisterEngineRequest(engine_id=self.engine_id), timeout=10)
            except grpc.RpcError:
                pass
        if self._call is not None:
            self._call.cancel()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.arena.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
