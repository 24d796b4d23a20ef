"""The tier's rendezvous is shut (issue 25 item 2): real replicas' process groups (gloo) on loopback, their
listening sockets read from the kernel, and joiners with the wrong secret or a plain TCPStore refused."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from datetime import timedelta


from splitprune.server.replicas.rendezvous import SECRET_ENV

JOIN = """
import sys, torch, torch.distributed as dist
from splitprune.errors import UserError
from splitprune.server.replicas.rendezvous import TierEnv
from splitprune.server.replicas.tier import join_tier_membership
try:
    membership = join_tier_membership(TierEnv.from_environ(), "cpu", 15.0, settle_s=float(sys.argv[1]))
except UserError as exc:
    print(exc, flush=True)
    sys.exit(2)
t = torch.tensor([float(membership.replica_id + 1)])
dist.all_reduce(t)
print("sum", int(t.item()), flush=True)
sys.stdin.read()  # stay up (sockets open) until the test closes stdin
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replica(rank: int, port: int, secret: str, settle_s: float = 3.0) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), SECRET_ENV: secret, "OMP_NUM_THREADS": "1"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    return subprocess.Popen([sys.executable, "-c", JOIN, str(settle_s)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket the process listens on, from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    host, port = cols[1].split(":")
                    raw = bytes.fromhex(host)
                    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                    family = socket.AF_INET if width == 4 else socket.AF_INET6
                    out.append((socket.inet_ntop(family, words), int(port, 16)))
    return out


def test_the_tier_binds_only_where_told_and_forms_with_the_secret():
    port, secret = _free_port(), "a" * 32
    procs = [_replica(r, port, secret) for r in range(2)]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["sum 3", "sum 3"]
        listening = {r: _listening(p.pid) for r, p in enumerate(procs)}
        assert ("127.0.0.1", port) in listening[0]                      # the store, on MASTER_ADDR
        assert all(len(v) >= 1 for v in listening.values())             # gloo's own listeners
        assert all(addr == "127.0.0.1" for v in listening.values() for addr, _ in v), listening
    finally:
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(30)
    assert [p.returncode for p in procs] == [0, 0]


def test_a_joiner_with_another_secret_is_refused():
    """Replica 0 serves the store and signs its check value: the joiner with another secret stops with one line
    before it registers; replica 0 forms the tier without it."""
    port = _free_port()
    good = _replica(0, port, "a" * 32, settle_s=8.0)
    bad = _replica(1, port, "b" * 32)
    try:
        out = bad.communicate("", timeout=60)[0]
        assert good.stdout.readline().strip() == "sum 1"  # alone: the joiner never counted
    finally:
        for p in (good, bad):
            p.kill()
    assert bad.returncode == 2, out
    assert "is not signed with this tier's secret" in out and "SPLITPRUNE_TIER_SECRET" in out, out
    assert "Traceback" not in out


def test_a_plain_store_client_cannot_join_or_redirect_a_replica():
    """What the issue did by hand: a TCPStore client connects and writes the keys a joiner would (a registration
    as replica 1, a member list, gloo's address of rank 1). Replica 0 refuses the values it cannot verify, says
    so, and forms the tier without the intruder."""
    import torch.distributed as dist

    port = _free_port()
    replica = _replica(0, port, "a" * 32, settle_s=8.0)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                intruder = dist.TCPStore("127.0.0.1", port, 2, False, timedelta(seconds=5))
                break
            except (RuntimeError, dist.DistStoreError):
                assert time.monotonic() < deadline and replica.poll() is None, replica.stdout.read()
                time.sleep(0.2)
        for _ in range(100):  # replica 0 registered for generation 1
            if intruder.check(["g1/member/0"]):
                break
            time.sleep(0.1)
        intruder.add("g1/count", 1)
        intruder.set("g1/member/1", b"forged")
        intruder.set("g1/pg/1", b"forged")
        lines = [replica.stdout.readline().strip()]
        while lines[-1] and lines[-1] != "sum 1":
            lines.append(replica.stdout.readline().strip())
        assert lines[-1] == "sum 1", lines
        assert "replica 0: refused a registration as replica 1 for generation 1: not signed with this tier's " \
               "secret" in lines
        replica.stdin.close()
        out = "\n".join(lines) + replica.stdout.read()
        replica.wait(30)
    finally:
        replica.kill()
    assert replica.returncode == 0, out
    assert "Traceback" not in out
