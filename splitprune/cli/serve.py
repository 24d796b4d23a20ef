"""`splitprune serve`: host server halves for `splitprune train --server` and `splitprune infer --server` clients."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from splitprune.cli import replicas
from splitprune.cli.common import HelpFormatter
from splitprune.errors import UserError
from splitprune.transport.addresses import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(
        name, help="run the server part of split training and split inference (gRPC)", description=(
            "Host the server half of split models over gRPC. Training clients (`splitprune train --server`) "
            "with the same config share one server half; inference clients (`splitprune infer --server`) use "
            "a half trained here or one given with --model. With --checkpoint, state is saved atomically "
            "every --save-every seconds and on SIGTERM / Ctrl-C, and loaded again on start, so clients "
            "resume where they were; the checkpoints clients ask for at epoch ends are kept there too "
            "(without --checkpoint: in a temporary folder, for as long as the server runs). "
            "Binds to loopback unless --listen says otherwise."),
        formatter_class=HelpFormatter)
    p.add_argument("--listen", default=f"{DEFAULT_HOST}:{DEFAULT_PORT}", metavar="HOST:PORT",
                   help="address to listen on (port 0 picks a free one; 0.0.0.0 exposes it to the network)")
    p.add_argument("--checkpoint", metavar="DIR", help="folder for the server's state: resumed on start, "
                                                       "saved periodically and on shutdown, and the clients' "
                                                       "server-side checkpoints")
    p.add_argument("--model", action="append", default=[], metavar="CKPT",
                   help="also host this trained checkpoint (a `splitprune train` run or checkpoint folder) "
                        "for inference; repeatable (default: none)")
    p.add_argument("--token", help=f"require this bearer token from every client (default: ${TOKEN_ENV} when set, "
                                   "else no token)")
    p.add_argument("--tls-cert", help="server certificate (PEM); enables TLS (default: plaintext)")
    p.add_argument("--tls-key", help="server private key (PEM)")
    p.add_argument("--tls-client-ca", help="require client certificates signed by this CA (mutual TLS; default: "
                                           "no client certificates)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads of the server (default: torch's, all cores)")
    p.add_argument("--accelerator", choices=["cpu", "cuda"], default="cpu",
                   help="where the server halves compute (the wire is the same)")
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent training sessions")
    p.add_argument("--max-models", type=int, default=8, help="server halves (distinct configs) hosted at once")
    p.add_argument("--max-message-mb", type=float, default=None,
                   help="largest message accepted, in MiB (default: 64 MiB + 64 KiB, the largest tensor the "
                        "codec writes plus its envelope)")
    p.add_argument("--max-batch", type=int, default=None,
                   help="largest batch one request may carry, training and evaluation alike (default: what fits "
                        "--max-request-mb, at most 4096, for training requests with every forward pass the "
                        "model's objective keeps)")
    p.add_argument("--max-request-mb", type=float, default=256.0,
                   help="memory one request may make the server allocate, in MiB (sizes the default --max-batch)")
    p.add_argument("--batch-window-ms", type=float, default=0.0, metavar="MS",
                   help="stack requests to one model that arrive within MS milliseconds into one server forward "
                        "(inference; training too with --batch-train); 0 = each request alone")
    p.add_argument("--batch-max-samples", type=int, default=None, metavar="N",
                   help="samples in one stacked batch (default: the largest batch of one request, --max-batch)")
    p.add_argument("--batch-train", action="store_true",
                   help="stack training steps too: one optimizer step over the union of the clients' batches "
                        "(docs/protocol.md 3.6); needs --batch-window-ms")
    p.add_argument("--save-every", type=float, default=60.0, metavar="S", help="seconds between periodic saves")
    p.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                   help="drop training streams silent for this long (clients reconnect when they come back)")
    p.add_argument("--keepalive", type=float, default=30.0, metavar="S",
                   help="ping connections after S idle seconds; dead ones are dropped 10 s later")
    p.add_argument("--metrics-port", default="0", metavar="[HOST:]PORT",
                   help="serve Prometheus metrics over HTTP (GET /metrics) on this port, on the --listen host "
                        "unless HOST is given; 0 = off. No authentication: expose it to your Prometheus only")
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    replicas.add_arguments(p)
    p.set_defaults(run=run)


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise UserError(f"{name} must be positive, got {value}")


def _steady_allocator() -> None:
    """glibc only: buffers of 32 MiB or more (state transfers) always come from (and go back to) the OS,
    at most 16 MiB of free heap top is kept, in one arena. By default glibc raises these thresholds after
    large frees and keeps one arena per thread, so a server handling state transfers and varying batches
    on many threads keeps hundreds of MiB it no longer uses. The mmap threshold was 1 MiB (with 4 arenas):
    then the 1-10 MiB convolution workspaces of every multi-sample forward were mapped and zeroed afresh
    on each call, a forward of 2-8 samples 2-3x slower; this costs ~190 MB more resident memory, flat, in
    an 8-client soak (bench_results/scale/README.md). One arena: the steps of a half run one at a time."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        mallopt(-1, 16 << 20)  # M_TRIM_THRESHOLD
        mallopt(-8, 1)         # M_ARENA_MAX


def run(args: argparse.Namespace) -> int:
    if args.replicas is not None:
        return replicas.launch(args)
    import torch

    from splitprune.transport.addresses import format_hostport, parse_hostport
    from splitprune.transport.batching import BatchOptions
    from splitprune.transport.protocol import DEFAULT_MAX_MESSAGE
    from splitprune.transport.server import start_server

    for name in ("max_sessions", "max_models", "max_message_mb", "max_batch", "max_request_mb", "save_every",
                 "idle_timeout", "keepalive"):
        if getattr(args, name) is not None:
            _positive("--" + name.replace("_", "-"), getattr(args, name))
    max_message = DEFAULT_MAX_MESSAGE if args.max_message_mb is None else int(args.max_message_mb * 1024 * 1024)
    if args.threads is not None:
        _positive("--threads", args.threads)
        torch.set_num_threads(args.threads)
    _steady_allocator()
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    token = args.token if args.token is not None else (os.environ.get(TOKEN_ENV) or None)
    metrics = parse_hostport(args.metrics_port, default_host=parse_hostport(args.listen, DEFAULT_HOST)[0])
    listen, checkpoint, tier = replicas.join(args) if args.distributed else (args.listen, args.checkpoint, None)
    handle = start_server(listen, checkpoint=checkpoint, models=tuple(args.model), token=token,
                          tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                          max_sessions=args.max_sessions, max_halves=args.max_models,
                          max_message=max_message, max_batch=args.max_batch,
                          request_memory=int(args.max_request_mb * 1024 * 1024), keepalive_s=args.keepalive,
                          idle_timeout_s=args.idle_timeout, save_every_s=args.save_every,
                          accelerator=args.accelerator, tier=tier,
                          batch=BatchOptions(args.batch_window_ms, args.batch_max_samples, args.batch_train),
                          metrics_listen=format_hostport(metrics) if metrics[1] else None)
    if tier is not None:
        tier.start(handle.service)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    security = ("mutual TLS" if args.tls_client_ca else "TLS") if handle.tls else "plaintext"
    hosted = len(handle.service.halves)
    print(f"splitprune serve: listening on {handle.address} ({security}, "
          f"{'token required' if token else 'no token'}; {hosted} model(s) hosted"
          f"{', state in ' + checkpoint if checkpoint else ', state kept while it runs'}"
          f"{f'; replica {tier.rank} of {tier.world_size}' if tier else ''})", flush=True)
    if handle.metrics_address:
        print(f"splitprune serve: metrics on http://{handle.metrics_address}/metrics", flush=True)
    try:
        while not stop.wait(0.5) and not (tier and tier.down.is_set()):
            pass
    finally:
        print("splitprune serve: stopping: saving state", flush=True)
        if tier is not None:
            tier.leave()
        handle.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    c = handle.service.counters
    print(f"splitprune serve: stopped after {c['steps']} training steps ({c['retried_steps']} retries answered "
          f"from memory), {c['checkpoints']} checkpoints, {c['infer']} inference requests, {c['sessions']} sessions, "
          f"{c['errors']} refused calls",
          flush=True)
    message = tier.exit_message() if tier else None
    if message:
        print(f"splitprune serve: {message}", file=sys.stderr, flush=True)
    return replicas.EXIT_TIER_LOST if tier and tier.failure else 0
