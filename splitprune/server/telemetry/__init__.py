"""What a running server tells the outside: the gRPC health service (health), Prometheus metrics (metrics),
and log lines at a bounded rate (ratelog)."""
