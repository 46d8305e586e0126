"""Errors raised by the weightsync client."""
from __future__ import annotations


class WeightSyncError(RuntimeError):
    """A sync, registration or daemon call failed. The message names the tensor/param/rank."""


def rpc_error(err: Exception, what: str) -> WeightSyncError:
    """Turns a grpc.RpcError into a WeightSyncError that keeps the daemon's message."""
    code = getattr(err, "code", None)
    details = getattr(err, "details", None)
    if callable(code) and callable(details):
        c = code()
        return WeightSyncError(f"{what}: {getattr(c, 'name', c)}: {details()}")
    return WeightSyncError(f"{what}: {err}")
