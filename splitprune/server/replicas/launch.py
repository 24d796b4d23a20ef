"""Starting the replicas of a tier: `serve --replicas N` serves the tier's store, launches N local
`serve --distributed` processes, restarts one that dies and stops them together; `serve --distributed`
joins the tier its environment names (torchrun, Kubernetes)."""
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


def replica_listen(listen: str, local_rank: int) -> str:
    host, port = parse_hostport(listen)
    return format_hostport((host, port + local_rank if port else 0))


def join_tier(config: ServeConfig, env: TierEnv):
    """(this replica's config, its Tier): listen on --listen's port + LOCAL_RANK (and --session-port's + LOCAL_RANK
    when given), keep its halves in
    --checkpoint/replica-RANK and its clients' checkpoints in --checkpoint/checkpoints (shared by the
    replicas: any of them can resume any client); the first generation is formed."""
    from splitprune.server.replicas.tier import Tier, join_tier_membership

    session_port = config.session_port + env.local_rank if config.session_port else config.session_port
    own = dataclasses.replace(config, listen=replica_listen(config.listen, env.local_rank), session_port=session_port,
                              checkpoint=os.path.join(config.checkpoint, f"replica-{env.rank}")
                              if config.checkpoint else None)
    membership = join_tier_membership(env, config.accelerator, config.sync_timeout, config.sync_settle)
    tier = Tier(membership, sync_every=config.sync_every, max_delay_s=config.sync_max_delay,
                timeout_s=config.sync_timeout)
    tier.shared_checkpoints = os.path.join(config.checkpoint, "checkpoints") if config.checkpoint else None
    return own, tier


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(config: ServeConfig) -> int:
    """Serve the tier's store and start N replicas as `splitprune serve --distributed` processes; restart a
    replica that dies (at most --max-restarts times in all) while the others go on serving; stop them all
    on SIGTERM / Ctrl-C and return the highest exit code."""
    from splitprune.server.replicas.rendezvous import HOSTED_ENV, serve_store

    n = config.replicas
    host, port = parse_hostport(config.listen)
    if port == 0:
        raise UserError("--replicas needs an explicit --listen port: replica r listens on that port + r")
    master = "127.0.0.1" if host in ("0.0.0.0", "::", "localhost") else host
    base = {**os.environ, "WORLD_SIZE": str(n), "MASTER_ADDR": master, "MASTER_PORT": str(_free_port(master)),
            "PYTHONUNBUFFERED": "1", HOSTED_ENV: "client"}
    if not base.get(SECRET_ENV) and not config.token:
        base[SECRET_ENV] = secrets.token_hex(32)  # this tier's own, for as long as it runs
    secret = TierEnv.from_environ({**base, "RANK": "0"}, token=config.token).secret
    store = serve_store(master, int(base["MASTER_PORT"]), secret, config.sync_timeout, n)
    replica = dataclasses.replace(config, replicas=None, distributed=True)
    argv = [sys.executable, "-m", "splitprune", "serve",
            *to_argv(ServeConfig, {f.name: getattr(replica, f.name) for f in dataclasses.fields(replica)})]

    def start(rank: int) -> subprocess.Popen:
        env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
        proc = subprocess.Popen(argv, env=env, start_new_session=True)  # signals come from here, once
        sessions = f", sessions on port {config.session_port + rank}" if config.session_port else ""
        print(f"splitprune serve: replica {rank} of {n} at {format_hostport((host, port + rank))}{sessions} "
              f"(pid {proc.pid})", flush=True)
        return proc

    procs = {rank: start(rank) for rank in range(n)}
    gone: dict[int, int] = {}  # replicas not restarted: their exit codes
    restarts, stopping = 0, []

    def stop(*_):
        stopping.append(True)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while procs and not stopping:
            for rank, p in list(procs.items()):
                if p.poll() is None:
                    continue
                if p.returncode not in (0, 2) and restarts < config.max_restarts:  # 2: a user error, say it once
                    restarts += 1
                    print(f"splitprune serve: replica {rank} ended (exit code {p.returncode}); restarting it "
                          f"({restarts} of --max-restarts {config.max_restarts}); the others go on serving",
                          flush=True)
                    procs[rank] = start(rank)
                else:
                    gone[rank] = p.returncode
                    del procs[rank]
                    print(f"splitprune serve: replica {rank} ended (exit code {p.returncode}) and is not restarted"
                          f"{'' if p.returncode in (0, 2) else ' (--max-restarts spent)'}", flush=True)
            time.sleep(0.2)
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(config.sync_timeout + 30.0)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    del store  # served for as long as the replicas ran
    codes = [gone[r] if r in gone else procs[r].returncode for r in range(n)]
    print(f"splitprune serve: replicas stopped (exit codes {codes}; {restarts} restarts)", flush=True)
    return max(abs(c) for c in codes)
