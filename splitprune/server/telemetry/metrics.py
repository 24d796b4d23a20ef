"""Prometheus metrics of a `splitprune serve` server, on their own HTTP port (`serve --metrics-port`).

Each server has its own CollectorRegistry, never the process-wide default one, so several servers in one
process (tests, benchmarks) keep their own counts. Request metrics come from the servicer, which wraps each
request in `Metrics.call`; the service's counters (steps, sessions, checkpoints, ...) and gauges (sessions
attached, halves hosted, draining) are read from it when Prometheus scrapes, so the service is observed
without being edited.

Bytes are encoded gRPC message bytes (requests in, replies out) by the purposes of the client's accounting
(wire/accounting.py): HTTP/2, gRPC and TLS framing are not counted.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from splitprune.errors import ProtocolError, UserError
from splitprune.wire.addresses import format_hostport
from splitprune.wire.refusals import BadTensor, Refusal

if TYPE_CHECKING:
    from splitprune.server.service import SplitService

# request kind -> purpose of its bytes. Kinds: the Train stream's messages by body ("invalid": one that does
# not parse), then the other methods of splitprune.v1.SplitPrune.
PURPOSE = {"hello": "control", "train": "training", "eval": "evaluation", "calibrate": "evaluation", "phase": "control",
           "checkpoint": "control", "invalid": "control", "infer": "evaluation", "describe": "control",
           "fetch_state": "state", "push_state": "state", "infer_open": "control", "infer_item": "evaluation"}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
COUNTER_HELP = {
    "steps": "Training steps applied to a server half",
    "retried_steps": "Retried training steps answered from memory (not applied twice)",
    "sessions": "Training sessions opened",
    "errors": "Calls refused or failed, token refusals included",
    "infer": "Inference requests answered",
    "checkpoints": "Server-side checkpoints saved for clients",
}


def outcome(exc: BaseException | None) -> str:
    """'ok'; the ErrorReason name of a refusal; 'INTERNAL_ERROR'; or 'cancelled' (the client went away)."""
    if exc is None:
        return "ok"
    if isinstance(exc, (grpc.RpcError, GeneratorExit)):
        return "cancelled"
    if isinstance(exc, Refusal):
        return exc.reason
    if isinstance(exc, ProtocolError):  # the servicer refuses the codec's errors as bad tensors
        return BadTensor.reason
    return "INTERNAL_ERROR"


@dataclass
class Call:
    """One request being served; the servicer sets `kind` once the request is parsed, and passes the
    messages of a streamed request (`received`) and of the reply (`reply`) through it to count their bytes."""

    kind: str
    bytes_in: int
    bytes_out: int = 0
    started: float = field(default_factory=time.perf_counter)

    def received(self, data: bytes) -> bytes:
        self.bytes_in += len(data)
        return data

    def reply(self, data: bytes) -> bytes:
        self.bytes_out += len(data)
        return data


class ServiceCollector(Collector):
    """The service's own counters and gauges, read at scrape time."""

    def __init__(self, service: SplitService) -> None:
        self.service = service

    def collect(self):
        for name, value in dict(self.service.counters).items():
            yield CounterMetricFamily(f"splitprune_{name}", COUNTER_HELP.get(name, f"the server's {name!r} counter"),
                                      value=value)
        yield GaugeMetricFamily("splitprune_sessions_attached", "Training streams attached now",
                                value=self.service.attached())
        halves = GaugeMetricFamily("splitprune_halves_hosted", "Server halves hosted, trainable or read-only "
                                                               "(serve --model)", labels=("role",))
        with self.service.halves_lock:
            hosted = list(self.service.halves.values())
        read_only = sum(h.read_only for h in hosted)
        halves.add_metric(("trainable",), len(hosted) - read_only)
        halves.add_metric(("read_only",), read_only)
        yield halves
        yield GaugeMetricFamily("splitprune_draining", "1 once the server stopped taking requests (shutting down)",
                                value=int(self.service.draining))


class Metrics:
    """A server's metrics registry, the servicer's hook into it (`call`), and its optional HTTP endpoint."""

    def __init__(self, service: SplitService) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("splitprune_requests", "Requests by kind and outcome ('ok', an ErrorReason name, "
                                "INTERNAL_ERROR or cancelled)", ("kind", "outcome"), registry=self.registry)
        self.latency = Histogram("splitprune_request_seconds", "Time from a request's arrival to its reply, by kind",
                                 ("kind",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.bytes = Counter("splitprune_message_bytes", "Encoded gRPC message bytes by purpose and direction "
                             "(in: requests, out: replies)", ("purpose", "direction"), registry=self.registry)
        for kind, purpose in PURPOSE.items():  # every series exists from the start, at zero
            self.requests.labels(kind, "ok")
            self.latency.labels(kind)
            for direction in ("in", "out"):
                self.bytes.labels(purpose, direction)
        self.registry.register(ServiceCollector(service))
        self._http = None

    @contextmanager
    def call(self, kind: str, bytes_in: int) -> Iterator[Call]:
        """Time the request in the `with` block and count it with its outcome (the exception leaving the block)."""
        current = Call(kind, bytes_in)
        failure: BaseException | None = None
        try:
            yield current
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.observe(current, outcome(failure))

    def observe(self, call: Call, result: str) -> None:
        self.requests.labels(call.kind, result).inc()
        self.latency.labels(call.kind).observe(time.perf_counter() - call.started)
        purpose = PURPOSE[call.kind]
        self.bytes.labels(purpose, "in").inc(call.bytes_in)
        self.bytes.labels(purpose, "out").inc(call.bytes_out)

    def serve(self, host: str, port: int) -> tuple[str, int]:
        """Expose the registry over HTTP (GET /metrics) on host:port (0: a free port); the address bound."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UserError(f"cannot serve metrics on {format_hostport((host, port))}: {exc.strerror or exc}") from None
        return host, self._http.server_address[1]

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
