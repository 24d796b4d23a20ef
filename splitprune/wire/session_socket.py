"""The client side of an inference session on the server's TCP session port (docs/protocol.md 5.2), torch-free.

The same session as an InferStream (wire/stream.py), each message framed by its length alone (wire/frames.py):
MAGIC and the token, then the InferOpen, answered by an InferOpened; then items and their answers, in order.
"""
from __future__ import annotations

import socket
import ssl
import time
from typing import Callable

from splitprune.errors import ProtocolError
from splitprune.proto import service_pb2 as spb
from splitprune.wire.frames import MAGIC, frame, read_frame
from splitprune.wire.stream import CLOSE_WAIT_S, Session, SessionLost, StreamRefused

REPLY_LIMIT = 1 << 20  # bytes of one answer: labels of the largest batch and a message fit many times


class SocketSession(Session):
    """One session on a connection to `address` (host, port)."""

    def __init__(self, address: tuple[str, int], opened: spb.InferOpen, token: str | None = None,
                 tls: ssl.SSLContext | None = None, timeout_s: float = 60.0) -> None:
        where = f"{address[0]}:{address[1]}"
        hello, body = MAGIC + (token or "").encode(), opened.SerializeToString()
        try:
            sock = socket.create_connection(address, timeout=timeout_s)
        except OSError as exc:
            raise SessionLost(f"cannot connect to the session port {where}: {exc.strerror or exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one small frame per request: no waiting
        try:
            if tls is not None:
                sock = tls.wrap_socket(sock, server_hostname=address[0])
            sock.sendall(frame(hello) + frame(body))
            first = read_frame(sock, REPLY_LIMIT)
        except (OSError, ProtocolError) as exc:
            sock.close()
            raise SessionLost(f"the session port {where} broke the session's opening: {exc}") from None
        if first is None:
            sock.close()
            raise SessionLost(f"the session port {where} closed the connection before the session opened (a "
                              "TLS mismatch, or the server at its --max-sessions)")
        try:
            answer = spb.InferOpened.FromString(first)
        except Exception:  # noqa: BLE001 - protobuf's DecodeError
            sock.close()
            raise ProtocolError("the session port answered the opening with something not an InferOpened") from None
        if answer.error:
            sock.close()
            raise StreamRefused(spb.ErrorReason.Name(answer.error), answer.message)
        sock.settimeout(None)  # as an InferStream's: an answer is waited for as long as the session lives
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._sock, self._where = sock, where
        self._replies = self._answers()
        super().__init__(answer, len(frame(hello)) + len(frame(body)))

    def _answers(self):
        while True:
            try:
                out = read_frame(self._sock, REPLY_LIMIT)
            except (OSError, ProtocolError) as exc:
                raise SessionLost(f"the session on {self._where} broke: {exc}") from None
            if out is None:
                raise SessionLost(f"the server at {self._where} ended the session")
            yield out

    def _send(self, item: bytes) -> None:
        try:
            self._sock.sendall(frame(item))
        except OSError as exc:
            raise SessionLost(f"the session on {self._where} broke: {exc}") from None

    def _end(self) -> None:
        """Close gracefully: no more items, then what the server still sends (abandoned answers) read and dropped
        until it ends the connection, which it does once the session's slot is free again (or CLOSE_WAIT_S)."""
        deadline = time.monotonic() + CLOSE_WAIT_S
        try:
            self._sock.shutdown(socket.SHUT_WR)
            if self._reader is not None:   # it reads them, and stops when the server ends the connection
                self._reader.join(CLOSE_WAIT_S)
            while self._reader is None and (left := deadline - time.monotonic()) > 0:
                self._sock.settimeout(left)
                if not self._sock.recv(65536):
                    break
        except (OSError, ValueError):   # broken, timed out, or a TLS socket already unwrapped
            pass
        self._sock.close()


def on_port(address_of: Callable[[str], tuple[str, int] | None], token: str | None = None,
            tls: ssl.SSLContext | None = None, timeout_s: float = 60.0) -> Callable[[spb.InferOpen], Session]:
    """What opens sessions on a server's session port (InferSessions' `open`): `address_of(fingerprint)` is where
    the port the server announces for a model is (DescribeReply.session_port; None: it announces none), asked
    once per model and again after a session failed to connect (a restarted server may announce another)."""
    known: dict[str, tuple[str, int]] = {}

    def open_session(opened: spb.InferOpen) -> Session:
        address = known.get(opened.fingerprint) or address_of(opened.fingerprint)
        if address is None:
            raise SessionLost("the server announces no TCP session port: start it with --session-port, or leave "
                              "out --tcp-session")
        known[opened.fingerprint] = address
        try:
            return SocketSession(address, opened, token, tls, timeout_s)
        except SessionLost:
            known.pop(opened.fingerprint, None)
            raise

    return open_session


def client_context(ca: str | None, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """TLS to a session port, from the files the gRPC channel uses (checked there first)."""
    context = ssl.create_default_context(cafile=ca)
    if cert and key:
        context.load_cert_chain(cert, key)
    return context
