"""Connection to a weightsyncd daemon."""
from __future__ import annotations

import grpc

from ._proto import weightsync_pb2 as pb
from ._proto import weightsync_pb2_grpc as pb_grpc
from .errors import rpc_error

# Manifests of large MoE models run to tens of MB.
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


def normalize_address(address: str) -> str:
    """'unix:/p', 'unix:///p', 'host:port', or a bare absolute socket path."""
    if address.startswith("/"):
        return "unix:" + address
    return address


class Daemon:
    """A channel and stub to one daemon. Thread-safe (gRPC channels are)."""

    def __init__(self, address: str):
        self.address = normalize_address(address)
        self.channel = grpc.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        self.stub = pb_grpc.WeightSyncStub(self.channel)

    def status(self, timeout: float | None = 10.0) -> pb.StatusResponse:
        try:
            return self.stub.GetStatus(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as e:
            raise rpc_error(e, f"GetStatus on {self.address}") from None

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def as_daemon(daemon: "Daemon | str") -> Daemon:
    return daemon if isinstance(daemon, Daemon) else Daemon(daemon)
