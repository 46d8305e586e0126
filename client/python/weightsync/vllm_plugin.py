"""Registers the `weightsync` weight-transfer backend with vLLM (the `vllm.general_plugins` entry point).

vLLM loads general plugins in every process (front end, engine core, workers) before it creates
a weight-transfer engine, so `--weight-transfer-config '{"backend": "weightsync"}'` (or
`LLM(weight_transfer_config={"backend": "weightsync"})`) finds it. Both factories get module
paths only: nothing heavy is imported until the backend is used. vLLMs without the
weight-transfer plugin API (before ~0.22) have no factory: registering is then a no-op and the
worker extension (weightsync.vllm.WorkerExtension) is the way in.
"""
from __future__ import annotations

import logging

BACKEND = "weightsync"
log = logging.getLogger("weightsync.vllm_plugin")


def register() -> None:
    try:
        from vllm.distributed.weight_transfer.factory import (WeightTransferEngineFactory,
                                                               WeightTransferTrainerFactory)
    except ImportError:  # a vLLM without the plugin API
        log.debug("vLLM has no weight-transfer factory; the weightsync backend is not registered")
        return
    # Plugins may be loaded more than once per process (vLLM says so): register once.
    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(BACKEND, "weightsync.vllm_backend", "WeightsyncWeightTransferEngine")
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(BACKEND, "weightsync.vllm_trainer",
                                                     "WeightsyncTrainerWeightTransferEngine")
