"""The standard gRPC health service (grpc.health.v1.Health) on the serve port, for load balancers and
Kubernetes gRPC probes: SERVING while the server takes requests, NOT_SERVING from the moment it drains.

Statuses are kept for the whole server ("") and for splitprune.v1.SplitPrune. Check answers without the
bearer token (a kubelet's probe sends no metadata, and a status reveals nothing); Watch, which holds a
stream open, needs the token like every other call.
"""
from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from splitprune.wire.envelopes import SERVICE

CHECK_METHOD = f"/{health.SERVICE_NAME}/Check"
SERVICES = (health.OVERALL_HEALTH, SERVICE)


class Health:
    """The health service registered on a (not yet started) gRPC server."""

    def __init__(self, server: grpc.Server) -> None:
        self.servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        for name in SERVICES:
            self.servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    def drain(self) -> None:
        """NOT_SERVING for every service, for good (the server is shutting down)."""
        self.servicer.enter_graceful_shutdown()
