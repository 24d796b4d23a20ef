"""`HOST:PORT` parsing and formatting shared by the server, the clients, the link proxy and the CLI."""
from __future__ import annotations

from splitprune.errors import UserError

__all__ = ["parse_hostport", "format_hostport", "DEFAULT_HOST", "DEFAULT_PORT", "TOKEN_ENV"]

# Here, not in protocol.py, so that the CLI builds its parsers without importing torch.
DEFAULT_HOST = "127.0.0.1"   # the server binds to loopback unless told otherwise
DEFAULT_PORT = 50515
TOKEN_ENV = "SPLITPRUNE_TOKEN"  # where the bearer token is read from when no --token is given


def parse_hostport(s: str, default_host: str | None = None) -> tuple[str, int]:
    """Parse ``"host:port"`` (or ``"[v6addr]:port"``) into ``(host, port)``.

    With ``default_host`` given, ``":port"`` and a bare ``"port"`` are accepted too and use that host.
    Port 0 is accepted (it means "pick a free port" when listening); callers that connect reject it.
    Raises :class:`~splitprune.errors.UserError` on anything else.
    """
    if not isinstance(s, str):
        raise UserError(f"expected HOST:PORT, got {s!r}")
    text = s.strip()
    if not text:
        raise UserError("expected HOST:PORT, got an empty string")
    if text.startswith("["):  # [v6]:port
        end = text.find("]")
        if end < 0 or not text[end + 1:].startswith(":"):
            raise UserError(f"bad address {s!r}: expected [IPV6]:PORT")
        host, port_text = text[1:end], text[end + 2:]
        if not host:
            raise UserError(f"bad address {s!r}: empty host")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
        if ":" in host:
            raise UserError(f"bad address {s!r}: write IPv6 addresses as [ADDR]:PORT")
        if not host:
            if default_host is None:
                raise UserError(f"bad address {s!r}: missing host, expected HOST:PORT")
            host = default_host
    else:
        if default_host is None or not (text.isascii() and text.isdigit()):
            raise UserError(f"bad address {s!r}: expected HOST:PORT")
        host, port_text = default_host, text
    if any(c.isspace() for c in host):
        raise UserError(f"bad address {s!r}: whitespace in host")
    if not (port_text.isascii() and port_text.isdigit()):  # also rejects '', signs and spaces
        raise UserError(f"bad address {s!r}: port must be a number 0-65535")
    port = int(port_text)
    if port > 65535:
        raise UserError(f"bad address {s!r}: port must be a number 0-65535")
    return host, port


def format_hostport(addr: tuple[str, int]) -> str:
    """Inverse of :func:`parse_hostport`: brackets IPv6 hosts (usable as a gRPC target)."""
    host, port = addr[0], int(addr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
