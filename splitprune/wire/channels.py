"""gRPC channel settings shared by the server and its clients: TLS credentials, message limits, keepalive
and flow-control options."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from splitprune.errors import UserError
from splitprune.wire.codec import MAX_MESSAGE_BYTES

# The largest step message is MAX_MESSAGE_BYTES (the codec's limit); the envelope adds a few bytes.
DEFAULT_MAX_MESSAGE = MAX_MESSAGE_BYTES + 64 * 1024


@dataclass(frozen=True)
class TlsFiles:
    """PEM files. Server: cert + key (+ client_ca for mutual TLS). Client: ca (+ cert + key for mutual TLS)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @staticmethod
    def read(path: str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise UserError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
        if b"-----BEGIN" not in data:
            raise UserError(f"{what} {path} is not a PEM file")
        return data


def server_credentials(cert: str | None, key: str | None, client_ca: str | None = None):
    """None for plaintext; TLS with the server certificate; mutual TLS when client_ca is given."""
    import grpc

    if cert is None and key is None:
        if client_ca:
            raise UserError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
        return None
    if not (cert and key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    pair = (TlsFiles.read(key, "TLS key"), TlsFiles.read(cert, "TLS certificate"))
    ca = TlsFiles.read(client_ca, "client CA certificate")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(tls: TlsFiles | None):
    import grpc

    if tls is None:
        return None
    if bool(tls.cert) != bool(tls.key):
        raise UserError("mutual TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_channel_credentials(root_certificates=TlsFiles.read(tls.ca, "TLS CA certificate"),
                                        private_key=TlsFiles.read(tls.key, "TLS key"),
                                        certificate_chain=TlsFiles.read(tls.cert, "TLS certificate"))


# A fixed 8 MiB HTTP/2 flow-control window instead of bandwidth-delay probing: no probe PINGs on the wire
# (they cost more than the framing of a B=4 step), and a window that already holds the largest step.
FLOW_CONTROL = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 8 * 1024 * 1024)]


def client_options(max_message: int = DEFAULT_MAX_MESSAGE, tls_host: str | None = None) -> list[tuple]:
    opts = [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.keepalive_time_ms", 30_000),        # detect a dead server within ~40 s even when idle
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_http_proxy", 0),              # never route through an HTTP proxy from the environment
        ("grpc.enable_retries", 0),                 # the client does its own, step-id aware, retries
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
        ("grpc.use_local_subchannel_pool", 1),      # own TCP connection per channel (clean byte counts)
    ] + FLOW_CONTROL
    if tls_host:
        opts.append(("grpc.ssl_target_name_override", tls_host))
    return opts


def server_options(max_message: int, keepalive_s: float) -> list[tuple]:
    return [
        ("grpc.max_receive_message_length", max_message),
        ("grpc.max_send_message_length", max_message),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),  # ping idle clients; drop dead ones
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),                   # a second server on the same port fails loudly
    ] + FLOW_CONTROL
