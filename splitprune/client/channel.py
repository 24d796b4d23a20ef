"""The client's connection plumbing: where the server is, TLS and token, gRPC channels, one Train stream,
and turning gRPC failures into clear errors (with a fast TLS-mismatch diagnosis)."""
from __future__ import annotations

import ipaddress
import logging
import queue
import socket
import threading
import time
from typing import Callable

import grpc

from splitprune.client.config import ConnectConfig
from splitprune.client.traffic import SocketMeter, Traffic
from splitprune.errors import UserError
from splitprune.wire.addresses import DEFAULT_HOST, format_hostport, parse_hostport
from splitprune.wire.channels import DEFAULT_MAX_MESSAGE, channel_credentials, client_options
from splitprune.wire.envelopes import AUTH_KEY, ERROR_KEY

log = logging.getLogger("splitprune.client")

# Status codes after which the client reconnects and retries (step ids make that safe).
RETRIABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.UNKNOWN}


class RemoteError(UserError):
    """The server refused a request or could not be reached; `code` and `reason` say why."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code, self.reason = code, reason


def rpc_status(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str, str]:
    """(code, details, ErrorReason name or "") of a failed call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    reason = ""
    try:
        reason = dict(exc.trailing_metadata() or ()).get(ERROR_KEY, "")
    except Exception:  # noqa: BLE001 - not every RpcError carries metadata
        pass
    return code, details or "", reason


def remote_error(exc: grpc.RpcError, what: str) -> RemoteError:
    code, details, reason = rpc_status(exc)
    hint = ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        hint = " (pass --token or set SPLITPRUNE_TOKEN)"
    elif code == grpc.StatusCode.UNAVAILABLE and ("handshake" in details.lower() or "ssl" in details.lower()):
        hint = " (TLS on one side only, or the certificate does not match?)"
    text = f"{what}: {code.name}" + (f" [{reason}]" if reason else "") + f": {details}{hint}"
    return RemoteError(text, code, reason)


class StreamFailed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, reason: str = "", exc: grpc.RpcError | None = None):
        super().__init__(details)
        self.code, self.details, self.reason, self.exc = code, details, reason, exc

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE


_CLOSE = object()


class Stream:
    """One Train stream: requests go through a queue to gRPC's sender; the caller reads each reply itself.

    Reading in the caller's thread keeps thread hand-offs off the critical path of a step; a watchdog
    thread cancels the call when a reply is later than its deadline.
    """

    def __init__(self, method: Callable, metadata: tuple) -> None:
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._call = method(iter(self._requests.get, _CLOSE), metadata=metadata)
        self._deadline: float | None = None
        self._timed_out = False
        self.closed = False      # no more requests
        self._finished = False   # the call is over: the watchdog may stop
        self._watchdog = threading.Thread(target=self._watch, name="splitprune-stream-watchdog", daemon=True)
        self._watchdog.start()

    def _watch(self) -> None:
        while not self._finished:
            time.sleep(0.25)
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._timed_out = True
                self._call.cancel()
                return

    def exchange(self, data: bytes, timeout: float) -> bytes:
        if self.closed:
            raise StreamFailed(grpc.StatusCode.UNAVAILABLE, "the stream is closed")
        self._requests.put(data)
        self._deadline = time.monotonic() + timeout
        try:
            return next(self._call)
        except StopIteration:
            self.cancel()
            raise StreamFailed(grpc.StatusCode.UNAVAILABLE, "the server ended the stream") from None
        except grpc.RpcError as exc:
            self.cancel()
            if self._timed_out:
                raise StreamFailed(grpc.StatusCode.DEADLINE_EXCEEDED, f"no reply within {timeout:g} s") from None
            raise StreamFailed(*rpc_status(exc), exc=exc) from None
        finally:
            self._deadline = None

    def close(self, wait: float = 0.0) -> None:
        """Half-close (the server ends the session); wait up to `wait` s for its end, then cancel."""
        if not self.closed:
            self.closed = True
            self._requests.put(_CLOSE)
            if wait:
                self._deadline = time.monotonic() + wait
                try:
                    for _ in self._call:  # drain until the server's OK (or an error, or the deadline)
                        pass
                except grpc.RpcError:
                    pass
        self._finished = True
        self._call.cancel()

    def cancel(self) -> None:
        if not self.closed:
            self.closed = True
            self._requests.put(_CLOSE)
        self._finished = True
        self._call.cancel()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def server_speaks_tls(host: str, port: int, timeout: float = 2.0) -> bool | None:
    """True: the server answers a plaintext HTTP/2 preface as a TLS server does (alert or hang-up);
    False: it answers with HTTP/2 SETTINGS (plaintext gRPC); None: cannot tell (nothing listening...)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(_H2_PREFACE)
            first = s.recv(16)
    except ConnectionResetError:
        return True
    except OSError:
        return None
    if len(first) >= 4 and first[3] == 0x04:  # an HTTP/2 frame of type SETTINGS
        return False
    if not first or first[0] == 0x15:  # hung up, or a TLS alert record
        return True
    return None


class Connection:
    """Where the server is and how to reach it: address, TLS, token; counts the bytes of its channels."""

    def __init__(self, config: ConnectConfig | str, max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        config = ConnectConfig(server=config) if isinstance(config, str) else config
        if config.server is None:
            raise UserError("no server given: pass --server HOST:PORT")
        self.config = config
        self.replicas = [parse_hostport(part.strip(), default_host=DEFAULT_HOST) for part in config.server.split(",")]
        if any(port == 0 for _, port in self.replicas):
            raise UserError(f"--server {config.server}: give each server's port")
        self.host, self.port = self.replicas[0]
        self.target = format_hostport((self.host, self.port))
        self.tls = tls = config.tls
        self.credentials = channel_credentials(tls)
        token = config.token
        if token is not None and not token:
            raise UserError("the token must not be empty")
        if token and self.credentials is None and not is_loopback(self.host):
            log.warning("the token travels in clear text to %s: anyone on the path can read it; "
                        "use TLS (--tls-ca) when the server is not on loopback", self.target)
        self.metadata = ((AUTH_KEY, f"Bearer {token}"),) if token else ()
        self.measure = config.measure_socket
        self.max_message = max_message
        self.traffic = Traffic()
        self._channels: list[grpc.Channel] = []

    def channel(self, purpose: str) -> tuple[grpc.Channel, SocketMeter | None]:
        """A channel with its own TCP connection; through a counting relay when measuring, whose bytes
        no request accounts for go to `purpose`."""
        meter = None
        target = self.target
        if self.measure:
            meter = SocketMeter((self.host, self.port), purpose)
            self.traffic.meters.append(meter)
            target = format_hostport(meter.address)
        options = client_options(self.max_message, tls_host=self.host if self.credentials else None)
        if self.credentials is not None:
            ch = grpc.secure_channel(target, self.credentials, options=options)
        else:
            ch = grpc.insecure_channel(target, options=options)
        self._channels.append(ch)
        return ch, meter

    def failover(self) -> bool:
        """Move to the next replica of the list (False: there is no other)."""
        if len(self.replicas) < 2:
            return False
        self.replicas.append(self.replicas.pop(0))
        self.host, self.port = self.replicas[0]
        self.target = format_hostport((self.host, self.port))
        return True

    def tls_mismatch(self) -> str | None:
        """After a failed connection: what to do when the server speaks TLS and this client not, or the reverse."""
        tls = server_speaks_tls(self.host, self.port)
        if tls is True and self.credentials is None:
            return (f"the server at {self.target} uses TLS and this client does not: pass --tls-ca CA.pem "
                    "(the CA certificate that signed the server's)")
        if tls is False and self.credentials is not None:
            return (f"the server at {self.target} does not use TLS and this client does: drop --tls-ca/--tls-cert/"
                    "--tls-key, or start the server with --tls-cert and --tls-key")
        return None

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        for meter in self.traffic.meters:
            meter.stop()
