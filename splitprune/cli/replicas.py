"""`splitprune serve --distributed` (one replica of a tier, under torchrun or Kubernetes) and
`splitprune serve --replicas N` (launch N local replicas and stop them together). docs/replicas.md."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from splitprune.errors import UserError
from splitprune.transport.addresses import format_hostport, parse_hostport

EXIT_TIER_LOST = 3  # a replica that stopped because the tier broke (a peer died or stopped answering)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("replicas (torch.distributed; docs/replicas.md)")
    g.add_argument("--distributed", action="store_true",
                   help="serve as one replica of a tier: join the process group named by RANK, WORLD_SIZE, "
                        "MASTER_ADDR, MASTER_PORT (torchrun, Kubernetes); listen on --listen's port + LOCAL_RANK; "
                        "keep the halves of --checkpoint DIR in DIR/replica-RANK")
    g.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="launch N local replicas (ports --listen's port .. + N-1) and stop them all on Ctrl-C "
                        "(default: one server, this process)")
    g.add_argument("--sync-every", type=int, default=64, metavar="K",
                   help="average the replicas' halves once the tier applied K training steps since the last time")
    g.add_argument("--sync-max-delay", type=float, default=10.0, metavar="S",
                   help="...or once a step has waited S seconds for it")
    g.add_argument("--sync-timeout", type=float, default=60.0, metavar="S",
                   help="a replica that does not answer a collective within S seconds is taken as gone: the tier "
                        "stops (a replica that dies is noticed at once)")


def replica_listen(listen: str, local_rank: int) -> str:
    host, port = parse_hostport(listen)
    return format_hostport((host, port + local_rank if port else 0))


def join(args: argparse.Namespace):
    """(listen address, checkpoint folder, Tier) of this replica; the process group is joined."""
    from splitprune.transport.replicas import Tier, TierEnv, join_process_group

    for name in ("sync_every", "sync_max_delay", "sync_timeout"):
        if not getattr(args, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    env = TierEnv.from_environ()
    listen = replica_listen(args.listen, env.local_rank)
    checkpoint = os.path.join(args.checkpoint, f"replica-{env.rank}") if args.checkpoint else None
    join_process_group(env, args.accelerator, args.sync_timeout)
    tier = Tier(env.rank, env.world_size, sync_every=args.sync_every, max_delay_s=args.sync_max_delay,
                timeout_s=args.sync_timeout)
    return listen, checkpoint, tier


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _serve_argv(args: argparse.Namespace) -> list[str]:
    """The serve options of `args` as a command line, less --replicas, plus --distributed."""
    from splitprune.cli import serve

    sub = argparse.ArgumentParser().add_subparsers()
    serve.add_parser(sub, "serve")
    out = ["--distributed"]
    for action in sub.choices["serve"]._actions:
        if not action.option_strings or action.dest in ("help", "replicas", "distributed"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        option = max(action.option_strings, key=len)
        if isinstance(value, bool):
            out.append(option)
        elif isinstance(value, list):
            for item in value:
                out += [option, str(item)]
        else:
            out += [option, str(value)]
    return out


def launch(args: argparse.Namespace) -> int:
    """Start N replicas as `splitprune serve --distributed` processes; stop them all on SIGTERM / Ctrl-C.
    When one ends the others stop on their own (the tier stands or falls as one); the launcher waits for
    them and returns the highest exit code. It does not restart the tier (torchrun --max-restarts and
    Kubernetes do)."""
    n = args.replicas
    if n < 1:
        raise UserError(f"--replicas must be at least 1, got {n}")
    host, port = parse_hostport(args.listen)
    if port == 0:
        raise UserError("--replicas needs an explicit --listen port: replica r listens on that port + r")
    master = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    base = {**os.environ, "WORLD_SIZE": str(n), "MASTER_ADDR": master, "MASTER_PORT": str(_free_port(master)),
            "PYTHONUNBUFFERED": "1"}
    argv = [sys.executable, "-m", "splitprune", "serve", *_serve_argv(args)]
    procs = []
    for rank in range(n):
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen(argv, env=env, start_new_session=True))  # signals come from here, once
        print(f"splitprune serve: replica {rank} of {n} at {format_hostport((host, port + rank))} "
              f"(pid {procs[-1].pid})", flush=True)
    stopping = []

    def stop(*_):
        stopping.append(True)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while all(p.poll() is None for p in procs) and not stopping:
            time.sleep(0.2)
        if stopping:
            for p in procs:
                p.terminate()
        # a replica that ended breaks the tier: the others notice it themselves, save and stop
        deadline = time.monotonic() + args.sync_timeout + 30.0
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.terminate()
                try:
                    p.wait(30.0)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    codes = [p.returncode for p in procs]
    print(f"splitprune serve: replicas stopped (exit codes {codes})", flush=True)
    return max(abs(c) for c in codes)
