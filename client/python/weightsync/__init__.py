"""weightsync: move trainer weights straight into inference engines' memory.

Trainer side: weightsync.Trainer(daemon, model).push(module_or_state_dict, version)
Engine side:  weightsync.Engine (generic); vLLM: the weight-transfer backend "weightsync"
              (weightsync.vllm_backend / weightsync.vllm_trainer, registered by the package's
              vllm.general_plugins entry point), or weightsync.vllm.WorkerExtension (older vLLM)

Only the protocol (weightsync.pb, weightsync.Daemon) works without torch;
everything else needs it (pip install 'weightsync[torch]').
"""
from importlib import import_module

from ._proto import weightsync_pb2 as pb
from .daemon import Daemon
from .errors import WeightSyncError

__version__ = "0.1.0"

_LAZY = {
    "Engine": "engine", "NameMapper": "names", "strip_wrappers": "names", "DtypePolicy": "policy",
    "DEFAULT_KEEP_FP32": "policy", "ShmArena": "shm", "ShmSegment": "shm", "shm_empty": "shm",
    "RankStats": "trainer", "SyncResult": "trainer", "Trainer": "trainer", "default_layer_of": "trainer",
}
__all__ = ["Daemon", "WeightSyncError", "pb", *sorted(_LAZY)]


def __getattr__(name):
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'weightsync' has no attribute {name!r}")
    value = getattr(import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value
