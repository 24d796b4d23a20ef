"""1 vs 2 server replicas on this machine's CPU (gloo): server samples/s and p50/p99 step latency with
C training clients split across the replicas, and what one synchronisation of the tier costs.

The server runs as real processes (`splitprune serve`, or `splitprune serve --replicas 2`, which
launches two `serve --distributed` replicas); the clients are threads of this process, each its own
Train stream on the shared half, client i on replica i mod R. Each client makes one real device step
to get a TrainRequest, then replays that request with increasing step ids, so the numbers are the
server's (decode, forward, backward, optimizer step, encode; plus the tier's synchronisations) and not
the devices'. Latency is one request's round trip as the client sees it. Both replicas share this
machine's cores (and the clients run on them too): on a 2-core machine two replicas add no compute,
so this measures what the tier costs, not what it gains on separate machines.

    python -m splitprune.bench.systems.scale_replicas --out bench_results/scale
"""
from __future__ import annotations

import argparse
import csv
import re
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from splitprune.bench.core.common import markdown_table, write_results

SYNC_LINE = re.compile(r"replica (\d+) generation (\d+) sync round (\d+): half (\w+), weights .*?, (\d+) values in ([\d.]+) ms, "
                       r"state sha256 ([0-9a-f]{64})")


def bench_config(batch_size: int = 16):
    from splitprune.config import make_config

    return make_config({"method": "ca", "budget": 4, "model": "vgg11_bn_compact", "dataset": "fashion-mnist",
                        "epochs": 1, "batch_size": batch_size, "test_batch_size": batch_size, "train_subset": 64,
                        "threads": 1, "seed": 0})


def first_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    from splitprune.data import make_loaders

    train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, 1, cfg.seed,
                               cfg.train_subset, cfg.test_batch_size, False, cfg.test_batch_size)
    return next(iter(train))


class RecordingLink:
    """A Link that passes requests on and keeps the last TrainRequest sent and its reply."""

    def __init__(self, link) -> None:
        self.link, self.request, self.reply = link, b"", b""

    def train(self, request: bytes) -> bytes:
        self.request = request
        self.reply = self.link.train(request)
        return self.reply

    def evaluate(self, request: bytes) -> bytes:
        return self.link.evaluate(request)

    def start_phase(self, request: bytes) -> bytes:
        return self.link.start_phase(request)


def start_tier(replicas: int, folder: Path, *extra: str, log_path: Path | None = None, port: int | None = None,
               threads: int = 1):
    """`splitprune serve` (replicas == 1) or `serve --replicas N` on free ports from `port` (None: found);
    (the process, the replicas' addresses)."""
    from splitprune.bench.core.processes import ServeSubprocess

    port = port or _free_ports(replicas)
    args = ("--replicas", str(replicas)) if replicas > 1 else ()
    server = ServeSubprocess(port, *args, "--checkpoint", str(folder), "--max-sessions", "64", *extra,
                           log_path=log_path, threads=threads).start(timeout=180)
    addresses = [f"127.0.0.1:{port + r}" for r in range(replicas)]
    wait_listening(addresses, server)
    return server, addresses


def _free_ports(n: int) -> int:
    """A port p with p .. p+n-1 free (asked one after another; another process may take one meanwhile)."""
    from splitprune.bench.core.processes import free_port

    for _ in range(50):
        p = free_port()
        if p + n <= 65535 and all(_is_free(p + i) for i in range(1, n)):  # n == 1: any free port
            return p
    raise RuntimeError(f"no {n} consecutive free ports found")


def _is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_listening(addresses: list[str], server, timeout: float = 180.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    for address in addresses:
        host, port = address.rsplit(":", 1)
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {server.proc.returncode}: {server.log()[-2000:]}")
            try:
                with socket.create_connection((host, int(port)), timeout=0.2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{address} did not listen within {timeout} s") from None
                time.sleep(0.1)


def client_request(cfg, link, batch):
    """One real device step through `link` (phase 0 first); the TrainRequest (protobuf) it sent."""
    from splitprune.proto import pb
    from splitprune.training.link import OptimizerSettings
    from splitprune.training.setup import build_device_worker

    device, _ = build_device_worker(cfg, 10, 1)
    link = link if isinstance(link, RecordingLink) else RecordingLink(link)
    device.start_phase(link, 0, cfg.budget, OptimizerSettings(0.01, 0.9, 5e-4), True)
    device.train_step(*batch, link)
    return pb.TrainRequest.FromString(link.request)


def _client(cfg, address: str, client_id: str, steps: int, batch, start: threading.Barrier, out: dict) -> None:
    from splitprune.client.connect import connect

    endpoint = connect(cfg, address, client_id=client_id, fresh_start=True)
    try:
        req = client_request(cfg, endpoint.link, batch)
        start.wait()
        latencies = []
        for _ in range(steps):
            req.step_id += 1
            data = req.SerializeToString()
            t = time.perf_counter()
            endpoint.train(data)
            latencies.append(time.perf_counter() - t)
        out[client_id] = latencies
    except Exception as exc:  # noqa: BLE001 - reported in the row, never hidden
        out[client_id] = exc
        start.abort()
    finally:
        endpoint.close()


def server_step_ms(cfg, batch, repeats: int = 20) -> float:
    """Median time of one server step in-process (ServerWorker.train on a real request, no network)."""
    from splitprune.training.server_worker import LocalLink
    from splitprune.training.setup import build_workers

    _, server, _ = build_workers(cfg, 10, 1)
    req = client_request(cfg, RecordingLink(LocalLink(server)), batch)
    times = []
    for _ in range(repeats):
        req.step_id += 1
        t = time.perf_counter()
        server.train(req)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def measure(replicas: int, clients: int = 4, steps: int = 60, sync_every: int = 64, batch_size: int = 16,
            threads: int = 1, log_path: Path | None = None) -> dict:
    """One row: `clients` clients, `steps` steps each, against 1 server or a tier of `replicas`, each
    server process with `threads` torch threads."""
    cfg = bench_config(batch_size)
    batch = first_batch(cfg)
    with tempfile.TemporaryDirectory(prefix="splitprune-scale-replicas-") as folder:
        log_path = log_path or Path(folder) / "server.log"
        log_path.unlink(missing_ok=True)
        extra = ("--sync-every", str(sync_every)) if replicas > 1 else ()
        server, addresses = start_tier(replicas, Path(folder), *extra, log_path=log_path, threads=threads)
        try:
            out: dict = {}
            start = threading.Barrier(clients + 1)
            workers = [threading.Thread(target=_client, args=(cfg, addresses[i % replicas], f"bench-{i}", steps,
                                                              batch, start, out), daemon=True)
                       for i in range(clients)]
            for t in workers:
                t.start()
            start.wait()
            t0 = time.perf_counter()
            for t in workers:
                t.join()
            wall = time.perf_counter() - t0
            exit_code = server.stop()
        finally:
            server.kill()
        log = server.log()
    failures = [f"{c}: {v}" for c, v in out.items() if isinstance(v, Exception)]
    if failures or len(out) < clients:
        raise RuntimeError(f"clients failed: {failures or 'missing'}; server log: {log[-2000:]}")
    latencies = sorted(x for v in out.values() for x in v)
    syncs = [float(m.group(6)) for m in SYNC_LINE.finditer(log)]
    return {"replicas": replicas, "threads_per_replica": threads, "clients": clients, "steps_per_client": steps, "batch_size": batch_size,
            "sync_every": sync_every if replicas > 1 else None, "wall_s": round(wall, 2),
            "samples_per_s": round(clients * steps * batch_size / wall, 1),
            "p50_ms": round(1e3 * _quantile(latencies, 0.5), 1), "p99_ms": round(1e3 * _quantile(latencies, 0.99), 1),
            "sync_rounds": len(syncs) // max(1, replicas),
            "sync_ms_median": round(statistics.median(syncs), 1) if syncs else None, "server_exit_code": exit_code}


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def run(out: Path, clients: int = 4, steps: int = 60, sync_every: int = 64, command: str | None = None) -> list[dict]:
    """1 server (1 and 2 torch threads) vs 2 replicas (1 thread each); the rows, also written to
    OUT/replicas.json, .csv and .md. `command`: what to record as the command (default: this process's)."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    cfg = bench_config()
    step_ms = server_step_ms(cfg, first_batch(cfg))
    rows = [measure(r, clients, steps, sync_every, threads=t, log_path=out / f"replicas-{r}-threads-{t}.log")
            for r, t in ((1, 1), (1, 2), (2, 1))]
    for row in rows:
        row["server_step_ms_inprocess"] = round(step_ms, 1)
    with open(out / "replicas.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_results(out, "replicas", {**({"command": command} if command else {}), "rows": rows, "note": (
        "replicas share this machine's CPU cores with each other, with the client threads and with other work "
        "on the machine; one server applies steps one at a time, so with 1 torch thread it uses one core: the "
        "row with 2 threads is the fair single-server baseline for 2 replicas of 1 thread each")})
    (out / "replicas.md").write_text(markdown_table(list(rows[0]), [list(r.values()) for r in rows]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m splitprune.bench.systems.scale_replicas", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench_results/scale"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=60, help="training steps per client")
    p.add_argument("--sync-every", type=int, default=64)
    args = p.parse_args(argv)
    command = "python -m splitprune.bench.systems.scale_replicas " + shlex.join(sys.argv[1:] if argv is None else argv)
    for row in run(args.out, args.clients, args.steps, args.sync_every, command=command):
        print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
