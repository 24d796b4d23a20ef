"""`splitprune serve`: host server halves for `splitprune train --server` and `splitprune infer --server` clients."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from splitprune.cli.common import HelpFormatter
from splitprune.flags import add_flags, flag_values
from splitprune.options import field_specs
from splitprune.server.config import REPLICA_SETTINGS, ServeConfig
from splitprune.wire.addresses import TOKEN_ENV



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
    add_flags(p, ServeConfig, [n for n in field_specs(ServeConfig) if n not in REPLICA_SETTINGS])
    add_flags(p, ServeConfig, REPLICA_SETTINGS, title="replicas (torch.distributed; docs/replicas.md)")
    p.set_defaults(run=run)


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
    values = flag_values(args, ServeConfig)
    if "token" not in values and os.environ.get(TOKEN_ENV):
        values["token"] = os.environ[TOKEN_ENV]
    config = ServeConfig(**values)   # every value checked before anything is loaded
    tier_env = None
    if config.distributed:
        from splitprune.server.replicas.rendezvous import TierEnv

        tier_env = TierEnv.from_environ(token=config.token)
    if config.replicas is not None:
        from splitprune.server.replicas.launch import launch

        return launch(config)
    import torch

    from splitprune.server.app import start_app

    if config.threads is not None:
        torch.set_num_threads(config.threads)
    _steady_allocator()
    logging.basicConfig(level=logging.WARNING if config.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tier = None
    if config.distributed:
        from splitprune.server.replicas.launch import join_tier

        config, tier = join_tier(config, tier_env)
    handle = start_app(config, tier)
    if tier is not None:
        tier.start(handle.service)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    security = ("mutual TLS" if config.tls_client_ca else "TLS") if handle.tls else "plaintext"
    hosted = len(handle.service.halves)
    print(f"splitprune serve: listening on {handle.address} ({security}, "
          f"{'token required' if config.token else 'no token'}; {hosted} model(s) hosted"
          f"{', state in ' + config.checkpoint if config.checkpoint else ', state kept while it runs'}"
          f"{f'; replica {tier.rank} of {tier.world_size}' if tier else ''})", flush=True)
    if handle.metrics_address:
        print(f"splitprune serve: metrics on http://{handle.metrics_address}/metrics", flush=True)
    if handle.sessions is not None:
        print(f"splitprune serve: inference sessions on TCP port {handle.sessions.port}", flush=True)
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
          f"{c['errors']} refused calls", flush=True)
    message = tier.exit_message() if tier else None
    if message:
        print(f"splitprune serve: {message}", file=sys.stderr, flush=True)
    return 2 if tier and tier.failure else 0  # refused by its tier (another secret): a user error
