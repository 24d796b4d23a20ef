"""What the rate term adds to a training step (issue 24: <= 5 %): ca B=4, r=2 on the quick profile's model, one
torch thread, in-process (both halves, LocalLink), the same batches; steps without and with `--rate-lambda`
alternate (ABAB...) so that drift of the machine falls on both alike; medians of each.

    python scripts/rate_cost.py --steps 40 --out bench_results/entropy/rate_cost.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rate", type=float, default=0.03)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from splitprune.config import make_config
    from splitprune.data import make_loaders
    from splitprune.training.link import OptimizerSettings
    from splitprune.training.server_worker import LocalLink
    from splitprune.training.setup import build_workers

    torch.set_num_threads(1)
    workers = {}
    for rate in (0.0, args.rate):
        cfg = make_config({"method": "ca", "budget": 4, "resolution": 2, "model": "vgg11_bn_compact",
                           "dataset": "fashion-mnist", "batch_size": 16, "train_subset": 512, "threads": 1,
                           "rate_lambda": rate})
        device, server, _ = build_workers(cfg, 10, 1)
        link = LocalLink(server)
        device.start_phase(link, 0, 4, OptimizerSettings(0.01, 0.0, 5e-4), True)
        workers[rate] = (device, link)
    train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, 16, cfg.input_size, 1, 0, 512, 16, False, 16)
    batches = list(train)
    times = {rate: [] for rate in workers}
    for i in range(args.steps):
        x, y = batches[i % len(batches)]
        for rate, (device, link) in workers.items():
            start = time.perf_counter()
            device.train_step(x, y, link)
            times[rate].append(time.perf_counter() - start)
    warm = 5
    base, rated = (statistics.median(times[r][warm:]) for r in workers)
    result = {"command": f"python scripts/rate_cost.py --steps {args.steps} --rate {args.rate:g} --out {args.out}",
              "steps_each": args.steps, "warmup_left_out": warm, "median_step_ms_without": round(1e3 * base, 2),
              "median_step_ms_with_rate_term": round(1e3 * rated, 2), "added_percent": round(100 * (rated / base - 1), 2),
              "target_percent": 5}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
