"""Scale: server samples/s and request latency for 1, 4, 8, 16 concurrent clients, one request at a time
against request batching (serve --batch-window-ms W --batch-train).

Two real `splitprune serve` processes run side by side on loopback (one without batching, one with it,
each with one torch thread); the clients are threads of this process, each with its own gRPC channel and
its own Train stream or Infer calls, sending back to back (a closed loop). Threads rather than processes:
on a 2-core machine the server takes one core and the clients the other, and a client thread spends its
time in gRPC's C core, outside the GIL; the client process's CPU use is recorded to show whether it kept
up. Cells of the two servers alternate, so a change in machine load falls on both. Workloads, all with
the `ca` method's B=4 fp16 uplink and a fp32 downlink (vgg11_bn_compact, Fashion-MNIST activations from the
device half): Infer requests of 1 and of 4 samples, and training steps of 8 samples.

    splitprune bench scale [--accelerator cuda]     -> bench_results/scale/scale.{json,csv,md,png}

Rows of other server layouts (e.g. 1 vs 2 replicas) join the same table and plot with
scale_report.merge_rows().
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from splitprune.bench.core.profiles import Profile, profile_name
from splitprune.bench.systems.scale_report import report
from splitprune.errors import UserError

CLIENTS = (1, 4, 8, 16)
WORKLOADS = {  # name -> (kind, samples per request)
    "infer-1": ("infer", 1),
    "infer-4": ("infer", 4),
    "train-8": ("train", 8),
}
PROFILES = {  # profile -> (model, dataset, warm-up s, measured s per cell, repeats)
    "quick": ("vgg11_bn_compact", "fashion-mnist", 0.5, 3.0, 3),
    "paper": ("vgg11_bn", "cifar10", 1.0, 5.0, 3),
}
WINDOW_MS = 2.0
MODES = {"alone": (), "batched": ("--batch-window-ms", str(WINDOW_MS), "--batch-train")}


@dataclass
class Cell:
    """One measurement: a workload, a number of clients, a server (mode), one repeat."""

    workload: str
    clients: int
    mode: str
    repeat: int
    samples_per_s: float
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    failed: int
    client_cpu: float   # CPU seconds of this (client) process per wall second
    server_cpu: float   # the same for the server process
    samples_per_cpu_s: float  # samples per CPU second of the server: what it does with the CPU it gets
    load1: float        # the machine's 1-minute load average after the cell
    replicas: int = 1


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Workload:
    """Pre-encoded requests for one workload and the client loop that sends them."""

    def __init__(self, cfg, address: str, kind: str, samples: int, activations, labels) -> None:
        self.cfg, self.address, self.kind, self.samples = cfg, address, kind, samples
        self.activations, self.labels = activations, labels
        self.closers: list[Callable[[], None]] = []

    def client(self, index: int) -> Callable[[], float]:
        """Open one client; a function sending one request and returning its latency in seconds."""
        from splitprune.client.connect import connect
        from splitprune.client.inference import InferenceClient
        from splitprune.proto import pb

        if self.kind == "infer":
            conn = InferenceClient(self.address, self.cfg.fingerprint())
            data = pb.EvalRequest(request_id=1, activations=self.activations).SerializeToString()
            self.closers.append(conn.close)

            def infer() -> float:
                start = time.perf_counter()
                conn.infer(data, self.cfg.budget)
                return time.perf_counter() - start
            return infer
        endpoint = connect(self.cfg, self.address, client_id=f"scale-{index}", fresh_start=True)
        endpoint.start_phase(phase_request())
        self.closers.append(endpoint.close)
        step = pb.TrainRequest(activations=self.activations, labels=self.labels)

        def train() -> float:
            step.step_id += 1
            data = step.SerializeToString()
            start = time.perf_counter()
            endpoint.train(data)
            return time.perf_counter() - start
        return train


def phase_request() -> bytes:
    from splitprune.proto import pb

    return pb.PhaseRequest(phase=0, budget=4, lr=0.01, momentum=0.9, weight_decay=5e-4).SerializeToString()


def measure_cell(work: Workload, clients: int, warmup_s: float, measure_s: float, server_pid: int) -> dict:
    """`clients` threads send back to back for warmup_s + measure_s; what completed in the measured span."""
    senders = [work.client(1000 * clients + i) for i in range(clients)]
    done: list[list[tuple[float, float]]] = [[] for _ in range(clients)]
    failures = [0] * clients
    start_barrier = threading.Barrier(clients + 1)
    t0 = 0.0

    def loop(i: int) -> None:
        start_barrier.wait()
        while time.perf_counter() < t0 + warmup_s + measure_s:
            try:
                latency = senders[i]()
                done[i].append((time.perf_counter(), latency))
            except Exception:  # noqa: BLE001 - counted; the table shows failed requests
                failures[i] += 1
                time.sleep(0.01)

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    start_barrier.wait()
    time.sleep(warmup_s)
    cpu0, server0, wall0 = time.process_time(), _cpu_seconds(server_pid), time.perf_counter()
    for t in threads:
        t.join(warmup_s + measure_s + 120)
    cpu1, server1, wall1 = time.process_time(), _cpu_seconds(server_pid), time.perf_counter()
    for close in work.closers:
        close()
    lo, hi = t0 + warmup_s, t0 + warmup_s + measure_s
    latencies = [lat for per in done for end, lat in per if lo <= end <= hi]
    server_cpu = (server1 - server0) / (wall1 - wall0)
    samples_per_s = len(latencies) * work.samples / measure_s
    return {"samples_per_s": samples_per_s, "requests_per_s": len(latencies) / measure_s,
            "p50_ms": 1e3 * percentile(latencies, 0.5), "p99_ms": 1e3 * percentile(latencies, 0.99),
            "failed": sum(failures), "client_cpu": (cpu1 - cpu0) / (wall1 - wall0), "server_cpu": server_cpu,
            "samples_per_cpu_s": samples_per_s / server_cpu if server_cpu > 0 else float("nan"),
            "load1": os.getloadavg()[0]}


def _inputs(cfg, samples: int):
    """Real Fashion-MNIST test images through the device half: the kept channels, encoded; the labels."""
    from splitprune.compression import ChannelCodec, encode_labels
    from splitprune.data import make_loaders
    from splitprune.training.setup import build_device_worker

    _, test, classes = make_loaders(cfg.dataset, cfg.data_dir, 8, cfg.input_size, 1, cfg.seed, 8, 16, False, 16)
    x, y = next(iter(test))
    device, _ = build_device_worker(cfg, classes, 1)
    with torch.no_grad():
        z = device.half.eval()(x[:samples])
    channels = device.kept_channels(cfg.budget)
    kept = z[:, channels]
    return ChannelCodec(cfg.dtype_up).compress(kept, channels, z.shape[1]), encode_labels(y[:samples])


def scale(out: Path, profile: str = "quick", accelerator: str = "cpu", data_dir: str | None = None) -> list[Cell]:
    from splitprune.bench.core.processes import ServeSubprocess, free_port
    from splitprune.client.connect import connect
    from splitprune.config import make_config

    model, dataset, warmup_s, measure_s, repeats = PROFILES[profile]
    cfg = make_config({"method": "ca", "budget": 4, "model": model, "dataset": dataset, "epochs": 1,
                       "batch_size": 8, "test_batch_size": 8, "threads": 1, "seed": 0,
                       "data_dir": data_dir})
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    servers = {}
    cells: list[Cell] = []
    try:
        for mode, flags in MODES.items():
            servers[mode] = ServeSubprocess(free_port(), "--max-sessions", str(2 * max(CLIENTS) + 2), "--quiet",
                                          "--accelerator", accelerator, *flags,
                                          log_path=out / f"server-{mode}.log").start()
            owner = connect(cfg, servers[mode].address, client_id="scale-owner", fresh_start=True)
            owner.start_phase(phase_request())  # the half exists from here on
            owner.close()
        for name, (kind, samples) in WORKLOADS.items():
            activations, labels = _inputs(cfg, samples)
            for clients in CLIENTS:
                for repeat in range(repeats):
                    for mode, server in servers.items():
                        work = Workload(cfg, server.address, kind, samples, activations, labels)
                        row = measure_cell(work, clients, warmup_s, measure_s, server.proc.pid)
                        cells.append(Cell(name, clients, mode, repeat, **row))
                        print(f"{name:8s} {clients:2d} clients {mode:8s} #{repeat}: "
                              f"{row['samples_per_s']:8.1f} samples/s, p50 {row['p50_ms']:6.1f} ms, "
                              f"p99 {row['p99_ms']:6.1f} ms, failed {row['failed']}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
            server.kill()
    return cells


def uptime() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run(profile: str | Profile, out: Path, accelerator: str = "cpu") -> dict:
    """Entry point of `splitprune bench scale [--accelerator cuda] [--data-dir DIR]`."""
    data_dir = profile.data_dir if isinstance(profile, Profile) else None
    profile = profile_name(profile)
    if profile not in PROFILES:
        raise UserError(f"scale has profiles {', '.join(PROFILES)}, not {profile!r}")
    before = uptime()
    cells = scale(out, profile, accelerator, data_dir)
    command = f"splitprune bench scale --profile {profile}" + (
        f" --accelerator {accelerator}" if accelerator != "cpu" else "") + f" --out {out.parent}"
    meta = {"scale_command": command, "uptime_before": before, "uptime_after": uptime(), "profile": profile,
            "window_ms": WINDOW_MS, "accelerator": accelerator,
            "clients_are": "threads of one process, one gRPC channel each (see the module docstring)"}
    result = report(out, [vars(c) for c in cells], meta)
    if accelerator == "cpu":  # 1 vs 2 replicas (gloo): replicas.{json,csv,md} beside the batching results
        from splitprune.bench.systems import scale_replicas
        scale_replicas.run(out, clients=4, steps=40, command=command)
    return result
