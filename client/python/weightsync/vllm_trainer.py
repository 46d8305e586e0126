"""The `weightsync` weight-transfer backend of vLLM, trainer side.

    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
    from weightsync.vllm_trainer import HTTPClient, WeightsyncTrainerInitInfo

    engine = WeightTransferTrainerFactory.trainer_init(       # on every trainer rank
        WeightsyncTrainerInitInfo(daemon="unix:/run/weightsync.sock", model="policy", rank=rank),
        client=HTTPClient("http://vllm:8000"), source=fsdp_model)
    engine.send_weights()                                      # every rank, once per sync

send_weights() pushes each rank's FSDP shards through weightsyncd (weightsync.Trainer.push: no
full_tensor(), every rank sends what it holds) and drives vLLM's update round trip from rank 0
(the sender): start_weight_update, update_weights({"version": V}) while the push runs (the
workers apply V inside it), finish_weight_update(weight_version="V"). When some engine of the
model writes parameters in place, rank 0 first pauses vLLM (the client's pause_generation,
mode "keep": requests stay queued) and update_weights is issued before the first byte; when
every parameter is staged, vLLM keeps generating while the bytes stream and update_weights is
issued right before the commit (the workers pause only for the apply).

source: the FSDP-wrapped module (or a vLLM ModuleSource of it). Versions: send_weights(version)
or, by default, one above the model's committed version at the daemon.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any, ClassVar

from vllm.distributed.weight_transfer.base import TrainerInitInfo, TrainerWeightTransferEngine
from vllm.distributed.weight_transfer.clients import HTTPVLLMWeightSyncClient

from ._proto import weightsync_pb2 as pb
from .errors import WeightSyncError
from .trainer import Trainer

log = logging.getLogger("weightsync.vllm_trainer")


@dataclasses.dataclass
class WeightsyncTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "weightsync"

    daemon: str = ""
    model: str = ""
    world_size: "int | None" = None
    # Sent to every worker's init_transfer_engine besides daemon and model (staging, stage, ...);
    # None: the sender does not call init_weight_transfer_engine (it was called already).
    worker_init: "dict | None" = dataclasses.field(default_factory=dict)
    worker_daemon: "str | None" = None  # the daemon address as the workers reach it (default: daemon)
    pause: str = "auto"  # "auto": pause vLLM when an engine writes in place; "always"; "never"
    trainer_kwargs: dict = dataclasses.field(default_factory=dict)  # weightsync.Trainer options
    update_timeout: float = 600.0


class HTTPClient(HTTPVLLMWeightSyncClient):
    """vLLM's HTTP client plus /pause?mode=keep and /resume (vllm serve with VLLM_SERVER_DEV_MODE=1)."""

    def pause_generation(self, mode: str = "keep") -> None:
        import requests
        r = requests.post(f"{self.base_url}/pause", params={"mode": mode}, timeout=self.timeout)
        r.raise_for_status()

    def resume_generation(self) -> None:
        self._post("resume")


class WeightsyncTrainerWeightTransferEngine(TrainerWeightTransferEngine[WeightsyncTrainerInitInfo]):
    init_info_cls = WeightsyncTrainerInitInfo

    def __init__(self, *, client, source=None, is_sender: bool = True, info: WeightsyncTrainerInitInfo):
        super().__init__(client=client, source=source, is_sender=is_sender)
        if info.pause not in ("auto", "always", "never"):
            raise WeightSyncError(f"pause={info.pause!r}: expected 'auto', 'always' or 'never'")
        self.info = info
        self.module = _module_of(source)
        self.trainer = Trainer(info.daemon, info.model, rank=info.rank, world_size=info.world_size,
                               **info.trainer_kwargs)
        self.last_result = None

    @classmethod
    def trainer_init(cls, init_info: WeightsyncTrainerInitInfo, *, client, source=None):
        if not init_info.daemon or not init_info.model:
            raise WeightSyncError("WeightsyncTrainerInitInfo needs daemon and model")
        eng = cls(client=client, source=source, is_sender=init_info.is_sender, info=init_info)
        if eng.is_sender and init_info.worker_init is not None:
            client.init_weight_transfer_engine({**init_info.worker_init,
                                                "daemon": init_info.worker_daemon or init_info.daemon,
                                                "model": init_info.model})
        return eng

    def send_weights(self, version: "int | None" = None) -> None:
        tr = self.trainer
        plan = None
        if self.is_sender:
            try:
                in_place = self._engines_write_in_place()
                v = version if version is not None else self._committed() + 1
                plan = (v, in_place, None)
            except Exception as e:
                plan = (0, False, f"rank 0: {type(e).__name__}: {e}")
        v, in_place, err = tr.comm.broadcast(plan)
        if err:
            raise WeightSyncError(f"weightsync send_weights: {err}")
        if not self.is_sender:
            self.last_result = tr.push(self.module, version=v)
            return
        pause = self.info.pause == "always" or (self.info.pause == "auto" and in_place)
        can_pause = callable(getattr(self.client, "pause_generation", None))
        update = _Background(lambda: self.client.update_weights({"version": v, "timeout": self.info.update_timeout}))
        self.client.start_weight_update()
        paused = False
        try:
            if pause and can_pause:
                self.client.pause_generation(mode="keep")
                paused = True
            if in_place:  # workers park (and so acknowledge the pause) before the first in-place byte
                update.start()
            self.last_result = tr.push(self.module, version=v, before_commit=None if in_place else update.start)
            update.join()
        except BaseException:
            update.join(quiet=True)  # it fails on its own: the version aborted
            try:
                self.client.finish_weight_update()  # closes vLLM's update session; nothing was applied
            except Exception as e:
                log.warning("finish_weight_update after a failed sync: %s", e)
            raise
        finally:
            if paused:
                self.client.resume_generation()
        self.client.finish_weight_update(weight_version=str(v))

    def shutdown(self) -> None:
        self.trainer.close()

    # ---- rank 0 ----

    def _status(self):
        return self.trainer.daemon.stub.GetStatus(pb.StatusRequest(), timeout=30)

    def _engines_write_in_place(self) -> bool:
        engines = [e for e in self._status().engines if e.model == self.info.model]
        if not engines:
            raise WeightSyncError(f"no engine is registered for model {self.info.model} "
                                  "(did init_weight_transfer_engine run?)")
        return any(e.staged_params < e.params for e in engines)

    def _committed(self) -> int:
        for m in self._status().models:
            if m.model == self.info.model:
                return int(m.committed_version)
        return 0


class _Background:
    """A call run on a thread on start(); join() re-raises its exception."""

    def __init__(self, fn):
        self.fn, self.error, self.thread = fn, None, None

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, daemon=True, name="weightsync-update-weights")
            self.thread.start()

    def _run(self) -> None:
        try:
            self.fn()
        except BaseException as e:
            self.error = e

    def join(self, quiet: bool = False) -> None:
        if self.thread is None:
            return
        self.thread.join()
        if self.error is not None and not quiet:
            raise WeightSyncError(f"update_weights failed: {self.error}") from self.error


def _module_of(source) -> Any:
    import torch
    if isinstance(source, torch.nn.Module):
        return source
    module = getattr(source, "_module", None)  # vLLM's ModuleSource
    if isinstance(module, torch.nn.Module):
        return module
    raise WeightSyncError(
        f"weightsync pushes each rank's own shards and needs the (FSDP) module itself as the source, or a "
        f"ModuleSource of it; got {type(source).__name__}")
