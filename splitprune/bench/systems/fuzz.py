"""`splitprune bench fuzz`: structured fuzz cases (splitprune/bench/systems/fuzzing.py) against a
`splitprune serve` subprocess; reports INTERNAL errors, crashes and the server's memory over the run,
and whether a normal training run afterwards equals one on a fresh server:

    splitprune bench fuzz                                   # 100,000 cases, bench_results/fuzz/
    python -m splitprune.bench.systems.fuzz --messages 100000 --out bench_results/fuzz
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


def run(profile: str | Profile, out: Path, messages: int = DEFAULT_MESSAGES) -> dict:
    """`splitprune bench fuzz [--messages N]`: the quick and paper profiles both send N cases on the CPU."""
    if messages < 1:
        raise UserError(f"--messages >= 1, got {messages}")
    return soak(messages, Path(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help="fuzz cases (one mutated message each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/fuzz")
    args = p.parse_args(argv)
    soak(args.messages, Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
