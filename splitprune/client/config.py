"""How a client reaches a `splitprune serve` server, declared once: `train`, `infer` and `pull` make their
flags from these fields (splitprune.flags) and hand the same object to the connection."""
from __future__ import annotations

from dataclasses import dataclass

from splitprune.options import Settings, option
from splitprune.wire.addresses import TOKEN_ENV
from splitprune.wire.channels import TlsFiles


@dataclass(frozen=True)
class ConnectConfig(Settings):
    server: str | None = option(None, "a `splitprune serve` server, or the replicas of a tier, comma-separated: "
                                "when the one in use is lost, the run continues on the next",
                                metavar="HOST:PORT[,HOST:PORT...]", default_text="train in-process")
    token: str | None = option(None, "bearer token for the server", default_text=f"${TOKEN_ENV}")
    tls_ca: str | None = option(None, "CA certificate to verify the server (enables TLS)", metavar="PEM")
    tls_cert: str | None = option(None, "client certificate for mutual TLS", metavar="PEM")
    tls_key: str | None = option(None, "client key for mutual TLS", metavar="PEM")
    measure_socket: bool = option(False, "also count the bytes on the TCP socket, through an in-process relay (it "
                                  "adds latency); without it every message is counted, framing and connection "
                                  "setup are not")
    step_timeout: float = option(300.0, "seconds a request (a step, an evaluation, an inference request) may wait "
                                 "for its reply; later, the stream counts as broken and the request is retried",
                                 gt=0, le=86_400, metavar="S")
    reconnect: float = option(120.0, "seconds to keep reconnecting to a server that went away (a restarted server or "
                              "replica tier is back within it: the run goes on)", gt=0, le=86_400, metavar="S")
    connect_timeout: float = option(20.0, "seconds to wait for the server when the command starts", gt=0,
                                    le=86_400, metavar="S")

    @property
    def tls(self) -> TlsFiles | None:
        if self.tls_ca or self.tls_cert or self.tls_key:
            return TlsFiles(self.tls_ca, self.tls_cert, self.tls_key)
        return None
