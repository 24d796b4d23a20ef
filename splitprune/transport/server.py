"""The gRPC server: start it, run its housekeeping, stop it. The parts live in their own modules:

- servicer.py: authentication, parsing, dispatch, typed refusals -> status codes (protocol-unaware);
- service.py: sessions on shared halves, phases, steps, evaluation, server-side checkpoints;
- transfer.py: state transfer and split inference;
- sessions.py: the session registry, limits, idle reaping, step ids and retries;
- hosting.py: hosted halves and the per-request memory bound; store.py: saving and loading them;
- validation.py + errors.py: the checks, and one exception class per ErrorReason;
- ratelog.py: per-call log lines at a bounded rate;
- health.py: the standard gRPC health service; metrics.py: Prometheus metrics on their own HTTP port.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from concurrent import futures

import grpc

from splitprune.errors import UserError
from splitprune.transport.addresses import DEFAULT_HOST, format_hostport, parse_hostport
from splitprune.transport.batching import BatchOptions
from splitprune.transport.health import CHECK_METHOD, Health
from splitprune.transport.hosting import DEFAULT_REQUEST_MEMORY
from splitprune.transport.metrics import Metrics
from splitprune.transport.protocol import DEFAULT_MAX_MESSAGE, server_credentials, server_options
from splitprune.transport.service import ServeOptions, SplitService
from splitprune.transport.ratelog import BoundedLog
from splitprune.transport.servicer import Servicer, TokenInterceptor, log_refusal

log = logging.getLogger("splitprune.serve")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def background(service: SplitService, stop: threading.Event) -> None:
    """Periodic saves and idle-session reaping, until `stop` is set."""
    o = service.options
    last_save = time.monotonic()
    while not stop.wait(min(1.0, o.idle_timeout_s / 2, o.save_every_s)):
        service.sessions.reap_idle(o.idle_timeout_s)
        if time.monotonic() - last_save >= o.save_every_s:
            try:
                service.save_all()
            except Exception:  # noqa: BLE001 - a failed save must not kill the server
                log.exception("periodic save failed")
            last_save = time.monotonic()


class ServerHandle:
    """A running server: its address, and a stop() that drains, saves and shuts down."""

    def __init__(self, service: SplitService, server: grpc.Server, address: tuple[str, int], tls: bool,
                 health: Health, metrics: Metrics, metrics_address: tuple[str, int] | None = None) -> None:
        self.service, self.server, self.tls = service, server, tls
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


def start_server(listen: str = f"{DEFAULT_HOST}:0", *, checkpoint: str | None = None, models: tuple[str, ...] = (),
                 token: str | None = None, tls_cert: str | None = None, tls_key: str | None = None,
                 tls_client_ca: str | None = None, max_sessions: int = 16, max_halves: int = 8,
                 max_message: int = DEFAULT_MAX_MESSAGE, max_batch: int | None = None,
                 request_memory: int = DEFAULT_REQUEST_MEMORY, keepalive_s: float = 30.0,
                 idle_timeout_s: float = 600.0, save_every_s: float = 60.0, accelerator: str = "cpu",
                 metrics_listen: str | None = None, tier=None, batch: BatchOptions = BatchOptions()) -> ServerHandle:
    """Start a server in this process (background threads) and return its handle. With `metrics_listen`
    (HOST:PORT, port 0 picks a free one), Prometheus metrics are served over HTTP there. `tier`: a
    replicas.Tier when this server is one replica of a tier (serve --distributed; docs/replicas.md).
    `batch`: how concurrent requests to one half are stacked (docs/protocol.md 3.6)."""
    host, port = parse_hostport(listen, default_host=DEFAULT_HOST)
    if token is not None and not token:
        raise UserError("the token must not be empty")
    if accelerator not in ("cpu", "cuda"):
        raise UserError(f"accelerator must be 'cpu' or 'cuda', got {accelerator!r}")
    if accelerator == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UserError("--accelerator cuda: no CUDA device is available here")
    credentials = server_credentials(tls_cert, tls_key, tls_client_ca)
    options = ServeOptions(checkpoint, tuple(models), max_sessions, max_halves, max_message, max_batch,
                           request_memory, idle_timeout_s, save_every_s, accelerator, batch)
    service = SplitService(options)
    service.tier = tier  # replicas.Tier: set before the first call can arrive
    refusals = BoundedLog(log, "refused calls")

    def refused(what: str, peer: str, refusal) -> None:
        service.count("errors")
        log_refusal(refusals, what, peer, refusal)

    workers = max_sessions + 16
    interceptors = (TokenInterceptor(token, refused, frozenset({CHECK_METHOD})),) if token else ()
    metrics = Metrics(service)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="splitprune-rpc"),
                         handlers=(Servicer(service, refusals, metrics).handler(),), interceptors=interceptors,
                         options=server_options(max_message, keepalive_s), maximum_concurrent_rpcs=4 * workers)
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
    metrics_address = None
    if metrics_listen is not None:
        try:
            metrics_address = metrics.serve(*parse_hostport(metrics_listen, default_host=host))
        except UserError:
            server.stop(None)
            service.discard_temporary()
            raise
    for warning in exposure_warnings(host, token, credentials is not None):
        log.warning(warning)
    server.start()
    return ServerHandle(service, server, (host, bound), credentials is not None, health, metrics, metrics_address)
