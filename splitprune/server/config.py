"""Every setting of `splitprune serve`, declared once: `serve`'s flags are made from these fields
(splitprune.flags), `start_app` takes the same object, and a value out of its range is one clear message
wherever it comes from (a flag, code, a test)."""
from __future__ import annotations

from dataclasses import dataclass

from splitprune.config import from_source_text
from splitprune.errors import UserError
from splitprune.options import Settings, option
from splitprune.wire.addresses import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV

MIB = 1024 * 1024
MAX_WINDOW_MS = 10_000.0
DEFAULT_REQUEST_MB = 256.0  # memory one request may make the server allocate (sizes the default batch limit)


@dataclass(frozen=True)
class ServeConfig(Settings):
    listen: str = option(f"{DEFAULT_HOST}:{DEFAULT_PORT}", "address to listen on (port 0 picks a free one; 0.0.0.0 "
                         "exposes it to the network)", metavar="HOST:PORT")
    checkpoint: str | None = option(None, "folder for the server's state: resumed on start, saved periodically and "
                                    "on shutdown, and the clients' server-side checkpoints", metavar="DIR",
                                    default_text="a temporary folder, for as long as the server runs")
    model: tuple[str, ...] = option((), "also host this trained checkpoint (a `splitprune train` run or checkpoint "
                                    "folder) for inference; repeatable", metavar="CKPT", repeat=True)
    allow_model: tuple[str, ...] = option((), "also build halves of this model source for clients (the built-in "
                                          "backbones always are): torchvision:NAME, timm:NAME or "
                                          "py:package.module:factory; torchvision:* or timm:* allows all of them. A "
                                          "client never makes the server import anything else; repeatable",
                                          metavar="SOURCE", repeat=True)
    weights: tuple[str, ...] = option((), "a weights file runs may start from (--weights of `train`), matched to a "
                                      "run by its SHA-256; repeatable", metavar="FILE", repeat=True)
    token: str | None = option(None, "require this bearer token from every client",
                               default_text=f"${TOKEN_ENV} when set, else no token")
    tls_cert: str | None = option(None, "server certificate (PEM); enables TLS", metavar="PEM",
                                  default_text="plaintext")
    tls_key: str | None = option(None, "server private key (PEM)", metavar="PEM")
    tls_client_ca: str | None = option(None, "require client certificates signed by this CA (mutual TLS)",
                                       metavar="PEM", default_text="no client certificates")
    session_port: int | None = option(None, "also serve inference sessions on this TCP port of the --listen host: "
                                      "each message framed by its length alone, no HTTP/2 (docs/protocol.md 5.2; "
                                      "port 0 picks a free one; replica r of a tier: PORT + r)", ge=0, le=65535,
                                      metavar="PORT", default_text="off")
    threads: int | None = option(None, "torch CPU threads of the server", ge=1, le=1024,
                                 default_text="torch's, all cores")
    accelerator: str = option("cpu", "where the server halves compute (the wire is the same)", choices=("cpu", "cuda"))
    max_sessions: int = option(16, "concurrent training sessions", ge=1, le=100_000)
    max_models: int = option(8, "server halves (distinct configs) hosted at once", ge=1, le=10_000)
    max_message_mb: float | None = option(None, "largest message accepted, in MiB", gt=0, le=2047,
                                          default_text="64 MiB + 64 KiB, the largest tensor the codec writes plus "
                                                       "its envelope")
    max_batch: int | None = option(None, "largest batch one request may carry, training and evaluation alike",
                                   ge=1, le=4096, default_text="what fits --max-request-mb, at most 4096, for "
                                                               "training requests with every forward pass the "
                                                               "model's objective keeps")
    max_request_mb: float = option(DEFAULT_REQUEST_MB, "memory one request may make the server allocate, in MiB (sizes the "
                                   "default --max-batch)", gt=0, le=1_000_000)
    max_inflight_mb: float | None = option(None, "memory all requests in flight may make the server allocate together, "
                                           "in MiB (admission control across every half and client): a request "
                                           "that does not fit waits up to --admission-wait seconds, then is refused "
                                           "(RESOURCE_EXHAUSTED, SERVER_BUSY)", gt=0, le=10_000_000,
                                           default_text="4 x --max-request-mb")
    admission_wait: float = option(30.0, "how long a request waits for room under --max-inflight-mb", gt=0, le=3600,
                                   metavar="S")
    batch_window_ms: float = option(0.0, "stack requests to one model that arrive within MS milliseconds into one "
                                    "server forward (inference; training too with --batch-train); 0: each request "
                                    "alone", ge=0, le=MAX_WINDOW_MS, metavar="MS")
    batch_max_samples: int | None = option(None, "samples in one stacked batch", ge=1, le=1_000_000, metavar="N",
                                           default_text="the largest batch of one request, --max-batch")
    batch_train: bool = option(False, "stack training steps too: one optimizer step over the union of the clients' "
                               "batches (docs/protocol.md 3.6); needs --batch-window-ms")
    save_every: float = option(60.0, "seconds between periodic saves", gt=0, le=1e9, metavar="S")
    idle_timeout: float = option(600.0, "drop training streams silent for this long (clients reconnect when they "
                                 "come back)", gt=0, le=1e9, metavar="S")
    keepalive: float = option(30.0, "ping connections after S idle seconds; dead ones are dropped 10 s later", gt=0,
                              le=1e6, metavar="S")
    metrics: str | None = option(None, "serve Prometheus metrics over HTTP (GET /metrics) on [HOST:]PORT, on the "
                                 "--listen host unless HOST is given (port 0 picks a free one). No authentication: "
                                 "expose it to your Prometheus only", flag="--metrics-port", metavar="[HOST:]PORT",
                                 default_text="off")
    quiet: bool = option(False, "log warnings only")
    # a tier of replicas (docs/replicas.md)
    distributed: bool = option(False, "serve as one replica of a tier: join the process group named by RANK, "
                               "WORLD_SIZE, MASTER_ADDR, MASTER_PORT (torchrun, Kubernetes); listen on --listen's "
                               "port + LOCAL_RANK; keep the halves of --checkpoint DIR in DIR/replica-RANK")
    replicas: int | None = option(None, "launch N local replicas (ports --listen's port .. + N-1) and stop them all "
                                  "on Ctrl-C", ge=1, le=1024, metavar="N", default_text="one server, this process")
    sync_every: int = option(64, "average the replicas' halves once the tier applied K training steps since the "
                             "last time", ge=1, le=10_000_000, metavar="K")
    sync_max_delay: float = option(10.0, "...or once a step has waited S seconds for it", gt=0, le=1e6, metavar="S")
    sync_timeout: float = option(60.0, "a replica that does not answer a collective within S seconds is taken as "
                                 "gone and the others re-form without it (a replica that dies is noticed at once)",
                                 gt=0, le=1e6, metavar="S")
    sync_settle: float = option(2.0, "when the tier re-forms, how long the first replica waits for the others to "
                                "register", gt=0, le=600, metavar="S")
    max_restarts: int = option(3, "with --replicas: restart a replica that dies, at most R times in all", ge=0,
                               le=1_000_000, metavar="R")

    def allows(self, model: str) -> bool:
        """Whether this server builds halves of `model` for clients."""
        kind, sep, _ = model.partition(":")
        return not sep or model in self.allow_model or (kind != "py" and f"{kind}:*" in self.allow_model)

    def __post_init__(self) -> None:
        super().__post_init__()
        for text in self.allow_model:
            if text not in ("torchvision:*", "timm:*"):
                from_source_text(text)
        if self.batch_train and not self.batch_window_ms:
            raise UserError("--batch-train stacks the steps that arrive within a window: give --batch-window-ms")
        if self.max_inflight_mb is not None and self.max_inflight_mb < self.max_request_mb:
            raise UserError(f"--max-inflight-mb ({self.max_inflight_mb:g}) must be at least --max-request-mb "
                            f"({self.max_request_mb:g}): one request of the largest batch must fit")
        if self.token is not None and not self.token:
            raise UserError("the token must not be empty")

    @property
    def max_message_bytes(self) -> int:
        from splitprune.wire.channels import DEFAULT_MAX_MESSAGE

        return DEFAULT_MAX_MESSAGE if self.max_message_mb is None else int(self.max_message_mb * MIB)

    @property
    def request_bytes(self) -> int:
        return int(self.max_request_mb * MIB)

    @property
    def inflight_bytes(self) -> int:
        return int((self.max_inflight_mb or 4 * self.max_request_mb) * MIB)


# what `serve --help` groups under its own heading
REPLICA_SETTINGS = ("distributed", "replicas", "sync_every", "sync_max_delay", "sync_timeout", "sync_settle",
                    "max_restarts")
