"""Starting the replicas of a tier: `serve --replicas N` launches N local `serve --distributed` processes and
stops them together; `serve --distributed` joins the tier its environment names (torchrun, Kubernetes)."""
from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import subprocess
import sys
import time

from splitprune.errors import UserError
from splitprune.flags import to_argv
from splitprune.server.config import ServeConfig
from splitprune.server.replicas.rendezvous import SECRET_ENV, TierEnv
from splitprune.wire.addresses import format_hostport, parse_hostport

EXIT_TIER_LOST = 3  # a replica that stopped because the tier broke (a peer died or stopped answering)


def replica_listen(listen: str, local_rank: int) -> str:
    host, port = parse_hostport(listen)
    return format_hostport((host, port + local_rank if port else 0))


def join_tier(config: ServeConfig, env: TierEnv):
    """(this replica's config, its Tier): listen on --listen's port + LOCAL_RANK, keep its halves in
    --checkpoint/replica-RANK; the process group is joined."""
    from splitprune.server.replicas.tier import Tier, join_process_group

    own = dataclasses.replace(config, listen=replica_listen(config.listen, env.local_rank),
                              checkpoint=os.path.join(config.checkpoint, f"replica-{env.rank}")
                              if config.checkpoint else None)
    join_process_group(env, config.accelerator, config.sync_timeout)
    tier = Tier(env.rank, env.world_size, sync_every=config.sync_every, max_delay_s=config.sync_max_delay,
                timeout_s=config.sync_timeout)
    return own, tier


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(config: ServeConfig) -> int:
    """Start N replicas as `splitprune serve --distributed` processes; stop them all on SIGTERM / Ctrl-C.
    When one ends the others stop on their own (the tier stands or falls as one); the launcher waits for
    them and returns the highest exit code. It does not restart the tier (torchrun --max-restarts and
    Kubernetes do)."""
    n = config.replicas
    host, port = parse_hostport(config.listen)
    if port == 0:
        raise UserError("--replicas needs an explicit --listen port: replica r listens on that port + r")
    master = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    base = {**os.environ, "WORLD_SIZE": str(n), "MASTER_ADDR": master, "MASTER_PORT": str(_free_port(master)),
            "PYTHONUNBUFFERED": "1"}
    if not base.get(SECRET_ENV) and not config.token:
        base[SECRET_ENV] = secrets.token_hex(32)  # this tier's own, for as long as it runs
    replica = dataclasses.replace(config, replicas=None, distributed=True)
    argv = [sys.executable, "-m", "splitprune", "serve",
            *to_argv(ServeConfig, {f.name: getattr(replica, f.name) for f in dataclasses.fields(replica)})]
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
        deadline = time.monotonic() + config.sync_timeout + 30.0
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
