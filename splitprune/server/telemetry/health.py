"""The standard gRPC health service (grpc.health.v1.Health) on the serve port, for load balancers and
Kubernetes gRPC probes: SERVING while the server takes requests, NOT_SERVING from the moment it drains.

Statuses are kept for the whole server ("") and for splitprune.v1.SplitPrune. Check answers without the
bearer token (a kubelet's probe sends no metadata, and a status reveals nothing); Watch, which holds a
stream open, needs the token like every other call. A request that does not parse gets INVALID_ARGUMENT and a
line in a bounded log, never INTERNAL and a traceback (grpc's own deserializer would log one per call).
"""
from __future__ import annotations

import logging
from typing import Callable

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from splitprune.server.telemetry.ratelog import BoundedLog
from splitprune.wire.envelopes import SERVICE

CHECK_METHOD = f"/{health.SERVICE_NAME}/Check"
SERVICES = (health.OVERALL_HEALTH, SERVICE)


class Health:
    """The health service registered on a (not yet started) gRPC server."""

    def __init__(self, server: grpc.Server) -> None:
        self.servicer = health.HealthServicer()
        self._refusals = BoundedLog(logging.getLogger("splitprune.server"), "malformed health requests")
        read, write = _parse, health_pb2.HealthCheckResponse.SerializeToString
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(health.SERVICE_NAME, {
            "Check": grpc.unary_unary_rpc_method_handler(self._checked(self.servicer.Check), read, write),
            "Watch": grpc.unary_stream_rpc_method_handler(self._checked(self.servicer.Watch), read, write),
        }),))
        for name in SERVICES:
            self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    def drain(self) -> None:
        """NOT_SERVING for every service, for good (the server is shutting down)."""
        self.servicer.enter_graceful_shutdown()

    def _checked(self, method: Callable) -> Callable:
        def handle(request: health_pb2.HealthCheckRequest | object, context: grpc.ServicerContext):
            if request is MALFORMED:
                self._refusals("refused a malformed health request from %s", context.peer())
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "malformed grpc.health.v1.HealthCheckRequest")
            return method(request, context)
        return handle


MALFORMED = object()  # grpc takes a None from a deserializer for its own failure (INTERNAL)


def _parse(data: bytes) -> health_pb2.HealthCheckRequest | object:
    try:
        return health_pb2.HealthCheckRequest.FromString(data)
    except DecodeError:
        return MALFORMED
