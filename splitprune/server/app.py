"""The gRPC server as a running application: start it from a ServeConfig, run its housekeeping (periodic
saves, idle sessions reaped), stop it (drain, save, end the calls). What it serves is in the other modules
of this package (see its __init__)."""
from __future__ import annotations

import gc
import logging
import socket
import threading
import time
from concurrent import futures

import grpc

from splitprune.errors import UserError
from splitprune.server.config import ServeConfig
from splitprune.server.service import SplitService
from splitprune.server.servicer import Servicer, TokenInterceptor, log_refusal
from splitprune.server.inference.port import SessionPort, server_context
from splitprune.server.telemetry.health import CHECK_METHOD, Health
from splitprune.server.telemetry.metrics import Metrics
from splitprune.server.telemetry.ratelog import BoundedLog
from splitprune.wire.addresses import DEFAULT_HOST, format_hostport, parse_hostport
from splitprune.wire.channels import server_credentials, server_options

log = logging.getLogger("splitprune.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


TRIM_S = 10.0  # seconds between returns of freed heap memory to the system


def _malloc_trim():
    """glibc's malloc_trim, or None elsewhere."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def background(service: SplitService, stop: threading.Event) -> None:
    """Periodic saves, idle-session reaping and the return of freed heap memory, until `stop` is set.

    The heap keeps what a rebuilt half (a fresh start), a finished batch or a dropped session freed, so the
    resident memory of a long-running server climbed by ~45 MB per rebuilt half and kept growing under a
    fuzzer (bench_results/fuzz/100k_before_trim): the old halves wait in reference cycles for the collector,
    and the heap keeps what they freed. Every TRIM_S a collection and malloc_trim(0) give the pages back
    (a few ms; the convolution workspaces kept in the heap for speed are re-faulted at most once per TRIM_S)."""
    o = service.config
    last_save = last_trim = time.monotonic()
    trim = _malloc_trim() or (lambda _pad: 0)
    while not stop.wait(min(1.0, o.idle_timeout / 2, o.save_every)):
        service.sessions.reap_idle(o.idle_timeout)
        if time.monotonic() - last_trim >= TRIM_S:
            gc.collect()  # a rebuilt half's old modules sit in reference cycles until the collector runs
            trim(0)
            last_trim = time.monotonic()
        if time.monotonic() - last_save >= o.save_every:
            try:
                service.save_all()
            except Exception:  # noqa: BLE001 - a failed save must not kill the server
                log.exception("periodic save failed")
            last_save = time.monotonic()


class App:
    """A running server: its address, and a stop() that drains, saves and shuts down."""

    def __init__(self, service: SplitService, server: grpc.Server, address: tuple[str, int], tls: bool,
                 health: Health, metrics: Metrics, metrics_address: tuple[str, int] | None = None,
                 sessions: SessionPort | None = None) -> None:
        self.service, self.server, self.tls, self.sessions = service, server, tls, sessions
        self.host, self.port = address
        self.health, self.metrics, self._metrics_address = health, metrics, metrics_address
        self._stop = threading.Event()
        self._thread = threading.Thread(target=background, args=(service, self._stop), name="splitprune-serve-bg",
                                        daemon=True)
        self._thread.start()
        self._stopped = False

    @property
    def address(self) -> str:
        return format_hostport((self.host, self.port))

    @property
    def metrics_address(self) -> str | None:
        """Where GET /metrics answers; None when metrics are not served over HTTP."""
        return format_hostport(self._metrics_address) if self._metrics_address else None

    def drain(self) -> None:
        """Refuse new steps and sessions (SHUTTING_DOWN) and report NOT_SERVING to health checks, for good."""
        self.service.draining = True
        self.health.drain()

    def stop(self, grace: float = 2.0) -> None:
        """Stop taking steps, save every half, then end all calls (clients get UNAVAILABLE and may resume)."""
        if self._stopped:
            return
        self._stopped = True
        self.drain()
        if self.sessions is not None:
            self.sessions.stop()
        done = self.server.stop(grace)
        self._stop.set()
        self._thread.join(timeout=5)  # no periodic save races the final one
        try:
            self.service.save_all()
        finally:
            done.wait()
            self.metrics.stop()
            self.service.discard_temporary()

    def wait(self, timeout: float | None = None) -> bool:
        return self.server.wait_for_termination(timeout)


def exposure_warnings(host: str, token: str | None, tls: bool) -> list[str]:
    """What is unsafe about serving on `host` with this token and TLS setting."""
    if host in LOOPBACK:
        return []
    warnings = []
    if not token:
        warnings.append(f"listening on {host} without a token: anyone who reaches this port can train and "
                        "read the hosted models (pass --token or set SPLITPRUNE_TOKEN)")
    if not tls:
        warnings.append(f"listening on {host} without TLS: activations, gradients"
                        + (" and the token" if token else "") + " travel in clear text (pass --tls-cert/--tls-key)")
    return warnings


def _port_taken(host: str, port: int) -> bool:
    """Whether another process listens there: asked before gRPC binds, whose C core would log its own error."""
    if port == 0:
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no obstacle
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def start_app(config: ServeConfig, tier=None) -> App:
    """Start a server in this process (background threads) and return its handle. `tier`: a replicas.Tier when
    this server is one replica of a tier (serve --distributed; docs/replicas.md). The process-wide settings of
    `config` (threads, quiet, replicas, distributed) are the command's: they are not read here."""
    host, port = parse_hostport(config.listen, default_host=DEFAULT_HOST)
    if config.accelerator == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--accelerator cuda: no CUDA device is available here")
    credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    service = SplitService(config, tier.shared_checkpoints if tier is not None else None)
    service.tier = tier  # replicas.Tier: set before the first call can arrive
    refusals = BoundedLog(log, "refused calls")

    def refused(what: str, peer: str, refusal) -> None:
        service.count("errors")
        log_refusal(refusals, what, peer, refusal)

    workers = 2 * config.max_sessions + 16  # a thread per training stream and per inference stream, and the rest
    interceptors = (TokenInterceptor(config.token, refused, frozenset({CHECK_METHOD})),) if config.token else ()
    metrics = Metrics(service)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitprune-rpc"),
                         handlers=(Servicer(service, refusals, metrics).handler(),), interceptors=interceptors,
                         options=server_options(config.max_message_bytes, config.keepalive),
                         maximum_concurrent_rpcs=4 * workers)
    health = Health(server)
    target = format_hostport((host, port))
    bound = 0
    if not _port_taken(host, port):
        try:
            bound = server.add_secure_port(target, credentials) if credentials else server.add_insecure_port(target)
        except RuntimeError:
            bound = 0
    if not bound:
        service.discard_temporary()
        raise UserError(f"cannot listen on {target}: the address is in use or not an address of this machine")
    metrics_address = sessions = None
    try:
        if config.metrics is not None:
            metrics_address = metrics.serve(*parse_hostport(config.metrics, default_host=host))
        if config.session_port is not None:
            sessions = _session_port(service, config, host, metrics, refused)
    except UserError:
        server.stop(None)
        metrics.stop()
        service.discard_temporary()
        raise
    for warning in exposure_warnings(host, config.token, credentials is not None):
        log.warning(warning)
    server.start()
    return App(service, server, (host, bound), credentials is not None, health, metrics, metrics_address, sessions)


def _session_port(service: SplitService, config: ServeConfig, host: str, metrics: Metrics, refused) -> SessionPort:
    tls = server_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    try:
        port = SessionPort(service, host, config.session_port, config.token, tls, metrics, refused)
    except OSError:
        raise UserError(f"cannot listen on {format_hostport((host, config.session_port))} (--session-port): the "
                        "address is in use or not an address of this machine") from None
    service.session_port = port.port
    return port
