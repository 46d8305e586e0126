"""Connection to a weightsyncd daemon."""
from __future__ import annotations

import collections
import os

import grpc

from ._proto import weightsync_pb2 as pb
from ._proto import weightsync_pb2_grpc as pb_grpc
from .errors import WeightSyncError, rpc_error

# Manifests of large MoE models run to tens of MB. The daemon keeps its error
# messages under 4 KiB; a larger metadata limit than gRPC's default 8 KiB keeps a
# longer one from turning into "metadata size exceeds soft limit".
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_metadata_size", 64 * 1024),
]


def normalize_address(address: str) -> str:
    """'unix:/p', 'unix:///p', 'host:port', or a bare absolute socket path."""
    if address.startswith("/"):
        return "unix:" + address
    return address


def _pem(value, what: str) -> "bytes | None":
    """PEM bytes from a path (str/PathLike) or the PEM bytes themselves."""
    if value is None or isinstance(value, bytes):
        return value
    try:
        with open(value, "rb") as f:
            data = f.read()
    except OSError as e:
        raise WeightSyncError(f"cannot read the {what} {value}: {e.strerror}") from None
    if b"-----BEGIN " not in data:
        raise WeightSyncError(f"the {what} {value} is not PEM (no -----BEGIN line)")
    return data


def _check_token(token: str, what: str) -> str:
    if not token:
        raise WeightSyncError(f"{what} is empty")
    for i, c in enumerate(token):
        if not "!" <= c <= "~":
            raise WeightSyncError(f"{what}: character {i} is not printable ASCII "
                                  "(a token is one word of printable ASCII)")
    return token


def read_token_file(path) -> str:
    """The token in a file (surrounding whitespace removed), as weightsyncd --token-file reads it."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise WeightSyncError(f"cannot read the token file {path}: {e.strerror}") from None
    return _check_token(text.strip(), f"token file {path}")


class _CallDetails(collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _TokenInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                        grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds "authorization: Bearer <token>" to every call."""

    def __init__(self, token: str):
        self._entry = ("authorization", "Bearer " + token)

    def _details(self, d):
        md = list(d.metadata or ()) + [self._entry]
        return _CallDetails(d.method, d.timeout, md, d.credentials, getattr(d, "wait_for_ready", None),
                            getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class Daemon:
    """A channel and stub to one daemon. Thread-safe (gRPC channels are).

    TLS (host:port addresses only; unix sockets are never TLS): tls_ca = PEM
    CAs that signed the daemon's certificate (None: the system's roots),
    tls_cert/tls_key = client certificate and key for daemons that require
    one; each a path or PEM bytes; any of them set means TLS. Default: the
    environment's WEIGHTSYNC_TLS_CA / WEIGHTSYNC_TLS_CERT / WEIGHTSYNC_TLS_KEY.
    token (or token_file): sent as "authorization: Bearer <token>" on every
    call, for daemons started with --token-file. Default: $WEIGHTSYNC_TOKEN,
    else the file $WEIGHTSYNC_TOKEN_FILE.
    """

    def __init__(self, address: str, *, tls_ca=None, tls_cert=None, tls_key=None,
                 token: "str | None" = None, token_file=None):
        self.address = normalize_address(address)
        env = os.environ
        if token is None and token_file is None:
            token = env.get("WEIGHTSYNC_TOKEN") or None
            token_file = None if token else (env.get("WEIGHTSYNC_TOKEN_FILE") or None)
        if token is not None:
            token = _check_token(token, "the token")
        elif token_file is not None:
            token = read_token_file(token_file)
        if tls_ca is None and tls_cert is None and tls_key is None:
            tls_ca, tls_cert, tls_key = (env.get(k) or None for k in
                                         ("WEIGHTSYNC_TLS_CA", "WEIGHTSYNC_TLS_CERT", "WEIGHTSYNC_TLS_KEY"))
        self.tls = not self.address.startswith("unix:") and any(v is not None for v in (tls_ca, tls_cert, tls_key))
        if self.tls:
            if (tls_cert is None) != (tls_key is None):
                raise WeightSyncError("a TLS client certificate needs its key and vice versa (tls_cert, tls_key)")
            creds = grpc.ssl_channel_credentials(root_certificates=_pem(tls_ca, "TLS CA file"),
                                                 private_key=_pem(tls_key, "TLS client key"),
                                                 certificate_chain=_pem(tls_cert, "TLS client certificate"))
            self.channel = grpc.secure_channel(self.address, creds, options=_CHANNEL_OPTIONS)
        else:
            self.channel = grpc.insecure_channel(self.address, options=_CHANNEL_OPTIONS)
        calls = grpc.intercept_channel(self.channel, _TokenInterceptor(token)) if token else self.channel
        self.stub = pb_grpc.WeightSyncStub(calls)

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


_CONNECTION_OPTIONS = ("tls_ca", "tls_cert", "tls_key", "token", "token_file")


def as_daemon(daemon: "Daemon | str", **connection) -> Daemon:
    """A Daemon for an address (with `connection` options: see Daemon), or the Daemon given."""
    unknown = set(connection) - set(_CONNECTION_OPTIONS)
    if unknown:
        raise TypeError(f"unknown connection options {sorted(unknown)}")
    given = {k: v for k, v in connection.items() if v is not None}
    if isinstance(daemon, Daemon):
        if given:
            raise WeightSyncError(f"connection options {sorted(given)} go to the Daemon when passing one")
        return daemon
    return Daemon(daemon, **given)
