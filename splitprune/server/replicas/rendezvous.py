"""The tier's rendezvous, shut (docs/replicas.md "Rendezvous"): where a replica stands (TierEnv), the
tier's shared secret, and the process group joined over a store that listens only on MASTER_ADDR and
whose every value is signed with that secret.

torch.distributed's TCPStore has no authentication, and under env:// it listens on every interface. So
the store's host (`serve --replicas`'s launcher, else replica 0) binds the store's socket itself (to
MASTER_ADDR's address), gloo's sockets are bound to the interface that reaches MASTER_ADDR (or the
user's GLOO_SOCKET_IFNAME), and every value written to the store carries an HMAC-SHA256 of its key and
value under the tier secret, checked on every read. A joiner without the secret cannot join (the host's
signed SECRET_CHECK fails its check; its registrations fail the tier's check) and cannot
redirect a replica's connections (gloo's addresses travel through the store, signed). Anyone who can
reach the port can still read the (signed, not secret) values or disturb the rendezvous: keep it on a
private network, as the manifests do.
"""
from __future__ import annotations

import fcntl
import hashlib
import hmac
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from datetime import timedelta

from splitprune.errors import UserError
from splitprune.wire.addresses import TOKEN_ENV

SECRET_ENV = "SPLITPRUNE_TIER_SECRET"  # the tier's shared secret; the serve token when unset
HOSTED_ENV = "SPLITPRUNE_TIER_STORE"   # "client": the launcher (serve --replicas) serves the store
SECRET_CHECK = "tier/secret-check"     # written by the store's host, signed
SECRET_CHECK_VALUE = b"splitprune tier"
TAG_BYTES = 32


@dataclass(frozen=True)
class TierEnv:
    """Where a replica stands in its tier: the standard torch.distributed variables (torchrun, Kubernetes),
    and the tier's shared secret."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    secret: bytes = b""

    @classmethod
    def from_environ(cls, environ: dict | None = None, token: str | None = None) -> "TierEnv":
        env = os.environ if environ is None else environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise UserError(f"serve --distributed needs the variables {', '.join(missing)} (set by torchrun, "
                            "the Kubernetes StatefulSet of deploy/, or serve --replicas N)")
        try:
            values = {k: int(env.get(k, "0") or "0") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        except ValueError:
            raise UserError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers") from None
        if not 0 <= values["RANK"] < values["WORLD_SIZE"] or values["LOCAL_RANK"] < 0:
            raise UserError(f"RANK must be in 0..WORLD_SIZE-1 and LOCAL_RANK >= 0, got RANK={values['RANK']}, "
                            f"WORLD_SIZE={values['WORLD_SIZE']}, LOCAL_RANK={values['LOCAL_RANK']}")
        if not 1 <= values["MASTER_PORT"] <= 65535:
            raise UserError(f"MASTER_PORT must be a port number (1..65535), got {values['MASTER_PORT']}")
        secret = env.get(SECRET_ENV) or token or ""
        if len(secret) < 16:
            raise UserError(f"a tier needs a shared secret of at least 16 characters, the same on every replica: set "
                            f"${SECRET_ENV} (or give the replicas a --token / ${TOKEN_ENV}, which then serves as "
                            "the secret)" + (f"; it has {len(secret)}" if secret else ""))
        return cls(values["RANK"], values["WORLD_SIZE"], values["LOCAL_RANK"], env["MASTER_ADDR"],
                   values["MASTER_PORT"], secret.encode())


def _signed_store_class():
    import torch.distributed as dist

    class SignedStore(dist.Store):
        """Every value written carries HMAC-SHA256(secret, key, value); a read whose tag does not match
        raises. Counters (add) stay plain: gloo uses them only to count arrivals."""

        def __init__(self, inner, secret: bytes) -> None:
            super().__init__()
            self.inner, self._key = inner, hashlib.sha256(b"splitprune tier v1\0" + secret).digest()

        def _tag(self, key: str, value: bytes) -> bytes:
            return hmac.new(self._key, key.encode() + b"\0" + value, hashlib.sha256).digest()

        def set(self, key: str, value) -> None:
            value = value.encode() if isinstance(value, str) else bytes(value)
            self.inner.set(key, value + self._tag(key, value))

        def get(self, key: str) -> bytes:
            raw = self.inner.get(key)
            value, tag = raw[:-TAG_BYTES], raw[-TAG_BYTES:]
            if len(raw) < TAG_BYTES or not hmac.compare_digest(tag, self._tag(key, value)):
                raise PermissionError(f"the rendezvous value {key!r} is not signed with this tier's secret")
            return value

        def add(self, key: str, amount: int) -> int:
            return self.inner.add(key, amount)

        def wait(self, keys, timeout=None) -> None:
            return self.inner.wait(keys) if timeout is None else self.inner.wait(keys, timeout)

        def check(self, keys) -> bool:
            return self.inner.check(keys)

        def delete_key(self, key: str) -> bool:
            return self.inner.delete_key(key)

        def num_keys(self) -> int:
            return self.inner.num_keys()

        def set_timeout(self, timeout: timedelta) -> None:
            self.inner.set_timeout(timeout)

        @property
        def timeout(self) -> timedelta:
            return self.inner.timeout

    return SignedStore


def resolve(host: str, port: int) -> tuple[int, str]:
    """(address family, address) MASTER_ADDR names; the first the resolver gives."""
    try:
        family, *_, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UserError(f"MASTER_ADDR {host!r} does not resolve: {exc.strerror}") from None
    return family, sockaddr[0]


def interface_towards(family: int, address: str) -> str | None:
    """The name of the local interface whose address this host uses to reach `address` (Linux)."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect((address, 9))  # UDP: picks a route, sends nothing
        local = s.getsockname()[0]
    if ipaddress.ip_address(local).is_loopback:
        return "lo" if "lo" in {name for _, name in socket.if_nameindex()} else None
    if family != socket.AF_INET:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
            except OSError:
                continue
            if socket.inet_ntoa(raw[20:24]) == local:
                return name
    return None


def serve_store(master_addr: str, port: int, secret: bytes, timeout_s: float, world_size: int = 1):
    """The tier's store, served by this process on MASTER_ADDR's address only, signed; it writes
    SECRET_CHECK so that a joiner with another secret is refused before it registers."""
    import torch.distributed as dist

    family, address = resolve(master_addr, port)
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, port))
    except OSError as exc:
        listener.close()
        raise UserError(f"cannot serve the tier's store on MASTER_ADDR {master_addr} ({address}) port {port}: "
                        f"{exc.strerror}") from None
    listener.listen(1024)
    # the store takes the socket over (detach: Python must not close it under the store)
    inner = dist.TCPStore(address, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                          master_listen_fd=listener.detach())
    store = _signed_store_class()(inner, secret)
    store.set(SECRET_CHECK, SECRET_CHECK_VALUE)
    return store


def open_store(env: TierEnv, timeout_s: float):
    """The tier's store, signed. Replica 0 serves it (MASTER_ADDR only), unless `serve --replicas` (HOSTED_ENV)
    or torchrun's agent (which already serves a store on MASTER_PORT) does; the others are its clients."""
    import torch.distributed as dist

    family, address = resolve(env.master_addr, env.master_port)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    if env.rank == 0 and not agent and os.environ.get(HOSTED_ENV) != "client":
        store = serve_store(env.master_addr, env.master_port, env.secret, timeout_s, env.world_size)
    else:
        inner = dist.TCPStore(address, env.master_port, env.world_size, False, timedelta(seconds=timeout_s))
        store = _signed_store_class()(inner, env.secret)
        if agent and env.rank == 0 and not store.check([SECRET_CHECK]):
            store.set(SECRET_CHECK, SECRET_CHECK_VALUE)
    if not os.environ.get("GLOO_SOCKET_IFNAME"):
        name = interface_towards(family, address)
        if name:
            os.environ["GLOO_SOCKET_IFNAME"] = name  # read by gloo when the process group is made
    return store
