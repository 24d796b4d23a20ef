"""Soak of a tier: N training clients against `serve --replicas R` while one replica is killed (SIGKILL,
in turn) every --kill-every seconds and the launcher restarts it (docs/replicas.md "When a replica dies").

Client i trains on replica i mod R, naming every replica (`--server A,B`), and checkpoints every epoch; a
client whose replica is gone continues at its own step on another replica or on the restarted one; only a
request that fails anyway makes it resume from its last checkpoint on the next replica (as a rerun of
`train` would). The report counts those
reconnects and takeovers, the steps redone, per-minute step latency and each replica's memory:
soak_tier.json / .csv / .png / .md.

    python -m splitprune.bench.tier.soak --replicas 2 --kill-every 120 --clients 16 --minutes 10
"""
from __future__ import annotations

import re
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.systems.soak import PROFILES, rss_mb


@dataclass
class TierClientStats:
    steps: int = 0
    failed: int = 0             # requests that ended in an error (the client then takes over elsewhere)
    evaluations: int = 0
    checkpoints: int = 0
    takeovers: int = 0          # resumed from the last checkpoint on another replica
    redone: int = 0             # steps trained again after a takeover
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, step seconds)
    last_step: int = 0          # the server's last step for this client when it ended
    last_train_step: int = 0    # the device's id of its last training step
    reconnects: int = 0         # to a restarted replica or another one, at its own step
    finished: bool = False
    errors: list[str] = field(default_factory=list)


def _tier_client(index: int, cfg, addresses: list[str], batches: list, start: float, deadline: float,
                 stats: TierClientStats) -> None:
    """Train until the deadline on replica index mod R, naming every replica (its own first): when it is lost the
    run continues on another at its own step (RemoteEndpoint's failover); checkpoint every epoch. Only if a
    request fails anyway, resume from the last checkpoint on the next replica (the device half from its copy
    at that checkpoint), as a rerun of `train` would."""
    import copy

    from splitprune.client.channel import Connection
    from splitprune.client.config import ConnectConfig
    from splitprune.client.connect import connect, make_hello
    from splitprune.client.remote import RemoteEndpoint
    from splitprune.training.link import OptimizerSettings
    from splitprune.training.setup import build_device_worker

    device, _ = build_device_worker(cfg, 10, 1)
    client_id, target = f"soak-{index}", index % len(addresses)
    every = ",".join(addresses[(target + j) % len(addresses)] for j in range(len(addresses)))
    endpoint = connect(cfg, ConnectConfig(server=every, reconnect=60.0), client_id=client_id, fresh_start=True)
    device.start_phase(endpoint.link, 0, cfg.budget, OptimizerSettings(0.01, 0.9, 5e-4), True)
    record, saved, since = None, copy.deepcopy(device), 0
    while time.monotonic() < deadline:
        try:
            if endpoint is None:
                target = (target + 1) % len(addresses)
                hello = make_hello(cfg, client_id, fresh_start=record is None)
                if record is not None:
                    hello.resume_step_id = record.identity["step_id"]
                    hello.resume_state_sha256 = record.identity["state_sha256"]
                endpoint = RemoteEndpoint(Connection(ConnectConfig(server=addresses[target], reconnect=5.0)), hello)
                device = copy.deepcopy(saved)
                if record is None:
                    device.start_phase(endpoint.link, 0, cfg.budget, OptimizerSettings(0.01, 0.9, 5e-4), True)
                stats.takeovers += 1
                stats.redone += since
                since = 0
            for x, y in batches:
                if time.monotonic() >= deadline:
                    break
                t0 = time.monotonic()
                device.train_step(x, y, endpoint.link)
                stats.latencies.append((round(t0 - start, 2), time.monotonic() - t0))
                stats.steps += 1
                stats.last_train_step = device.step_id
                since += 1
            else:
                device.predict(batches[0][0], endpoint.link, cfg.budget)
                stats.evaluations += 1
                record = endpoint.checkpoint(device.step_id)
                saved, since = copy.deepcopy(device), 0
                stats.checkpoints += 1
        except Exception as exc:  # noqa: BLE001 - counted; the client takes over on the next replica
            stats.failed += 1
            stats.errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
            if endpoint is not None:
                stats.reconnects += endpoint.reconnects
                endpoint.close()
            endpoint = None
    if endpoint is not None:
        stats.last_step, stats.finished = endpoint.last_step, True
        stats.reconnects += endpoint.reconnects
        endpoint.close()


def soak_tier(clients: int, minutes: float, out: Path, replicas: int = 2, kill_every: float = 120.0,
              profile: str = "quick", sample_s: float = 5.0) -> dict:
    """`clients` training clients against `serve --replicas N`, one replica killed every `kill_every` s."""
    import os
    import signal

    from splitprune.bench.systems.scale_replicas import start_tier
    from splitprune.config import make_config
    from splitprune.data import make_loaders

    model, per_epoch = PROFILES[profile]
    cfg = make_config({"method": "ca", "budget": 4, "model": model, "dataset": "fashion-mnist", "epochs": 1,
                       "batch_size": 16, "test_batch_size": 16, "train_subset": per_epoch, "threads": 1, "seed": 0})
    torch.set_num_threads(1)
    train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, 1, cfg.seed,
                               cfg.train_subset, 16, False, 16)
    batches = list(train)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tier.log").unlink(missing_ok=True)  # the counts below read this run's log only
    kills: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="splitprune-soak-") as scratch:
        tier, addresses = start_tier(replicas, Path(scratch), "--max-sessions", str(clients), "--max-restarts",
                                     "1000", "--sync-timeout", "20", "--sync-settle", "1",
                                     log_path=out / "tier.log")

        def pids() -> dict[int, int]:
            return {int(r): int(p) for r, p in re.findall(r"replica (\d+) of \d+ at \S+ \(pid (\d+)\)", tier.log())}
        try:
            stats = [TierClientStats() for _ in range(clients)]
            start = time.monotonic()
            deadline = start + 60 * minutes
            threads = [threading.Thread(target=_tier_client, args=(i, cfg, addresses, batches, start, deadline,
                                                                    stats[i]), daemon=True) for i in range(clients)]
            for t in threads:
                t.start()
            samples, next_kill, victim = [], start + kill_every, replicas - 1
            while any(t.is_alive() for t in threads):
                now = time.monotonic()
                if now >= next_kill and now < deadline - 10:
                    pid = pids()[victim]
                    os.kill(pid, signal.SIGKILL)
                    kills.append({"seconds": round(now - start, 1), "replica": victim, "pid": pid})
                    victim, next_kill = (victim - 1) % replicas, next_kill + kill_every
                current = pids()
                samples.append({"seconds": round(now - start, 1), "steps": sum(s.steps for s in stats),
                                "failed": sum(s.failed for s in stats),
                                **{f"replica_{r}_rss_mb": rss_mb(current[r]) for r in sorted(current)}})
                time.sleep(sample_s)
            for t in threads:
                t.join(timeout=60)
            exit_code = tier.stop(timeout=120)
        finally:
            tier.kill()
        log_text = tier.log()
    return _report_tier(out, clients, minutes, replicas, kill_every, profile, model, samples, stats, kills,
                        exit_code, log_text)


def _report_tier(out: Path, clients: int, minutes: float, replicas: int, kill_every: float, profile: str,
                 model: str, samples: list[dict], stats: list[TierClientStats], kills: list[dict], exit_code: int,
                 log_text: str) -> dict:
    import statistics

    from splitprune.bench.core.plots import figure, save
    from splitprune.bench.core.report import write_csv

    def pct(values: list[float], q: float) -> float | None:
        return round(1e3 * sorted(values)[min(len(values) - 1, int(q * len(values)))], 1) if values else None
    per_minute = []
    for m in range(int(minutes + 0.999)):
        lat = [d for s in stats for t, d in s.latencies if m * 60 <= t < (m + 1) * 60]
        rss = {k: [x[k] for x in samples if m * 60 <= x["seconds"] < (m + 1) * 60 and x.get(k)]
               for k in sorted({k for x in samples for k in x if k.endswith("_rss_mb")})}
        per_minute.append({"minute": m + 1, "steps": len(lat), "p50_step_ms": pct(lat, 0.5),
                           "p99_step_ms": pct(lat, 0.99),
                           **{k: round(statistics.median(v), 0) if v else None for k, v in rss.items()}})
    summary = {
        "command": f"python -m splitprune.bench.tier.soak --replicas {replicas} --kill-every {kill_every:g} "
                   f"--clients {clients} --minutes {minutes:g} --out {out}",
        "clients": clients, "minutes": minutes, "replicas": replicas, "kill_every_s": kill_every, "profile": profile,
        "model": model, "kills": kills, "restarts": log_text.count("restarting it"),
        "generations_formed": len(set(re.findall(r"generation (\d+) formed", log_text))),
        "steps": sum(s.steps for s in stats), "errored_requests": sum(s.failed for s in stats),
        "takeovers": sum(s.takeovers for s in stats), "steps_redone": sum(s.redone for s in stats),
        "clients_finished": sum(s.finished for s in stats),
        "checkpoints": sum(s.checkpoints for s in stats), "tier_exit_code": exit_code,
        "per_client": [{"steps": s.steps, "redone": s.redone, "server_last_step": s.last_step,
                        "device_last_step": s.last_train_step, "reconnects": s.reconnects,
                        "takeovers": s.takeovers, "finished": s.finished} for s in stats],
        "reconnects_at_own_step": sum(s.reconnects for s in stats),
        "clients_in_step": sum(s.finished and s.last_step == s.last_train_step for s in stats),
        "per_minute": per_minute, "errors": [e for s in stats for e in s.errors][:40],
    }
    write_csv(out / "soak_tier.csv", per_minute)
    fig, (ax_lat, ax_rss) = figure(ncols=2)
    xs = [m["minute"] for m in per_minute]
    ax_lat.plot(xs, [m["p50_step_ms"] for m in per_minute], marker="o", label="p50")
    ax_lat.plot(xs, [m["p99_step_ms"] for m in per_minute], marker="o", label="p99")
    for k in kills:
        ax_lat.axvline(k["seconds"] / 60 + 1, color="grey", alpha=0.4)
    ax_lat.set_xlabel("minute")
    ax_lat.set_ylabel("training step (ms)")
    ax_lat.legend()
    for r in range(replicas):
        ax_rss.plot(xs, [m.get(f"replica_{r}_rss_mb") for m in per_minute], marker="o", label=f"replica {r}")
    ax_rss.set_xlabel("minute")
    ax_rss.set_ylabel("RSS (MB), median over the minute")
    ax_rss.legend()
    save(fig, out / "soak_tier.png")
    rows = [[m["minute"], m["steps"], m["p50_step_ms"], m["p99_step_ms"],
             *[m.get(f"replica_{r}_rss_mb") for r in range(replicas)]] for m in per_minute]
    table = markdown_table(["minute", "steps", "p50 step (ms)", "p99 step (ms)",
                            *[f"replica {r} RSS (MB)" for r in range(replicas)]], rows)
    (out / "soak_tier.md").write_text(f"`{summary['command']}`\n\n{table}")
    print(table)
    write_results(out, "soak_tier", {**summary})
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--kill-every", type=float, default=120.0, help="seconds between killed replicas")
    p.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    p.add_argument("--out", default="bench_results/soak_tier")
    args = p.parse_args(argv)
    soak_tier(args.clients, args.minutes, Path(args.out), args.replicas, args.kill_every, args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
