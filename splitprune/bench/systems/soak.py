"""Soak: N concurrent training clients against one real `splitprune serve` server on loopback.

The server runs in its own process (with a checkpoint folder, as in production); the clients run in
this process, one thread each, every one its own Train stream on the same shared server half (one
config), doing what `splitprune train --server` does: training steps, an evaluation request and a
server-side checkpoint (CheckpointRequest) at the end of every epoch. It reports failed requests and
the server's resident memory (RSS, from /proc) over time: soak.json, soak.csv, soak.png, soak.md.

    splitprune bench soak --clients 16 --minutes 10

The same against a tier whose replicas are killed: splitprune/bench/tier/soak.py.
"""
from __future__ import annotations

import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.core.profiles import Profile, profile_name
from splitprune.errors import UserError

PROFILES = {  # profile -> (model, training images per client epoch)
    "quick": ("vgg11_bn_compact", 256),
    "paper": ("vgg11_bn", 1024),
}


@dataclass
class ClientStats:
    steps: int = 0
    failed: int = 0
    evaluations: int = 0
    checkpoints: int = 0
    reconnects: int = 0
    errors: list[str] = field(default_factory=list)


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process in MB (Linux /proc), None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _client(index: int, cfg, address: str, batches: list, deadline: float, stats: ClientStats) -> None:
    from splitprune.client.connect import connect
    from splitprune.training.link import OptimizerSettings
    from splitprune.training.setup import build_device_worker

    device, _ = build_device_worker(cfg, 10, 1)
    client_id = f"soak-{index}"
    endpoint = None
    while time.monotonic() < deadline:
        try:
            if endpoint is None:
                endpoint = connect(cfg, address, client_id=client_id, fresh_start=stats.steps == 0)
                device.start_phase(endpoint.link, 0, cfg.budget, OptimizerSettings(0.01, 0.9, 5e-4), True)
            for x, y in batches:
                if time.monotonic() >= deadline:
                    break
                device.train_step(x, y, endpoint.link)
                stats.steps += 1
            else:
                device.predict(batches[0][0], endpoint.link, cfg.budget)
                stats.evaluations += 1
                endpoint.checkpoint(device.step_id)
                stats.checkpoints += 1
        except Exception as exc:  # noqa: BLE001 - every failure is counted, then the client reconnects
            stats.failed += 1
            stats.errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            if endpoint is not None:
                endpoint.close()
            endpoint = None
            stats.reconnects += 1
            time.sleep(0.5)
    if endpoint is not None:
        endpoint.close()


def soak(clients: int, minutes: float, out: Path, profile: str = "quick", sample_s: float = 5.0,
         images_per_epoch: int | None = None) -> dict:
    from splitprune.bench.core.processes import ServeSubprocess, free_port
    from splitprune.config import make_config
    from splitprune.data import make_loaders

    if clients < 1 or minutes <= 0:
        raise UserError(f"soak needs --clients >= 1 and --minutes > 0, got {clients} and {minutes}")
    model, per_epoch = PROFILES[profile]
    per_epoch = images_per_epoch or per_epoch
    cfg = make_config({"method": "ca", "budget": 4, "model": model, "dataset": "fashion-mnist", "epochs": 1,
                       "batch_size": 16, "test_batch_size": 16, "train_subset": per_epoch, "threads": 1, "seed": 0})
    torch.set_num_threads(1)  # 16 client threads share the CPUs: no intra-op threads on top
    train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, 1, cfg.seed,
                               cfg.train_subset, 16, False, 16)
    batches = list(train)  # shared, read-only: the clients differ by their streams, not their data
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="splitprune-soak-") as scratch:
        server = ServeSubprocess(free_port(), "--checkpoint", scratch, "--max-sessions", str(clients), "--quiet",
                               log_path=out / "server.log").start()
        try:
            stats = [ClientStats() for _ in range(clients)]
            start = time.monotonic()
            deadline = start + 60 * minutes
            threads = [threading.Thread(target=_client, args=(i, cfg, server.address, batches, deadline, stats[i]),
                                        name=f"soak-client-{i}", daemon=True) for i in range(clients)]
            for t in threads:
                t.start()
            samples = []
            while True:
                alive = any(t.is_alive() for t in threads)
                samples.append({"seconds": round(time.monotonic() - start, 1), "server_rss_mb": rss_mb(server.proc.pid),
                                "steps": sum(s.steps for s in stats), "failed": sum(s.failed for s in stats)})
                if not alive:
                    break
                time.sleep(min(sample_s, max(0.1, deadline + 30 - time.monotonic())))
            for t in threads:
                t.join(timeout=60)
            exit_code = server.stop()
        finally:
            server.kill()
    return _report(out, clients, minutes, profile, model, samples, stats, exit_code)


def _report(out: Path, clients: int, minutes: float, profile: str, model: str, samples: list[dict],
            stats: list[ClientStats], exit_code: int) -> dict:
    from splitprune.bench.core.plots import figure, save
    from splitprune.bench.core.report import write_csv

    rss = [s["server_rss_mb"] for s in samples if s["server_rss_mb"] is not None]
    span = 60 * minutes

    def quarter(q: int) -> float | None:  # median RSS over one quarter of the run (checkpoint spikes are brief)
        values = sorted(s["server_rss_mb"] for s in samples
                        if s["server_rss_mb"] is not None and q * span / 4 <= s["seconds"] < (q + 1) * span / 4)
        return values[len(values) // 2] if values else None
    summary = {
        "clients": clients, "minutes": minutes, "profile": profile, "model": model,
        "steps": sum(s.steps for s in stats), "failed_requests": sum(s.failed for s in stats),
        "evaluations": sum(s.evaluations for s in stats), "checkpoints": sum(s.checkpoints for s in stats),
        "steps_per_client": [s.steps for s in stats], "server_exit_code": exit_code,
        "server_rss_mb_start": rss[0] if rss else None, "server_rss_mb_max": max(rss) if rss else None,
        "server_rss_mb_end": rss[-1] if rss else None,
        "server_rss_mb_median_by_quarter": [quarter(q) for q in range(4)],
        "server_rss_growth_mb": (quarter(3) - quarter(1)) if quarter(3) and quarter(1) else None,  # 2nd -> 4th
        "errors": [e for s in stats for e in s.errors][:50],
    }
    write_csv(out / "soak.csv", samples)
    fig, (ax_rss, ax_steps) = figure(ncols=2)
    xs = [s["seconds"] / 60 for s in samples]
    ax_rss.plot(xs, [s["server_rss_mb"] for s in samples], marker="o", markersize=3)
    ax_rss.set_xlabel("minutes")
    ax_rss.set_ylabel("server RSS (MB)")
    ax_rss.set_title(f"{clients} clients, one shared server half", fontsize=10)
    ax_steps.plot(xs, [s["steps"] for s in samples], label="training steps")
    ax_steps.plot(xs, [s["failed"] for s in samples], label="failed requests")
    ax_steps.set_xlabel("minutes")
    ax_steps.legend()
    for ax in (ax_rss, ax_steps):
        ax.grid(True, alpha=0.3)
    save(fig, out / "soak.png")
    table = markdown_table(
        ["clients", "minutes", "steps", "failed", "checkpoints", "server RSS start / max / end (MB)",
         "median RSS by quarter (MB)"],
        [[clients, minutes, summary["steps"], summary["failed_requests"], summary["checkpoints"],
          " / ".join(f"{v:.0f}" if v is not None else "n/a" for v in
                     (summary["server_rss_mb_start"], summary["server_rss_mb_max"], summary["server_rss_mb_end"])),
          ", ".join(f"{v:.0f}" if v is not None else "n/a" for v in summary["server_rss_mb_median_by_quarter"])]])
    command = f"splitprune bench soak --profile {profile} --clients {clients} --minutes {minutes:g} --out {out.parent}"
    (out / "soak.md").write_text(f"`{command}`\n\n{table}")
    (out / "command.txt").write_text(command + "\n")
    print(table)
    write_results(out, "soak", {"soak_command": command, **summary, "samples": samples})
    return summary


def run(profile: str | Profile, out: Path, clients: int = 16, minutes: float = 10.0) -> dict:
    """Entry point of `splitprune bench soak [--clients N] [--minutes M]`."""
    profile = profile_name(profile)
    if profile not in PROFILES:
        raise UserError(f"soak has profiles {', '.join(PROFILES)}, not {profile!r}")
    return soak(clients, minutes, out, profile)

