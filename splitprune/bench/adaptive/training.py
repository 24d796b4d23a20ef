"""Training through a fading link: `--budget auto` against every fixed budget (part of `bench adaptive`).

Measured, nothing extrapolated: a `splitprune serve` process on loopback, a LinkProxy in front of it that
replays the cellular-fades trace (looped, so every run sees fades however long it takes), and
`splitprune train --server PROXY --method anybudget` in its own process, from scratch, with the same data,
seed and number of steps at every budget. Each run starts the trace from its beginning. Per epoch the
trainer records its training seconds and its accuracy on `test` test images, evaluated through the same
link at the run's budget (auto: the budget of the most steps so far, since an any-budget model only
trains the prefixes it is sent); evaluation time is excluded from the training time.

Time to a common accuracy: the training seconds until a run's per-epoch accuracy first reaches the lowest
best accuracy among the runs (so every run reaches it), interpolated linearly within the epoch.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from splitprune.errors import UserError

TRACE = "cellular-fades"
LOOPS = 20  # the trace repeated: a run longer than the trace sees fades all along


@dataclass(frozen=True)
class Settings:
    """One training per budget; sized so the slowest (all channels through the fades) takes minutes."""

    train_subset: int = 800
    epochs: int = 3
    test_subset: int = 500
    step_ms: float = 1500.0           # --budget auto's per-step latency target (a step computes ~0.4-0.6 s here)
    budgets: tuple[str, ...] = ("1", "4", "16", "64", "all")
    dtype_up: str = "fp16"
    dtype_down: str = "fp16"
    seed: int = 0


def looped_trace(name: str = TRACE, loops: int = LOOPS):
    from splitprune.link.trace import LinkTrace

    trace = LinkTrace.load(name)
    period = trace.duration + (trace.times[1] - trace.times[0] if len(trace.times) > 1 else 1.0)
    rows = [(t + k * period, r * 8 / 1e6, d * 1000)
            for k in range(loops) for t, r, d in zip(trace.times, trace.rates, trace.delays)]
    return LinkTrace.from_rows(rows, name=f"{trace.name} x{loops}")


def train_command(budget: str, server: str, out: Path, s: Settings) -> list[str]:
    cmd = [sys.executable, "-m", "splitprune", "train", "--server", server, "--method", "anybudget",
           "--model", "vgg11_bn_compact", "--dataset", "fashion-mnist", "--train-subset", str(s.train_subset),
           "--epochs", str(s.epochs), "--test-subset", str(s.test_subset), "--dtype-up", s.dtype_up,
           "--dtype-down", s.dtype_down, "--lr-schedule", "cosine", "--seed", str(s.seed), "--threads", "1",
           "--out", str(out)]
    if budget != "all":  # an any-budget run sends all channels unless --budget caps it
        cmd += ["--budget", budget]
    if budget == "auto":
        cmd += ["--step-ms", f"{s.step_ms:g}"]
    return cmd


def read_curve(run: Path) -> list[dict]:
    """Per epoch: cumulative training seconds and test accuracy, from the run's metrics.csv."""
    points, elapsed = [], 0.0
    with open(run / "metrics.csv") as f:
        for row in csv.DictReader(f):
            elapsed += float(row["seconds"])
            points.append({"epoch": int(row["epoch"]), "train_seconds": elapsed,
                           "accuracy": float(row["test_accuracy"]), "bytes_up": int(row["bytes_up"]),
                           "bytes_down": int(row["bytes_down"])})
    return points


def time_to(points: list[dict], target: float) -> float | None:
    previous = {"train_seconds": 0.0, "accuracy": 0.0}
    for p in points:
        if p["accuracy"] >= target:
            span = p["accuracy"] - previous["accuracy"]
            share = 1.0 if span <= 0 else (target - previous["accuracy"]) / span
            return previous["train_seconds"] + share * (p["train_seconds"] - previous["train_seconds"])
        previous = p
    return None


def run_one(budget: str, out: Path, s: Settings) -> list[dict]:
    """One training through a fresh proxy (the trace starts with the run); resumes nothing, reuses a finished run."""
    from splitprune.bench.core.processes import ServeSubprocess, free_port
    from splitprune.link.proxy import LinkProfile, LinkProxy

    run = out / "runs" / f"budget_{budget}"
    if (run / "summary.json").exists():
        return read_curve(run)
    if run.exists():
        import shutil
        shutil.rmtree(run)  # an interrupted run through a link is not resumable in the same conditions
    run.parent.mkdir(parents=True, exist_ok=True)
    server = ServeSubprocess(free_port(), "--accelerator", "cpu", "--idle-timeout", "3600",
                             log_path=out / f"serve_{budget}.log", threads=1).start()
    proxy = LinkProxy(("127.0.0.1", 0), ("127.0.0.1", server.port), LinkProfile(), trace=looped_trace()).start()
    try:
        address = f"127.0.0.1:{proxy.address[1]}"
        cmd = train_command(budget, address, run, s)
        print(f"[adaptive/train] budget {budget}: {' '.join(cmd[2:])}", flush=True)
        start = time.perf_counter()
        with open(out / f"train_{budget}.log", "w") as log:
            done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        if done.returncode != 0:
            raise UserError(f"training at budget {budget} through the {TRACE} link failed; see "
                            f"{out / f'train_{budget}.log'}")
        print(f"[adaptive/train] budget {budget}: {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        proxy.stop()
        server.stop()
    return read_curve(run)


def measure(out: Path, s: Settings = Settings()) -> dict:
    out = Path(out)
    curves = {b: run_one(b, out, s) for b in ("auto", *s.budgets)}
    common = min(max(p["accuracy"] for p in c) for c in curves.values())
    rows = []
    for budget, points in curves.items():
        last = points[-1]
        rows.append({"budget": budget, "final_accuracy": last["accuracy"],
                     "time_to_common_s": time_to(points, common), "train_seconds": last["train_seconds"],
                     "bytes_up": sum(p["bytes_up"] for p in points), "bytes_down": sum(p["bytes_down"] for p in points)})
    fixed = [r for r in rows if r["budget"] != "auto"]
    auto = next(r for r in rows if r["budget"] == "auto")
    fastest = min(fixed, key=lambda r: r["time_to_common_s"])
    best = max(fixed, key=lambda r: r["final_accuracy"])
    return {"settings": s.__dict__, "trace": TRACE, "common_accuracy": common, "rows": rows, "curves": curves,
            "auto": auto, "fastest_fixed": fastest["budget"], "most_accurate_fixed": best["budget"],
            "auto_no_slower": speed_verdict(auto["time_to_common_s"], fastest["time_to_common_s"]),
            "auto_no_less_accurate": auto["final_accuracy"] >= best["final_accuracy"],
            "accuracy_verdict": accuracy_verdict(auto["final_accuracy"], best["final_accuracy"], s.test_subset)}


def speed_verdict(auto: float | None, fastest: float | None) -> str:
    """auto's time to the common accuracy <= the fastest fixed budget's, by the verdict rule; one run each, so
    no noise is counted (a run that never reaches it has no time: not measured)."""
    from splitprune.bench.core.verdict import at_most, interval

    return at_most(interval([auto]), fastest) if fastest is not None else "not measured"


def accuracy_verdict(auto: float, best: float, images: int) -> str:
    """auto >= best with each final accuracy's binomial standard error on `images` test images counted
    against us (splitprune.bench.core.verdict): one seed cannot resolve a gap of less than about two of them."""
    from splitprune.bench.core.verdict import difference, explain, interval

    def noisy(p: float):
        return interval([p], (p * (1 - p) / images) ** 0.5)

    return explain(difference(noisy(auto), noisy(best)), 0.0, "auto - most accurate fixed")
