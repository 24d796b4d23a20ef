"""`splitprune bench fuzz`: structured fuzz cases (splitprune/bench/systems/fuzzing.py) against a
`splitprune serve` subprocess; reports INTERNAL errors, crashes and the server's memory over the run,
and whether a normal training run afterwards equals one on a fresh server:

    splitprune bench fuzz                                   # 100,000 cases, bench_results/fuzz/
    python -m splitprune.bench.systems.fuzz --messages 100000 --out bench_results/fuzz
    python -m splitprune.bench.systems.fuzz --messages 100000 --workers 2 --out bench_results/fuzz/100k

With --workers W, W processes each fuzz their own server with messages / W cases (worker k with seed
seed + k, its report in OUT/part-k/), and the merged report is OUT/fuzz.json.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from splitprune.bench.systems.fuzzing import Fuzzer
from splitprune.errors import UserError

if TYPE_CHECKING:
    from splitprune.bench.core.profiles import Profile

# ---------------------------------------------------------------- the benchmark
DEFAULT_MESSAGES = 100_000
CONFIG = dict(model="vgg11_bn_compact", dataset="fashion-mnist", method="ca", epochs=1, train_subset=64,
              test_subset=32, batch_size=16, test_batch_size=32, threads=1, seed=0)


def _train_summary(cfg, address: str | None, out: Path) -> dict:
    from splitprune.client.connect import connect
    from splitprune.training.trainer import Trainer

    endpoint = connect(cfg, address, out=str(out)) if address else None
    try:
        summary = Trainer(cfg, out, endpoint=endpoint, show_progress=False).run()
    finally:
        if endpoint is not None:
            endpoint.close()
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "train_seconds", "transport")}


def soak(messages: int, out: Path, seed: int = 0, warmup: int = 1000) -> dict:
    """`messages` fuzz cases against a `splitprune serve` subprocess; the result row (also written to out)."""
    import tempfile

    from splitprune.bench.core.processes import ServeSubprocess, free_port, memory
    from splitprune.config import make_config

    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(CONFIG)
    rng = random.Random(seed)
    server = ServeSubprocess(free_port(), "--max-models", "2", "--max-sessions", "8",
                           log_path=out / "serve.log").start()
    fuzzer = Fuzzer(server.address, cfg)
    rss, crashed, start = [], None, time.monotonic()
    try:
        for i in range(messages):
            if server.proc.poll() is not None:
                crashed = f"server exited with {server.proc.returncode} after {i} cases"
                break
            fuzzer.run(rng.choice)
            if i % 500 == 499:
                fuzzer.reset()
            if i == warmup or i % 1000 == 0 or i == messages - 1:
                rss.append((i, round(time.monotonic() - start, 1), memory(server.proc.pid).get("VmRSS", 0)))
                if i % 10_000 == 0:
                    print(f"  {i} cases, {fuzzer.messages} messages, server RSS {rss[-1][2] / 2**20:.0f} MiB, "
                          f"statuses {dict(fuzzer.codes)}", flush=True)
        fuzz_seconds = time.monotonic() - start
        (out / "fuzz.partial.json").write_text(json.dumps({  # kept even if the check below fails
            "cases": messages if crashed is None else len(rss), "messages": fuzzer.messages,
            "statuses": dict(fuzzer.codes), "failures": fuzzer.failures[:20], "crashed": crashed,
            "fuzz_seconds": round(fuzz_seconds, 1), "rss_samples": rss}, indent=2))
        fuzzer.end_sessions()
        alive = server.proc.poll() is None
        with tempfile.TemporaryDirectory() as tmp:
            after = _train_summary(cfg, server.address, Path(tmp) / "fuzzed") if alive else None
            fresh_server = ServeSubprocess(free_port()).start()
            try:
                fresh = _train_summary(cfg, fresh_server.address, Path(tmp) / "fresh")
            finally:
                fresh_server.stop()
    finally:
        fuzzer.close()
        exit_code = server.stop()
    base = next((r for r in rss if r[0] >= warmup), rss[0] if rss else (0, 0, 0))
    result = {
        "command": " ".join(["splitprune bench fuzz"] if messages == DEFAULT_MESSAGES else
                            ["python -m splitprune.bench.systems.fuzz", "--messages", str(messages), "--out", str(out)]),
        "cases": messages if crashed is None else len(rss), "messages": fuzzer.messages,
        "statuses": dict(fuzzer.codes), "internal_errors": len(fuzzer.failures), "failures": fuzzer.failures[:20],
        "crashed": crashed, "server_exit_code": exit_code, "fuzz_seconds": round(fuzz_seconds, 1),
        "rss_after_warmup_mib": round(base[2] / 2**20, 1), "rss_end_mib": round(rss[-1][2] / 2**20, 1) if rss else None,
        "rss_growth_mib": round((rss[-1][2] - base[2]) / 2**20, 1) if rss else None,
        "rss_max_growth_mib": round((max(r[2] for r in rss if r[0] >= base[0]) - base[2]) / 2**20, 1) if rss else None,
        "rss_samples": [{"case": i, "seconds": t, "rss_mib": round(b / 2**20, 1)} for i, t, b in rss],
        "training_after_fuzz_equals_fresh": after is not None and after == fresh,
        "targets": {"internal_errors": 0, "crashes": 0, "rss_growth_mib_under": 50},
    }
    (out / "fuzz.json").write_text(json.dumps(result, indent=2))
    print(f"fuzz: {result['cases']} cases ({result['messages']} messages) in {result['fuzz_seconds']} s: "
          f"{result['internal_errors']} INTERNAL, crashed: {crashed or 'no'}, server RSS "
          f"{result['rss_after_warmup_mib']} -> {result['rss_end_mib']} MiB (+{result['rss_growth_mib']}, at most "
          f"+{result['rss_max_growth_mib']}), "
          f"training afterwards equals a fresh server: {result['training_after_fuzz_equals_fresh']}")
    return result


def spread(messages: int, workers: int, out: Path, seed: int = 0) -> dict:
    """`messages` cases over `workers` processes, each against its own server; the merged report."""
    import os
    import subprocess

    out.mkdir(parents=True, exist_ok=True)
    shares = [messages // workers + (k < messages % workers) for k in range(workers)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "splitprune.bench.systems.fuzz", "--messages", str(n),
                               "--seed", str(seed + k), "--out", str(out / f"part-{k}")], env=env)
             for k, n in enumerate(shares)]
    codes = [p.wait() for p in procs]
    parts = [json.loads((out / f"part-{k}" / "fuzz.json").read_text()) for k in range(workers)]
    statuses: dict[str, int] = {}
    for part in parts:
        for code, n in part["statuses"].items():
            statuses[code] = statuses.get(code, 0) + n
    result = {
        "command": f"python -m splitprune.bench.systems.fuzz --messages {messages} --workers {workers} "
                   f"--seed {seed} --out {out}",
        "workers": workers, "worker_exit_codes": codes,
        "cases": sum(p["cases"] for p in parts), "messages": sum(p["messages"] for p in parts),
        "statuses": statuses, "internal_errors": sum(p["internal_errors"] for p in parts),
        "failures": [f for p in parts for f in p["failures"]][:20],
        "crashed": [p["crashed"] for p in parts if p["crashed"]] or None,
        "server_exit_codes": [p["server_exit_code"] for p in parts],
        "fuzz_seconds": max(p["fuzz_seconds"] for p in parts),
        "rss_growth_mib": [p["rss_growth_mib"] for p in parts],
        "rss_max_growth_mib": [p["rss_max_growth_mib"] for p in parts],
        "rss_end_mib": [p["rss_end_mib"] for p in parts],
        "training_after_fuzz_equals_fresh": all(p["training_after_fuzz_equals_fresh"] for p in parts),
        "parts": [f"part-{k}/fuzz.json" for k in range(workers)],
        "targets": parts[0]["targets"],
    }
    (out / "fuzz.json").write_text(json.dumps(result, indent=2))
    print(f"fuzz over {workers} processes: {result['cases']} cases ({result['messages']} messages): "
          f"{result['internal_errors']} INTERNAL, crashed: {result['crashed'] or 'no'}, server RSS growth "
          f"{result['rss_growth_mib']} MiB, training afterwards equals a fresh server: "
          f"{result['training_after_fuzz_equals_fresh']}")
    return result


def run(profile: str | Profile, out: Path, messages: int = DEFAULT_MESSAGES) -> dict:
    """`splitprune bench fuzz [--messages N]`: the quick and paper profiles both send N cases on the CPU."""
    if messages < 1:
        raise UserError(f"--messages >= 1, got {messages}")
    return soak(messages, Path(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help="fuzz cases (one mutated message each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes, each fuzzing its own server")
    p.add_argument("--out", default="bench_results/fuzz")
    args = p.parse_args(argv)
    if args.workers > 1:
        spread(args.messages, args.workers, Path(args.out), args.seed)
    else:
        soak(args.messages, Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
