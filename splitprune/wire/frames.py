"""Length-prefixed frames on a byte stream, for inference sessions on a plain TCP port (docs/protocol.md 5.2).

A frame is its length as a varint (LEB128: 1 byte up to 127, 2 up to 16,383) and that many bytes. That is the
whole framing: no HTTP/2 frame headers, no gRPC length prefix, no flow-control frames, so a one-sample
request costs its item and one or two bytes. Torch-free (the device package uses it).
"""
from __future__ import annotations

import socket

from splitprune.errors import ProtocolError

MAGIC = b"SPS1"          # the first bytes of a session's first frame: splitprune session, version 1
MAX_VARINT_BYTES = 5     # lengths up to 2**35 - 1; the limits below are far lower


class FrameTooLarge(ProtocolError):
    """A frame announced more bytes than the reader's limit (nothing of its body was read)."""


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def frame(data: bytes) -> bytes:
    return varint(len(data)) + data


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(frame(data))


def _exactly(sock: socket.socket, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = sock.recv(min(left, 1 << 20))
        if not part:
            raise ConnectionError(f"the connection closed {n - left} bytes into {n}")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_frame(sock: socket.socket, limit: int) -> bytes | None:
    """The next frame's body; None when the peer closed the connection between frames. FrameTooLarge for a
    length over `limit`, ProtocolError for a length that is not a varint, ConnectionError for a frame cut
    short; socket.timeout as the socket's timeout says."""
    length = shift = 0
    for i in range(MAX_VARINT_BYTES):
        byte = sock.recv(1)
        if not byte:
            if i == 0:
                return None
            raise ConnectionError("the connection closed inside a frame's length")
        length |= (byte[0] & 0x7F) << shift
        if length > limit:
            raise FrameTooLarge(f"a frame of more than {limit} bytes (the limit)")
        if not byte[0] & 0x80:
            return _exactly(sock, length) if length else b""
        shift += 7
    raise ProtocolError("a frame's length is not a varint")
