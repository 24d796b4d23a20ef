"""Inference sessions on a plain TCP port (`serve --session-port`, docs/protocol.md 5.2).

The same sessions as InferStream (inference/stream.py: the InferOpen checked once, then one InferItemReply per
InferItem, in order, one bad item failing that item alone), framed by a varint length each (wire/frames.py)
instead of HTTP/2 and gRPC: no frame headers, no length prefixes, no flow-control frames, so a one-sample
request costs its item and a byte. A connection's first frame is MAGIC and the token, checked before anything
else is read; its second the InferOpen, answered by an InferOpened (with `error` set when refused, and the
connection closed). Sessions count against --max-sessions with the InferStream ones; TLS as the gRPC port's.
"""
from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
import time
from typing import Callable

from splitprune.errors import ProtocolError
from splitprune.proto import service_pb2 as spb
from splitprune.server.service import SplitService
from splitprune.server.inference.stream import InferSession, failed_item
from splitprune.server.telemetry.metrics import Metrics
from splitprune.server.validation import parse
from splitprune.wire.frames import MAGIC, FrameTooLarge, read_frame, send_frame
from splitprune.wire.refusals import BadHandshake, Refusal, ServerBusy, TooLarge, Unauthenticated

log = logging.getLogger("splitprune.serve")
OPEN_LIMIT = 4096        # bytes of each of a connection's first two frames (MAGIC + token, InferOpen)
HANDSHAKE_S = 10.0       # seconds a connection has to send them (and to finish TLS)
MESSAGE_LIMIT = 1000     # characters of a refused opening's message (as the gRPC port's details)
DRAIN_BYTES = 1 << 20    # what a refused connection may still send before it is closed
BUSY_DRAIN_BYTES = 1 << 16   # ... when refused at --max-sessions (read without waiting, by the accept thread)


def refusal_of(exc: ProtocolError) -> Refusal:
    if isinstance(exc, Refusal):
        return exc
    return TooLarge(str(exc)) if isinstance(exc, FrameTooLarge) else BadHandshake(str(exc))


class SessionPort:
    """A listening socket whose connections are inference sessions; `stop` closes it and every connection."""

    def __init__(self, service: SplitService, host: str, port: int, token: str | None,
                 tls: ssl.SSLContext | None, metrics: Metrics, refused: Callable[[str, str, Refusal], None]) -> None:
        self.service, self.token, self.tls, self.metrics, self.refused = service, token, tls, metrics, refused
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, port), family=family, backlog=128)
        self.port = self.sock.getsockname()[1]
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        # refused connections still being answered without holding a session: as many as sessions at most
        self._closing = threading.BoundedSemaphore(service.config.max_sessions)
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, name="splitprune-session-port", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return  # closed by stop()
            if not self.service.infer_streams.acquire(blocking=False):
                self._busy(conn, f"{peer[0]}:{peer[1]}")
                continue
            with self._lock:
                if self._stopped:
                    conn.close()
                    self.service.infer_streams.release()
                    return
                self._open.add(conn)
            threading.Thread(target=self._serve, args=(conn, f"{peer[0]}:{peer[1]}"), daemon=True,
                             name="splitprune-session").start()

    def _busy(self, conn: socket.socket, peer: str) -> None:
        refusal = ServerBusy(f"this server holds {self.service.config.max_sessions} inference sessions already "
                             "(--max-sessions)")
        self.refused("session", peer, refusal)
        if self.tls is None:  # a TLS peer would need a handshake first: it sees the connection close
            try:
                conn.settimeout(1.0)
                send_frame(conn, refused_open(refusal))
            except OSError:
                pass
        finish(conn, wait_s=0.0, limit=BUSY_DRAIN_BYTES)   # this is the accept thread: it does not wait
        conn.close()

    def _serve(self, conn: socket.socket, peer: str) -> None:
        stream, held, closing = conn, True, False

        def end_with(message: bytes) -> None:
            """Answer a refusal and finish the connection. Its session slot is given back first (when few
            refused connections are being finished), so a peer that read the refusal can open again at once."""
            nonlocal held, closing
            if self._closing.acquire(blocking=False):
                closing, held = True, False
                self.service.infer_streams.release()
            send_frame(stream, message)
            finish(stream)

        try:
            conn.settimeout(HANDSHAKE_S)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each answer leaves at once
            if self.tls is not None:
                stream = self.tls.wrap_socket(conn, server_side=True)  # takes over conn's socket
                with self._lock:
                    self._open.discard(conn)
                    self._open.add(stream)
            session = self._open_session(stream, peer)
            if isinstance(session, Refusal):
                end_with(refused_open(session))
            if not isinstance(session, InferSession):
                return
            stream.settimeout(self.service.config.idle_timeout)
            limit = self.service.config.max_message_bytes
            while True:
                try:
                    data = read_frame(stream, limit)
                except FrameTooLarge as exc:  # its body cannot be skipped unread: the session ends
                    refusal = TooLarge(str(exc))
                    self.refused("session item", peer, refusal)
                    end_with(failed_item(refusal))
                    return
                if data is None:
                    return
                with self.metrics.call("infer_item", len(data)) as call:
                    out = call.reply(session.answer(data))
                send_frame(stream, out)
        except (OSError, ProtocolError):
            pass  # a connection that broke, timed out, failed TLS or sent a length that is no varint
        except Exception:  # noqa: BLE001 - the server goes on; the gRPC port answers INTERNAL here
            log.exception("inference session from %s failed", peer)
        finally:
            with self._lock:
                self._open.discard(stream)
            if held:   # before the close: a peer that saw the connection end finds its slot free
                self.service.infer_streams.release()
            if closing:
                self._closing.release()
            stream.close()

    def _open_session(self, stream: socket.socket, peer: str) -> InferSession | Refusal | None:
        """The session of the connection's first two frames, the refusal to answer, or None: the peer left."""
        try:
            hello = read_frame(stream, OPEN_LIMIT)
            if hello is None:
                return None
            if not hello.startswith(MAGIC):
                raise BadHandshake("not a splitprune session: the first frame starts with the wrong bytes")
            if self.token is not None and not hmac.compare_digest(hello[len(MAGIC):], self.token.encode()):
                raise Unauthenticated("missing or wrong token")
            first = read_frame(stream, OPEN_LIMIT)
            if first is None:
                return None
            with self.metrics.call("infer_open", len(first)) as call:
                session = InferSession(self.service, parse(spb.InferOpen, first))
                send_frame(stream, call.reply(session.opened()))
            return session
        except ProtocolError as exc:
            refusal = refusal_of(exc)
            self.refused("session", peer, refusal)
            return refusal

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            conns = list(self._open)
        self.sock.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes its thread, which closes it
            except OSError:
                pass
        self._thread.join(timeout=5)


def finish(stream: socket.socket, wait_s: float = 1.0, limit: int = DRAIN_BYTES) -> None:
    """End a connection after a refusal so that the peer reads it: closing with unread bytes would reset the
    connection, and a reset may discard the refusal before the peer reads it. So: no more writes, then what
    the peer still sends read and dropped (at most `limit` bytes, for at most `wait_s` seconds in all; 0: only
    what has arrived already)."""
    deadline = time.monotonic() + wait_s
    try:
        stream.shutdown(socket.SHUT_WR)
        left = limit
        while left > 0:
            stream.settimeout(max(0.0, deadline - time.monotonic()))
            data = stream.recv(min(left, 65536))
            if not data:
                return
            left -= len(data)
    except OSError:   # BlockingIOError and timeouts included: nothing more to read now
        pass


def refused_open(refusal: Refusal) -> bytes:
    return spb.InferOpened(error=spb.ErrorReason.Value(refusal.reason),
                           message=str(refusal)[:MESSAGE_LIMIT]).SerializeToString()


def server_context(cert: str | None, key: str | None, client_ca: str | None) -> ssl.SSLContext | None:
    """The TLS context of the session port from the gRPC port's files (checked there first); None: plaintext."""
    if not (cert and key):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
