"""Reproducibility beside other tenants (issue 25): one run's digest alone on a server, and the same run
beside N-1 other clients training other halves on one server at the same time:

    python -m splitprune.bench.systems.tenants --tenants 8 --out bench_results/tenants

Every run draws random numbers at every step (any-budget training with random nested budgets), so a
shared random state would show in the digest of its device half and in its accuracy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import threading
import time
from pathlib import Path

CONFIG = {"method": "anybudget", "nested": "random", "train_subset": 48, "test_subset": 16, "batch_size": 8,
          "epochs": 1, "threads": 1, "bn_calibration": 8}


def _run(seed: int, out: Path, server: str) -> dict:
    from splitprune.client.connect import connect
    from splitprune.config import make_config
    from splitprune.training.checkpoint import read_tensors
    from splitprune.training.trainer import Trainer

    cfg = make_config({**CONFIG, "seed": seed})
    endpoint = connect(cfg, server, out=str(out))
    try:
        summary = Trainer(cfg, out, endpoint=endpoint, show_progress=False).run()
    finally:
        endpoint.close()
    digest = hashlib.sha256()
    for key, value in sorted(read_tensors(out / "checkpoint").items()):
        if key.startswith("device."):
            digest.update(key.encode() + value.contiguous().numpy().tobytes())
    return {"seed": seed, "accuracy": summary["final_test_accuracy"], "device_sha256": digest.hexdigest()}


def measure(tenants: int) -> dict:
    import torch

    from splitprune.server.app import start_app
    from splitprune.server.config import ServeConfig

    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        # the servers here run in this process: one thread from the start, as `serve --threads 1` (results are
        # deterministic for a thread count; left at torch's default, the first run's server steps would use
        # the default until the client sets its own, and that run alone would differ)
        torch.set_num_threads(1)
        for name, seeds in (("alone", [0]), ("together", list(range(tenants)))):
            handle = start_app(ServeConfig(listen="127.0.0.1:0"))  # a fresh server for each
            try:
                out: list = [None] * len(seeds)
                start = time.perf_counter()

                def go(i: int, seed: int) -> None:
                    out[i] = _run(seed, Path(tmp) / f"{name}-{seed}", handle.address)

                threads = [threading.Thread(target=go, args=(i, s)) for i, s in enumerate(seeds)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                results[name] = {"runs": out, "seconds": round(time.perf_counter() - start, 1)}
            finally:
                handle.stop(grace=0.5)
    alone, beside = results["alone"]["runs"][0], results["together"]["runs"][0]
    return {"tenants": tenants, **results, "seed0_equal": alone == beside}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--out", default="bench_results/tenants")
    args = p.parse_args(argv)
    result = {"command": f"python -m splitprune.bench.systems.tenants --tenants {args.tenants} --out {args.out}",
              **measure(args.tenants)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "tenants.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("tenants", "seed0_equal")}),
          result["alone"]["runs"][0], result["together"]["runs"][0])
    return 0 if result["seed0_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
