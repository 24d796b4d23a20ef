"""What holds the any-budget model's middle budgets back: the device's code, or the server half's training?

    python scripts/anybudget_limits.py [--runs anybudget anybudget_seed1 ca16] [--epochs 2]
                                       [--out bench_results/adaptive/limits.json]

Takes trained bench runs (bench_results/adaptive/runs/NAME/checkpoint), keeps their device half FROZEN, and
trains their server half only, for `--epochs` more epochs over the run's own training images (cosine from
the run's learning rate, the run's optimizer settings). An any-budget run is trained twice from the same
start: with its own objective (the sandwich: a shared server half, the control) and at B=16 only (a server
half dedicated to 16 channels of the same code); a gated run at its own budget (the same extra training
for a dedicated model). Accuracy on the run's held-out validation images through the real codec, before
and after, at the ladder budgets. If a dedicated server half on the frozen any-budget code reaches the
dedicated model's accuracy, the code's first 16 channels carry what 16 channels can; if the shared one
gains as much from the same extra training, what the any-budget model lacks is training, not capacity.
Validation images only; the test set is not touched. Each run takes a few minutes on one thread.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from splitprune.compression.budget import channel_mask, keep_channels  # noqa: E402
from splitprune.data import make_loaders, validation_loader  # noqa: E402
from splitprune.export import load_workers  # noqa: E402
from splitprune.training.evaluation import evaluate_budgets  # noqa: E402
from splitprune.training.objectives import NestedPrefixes, prefix_input  # noqa: E402
from splitprune.training.server_worker import LocalLink  # noqa: E402

LADDER = [1, 2, 4, 8, 16, 32, 64, None]


def server_input(device, z: torch.Tensor, budget: int | None, prefix: bool) -> torch.Tensor:
    """What the server half receives at `budget` (None: all), as it sees it in training (float, no codec)."""
    channels = device.kept_channels(budget)
    kept = keep_channels(z, channels, channel_mask(device.half.gate_logits), device.scaling)
    if channels is None:
        return kept
    if prefix:
        return prefix_input(kept, len(channels), device.channels)
    dense = torch.zeros(z.shape[0], device.channels, *z.shape[2:])
    dense[:, channels] = kept
    return dense


def fine_tune(checkpoint: Path, mode: str, epochs: int) -> dict:
    device, server, cfg, meta, _ = load_workers(str(checkpoint))
    anybudget = cfg.method == "anybudget"
    train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, meta["in_channels"],
                               cfg.seed, cfg.train_subset, 1, validation_size=cfg.validation_size)
    val = validation_loader(cfg.dataset, cfg.data_dir, cfg.input_size, meta["in_channels"], cfg.validation_size,
                            cfg.test_batch_size)
    budgets = LADDER if anybudget else [int(meta["budget"])]

    def accuracy() -> dict:
        results = evaluate_budgets(device, LocalLink(server), val, budgets)
        return {"all" if b is None else str(b): round(100 * r.accuracy, 2) for b, r in results.items()}

    before = accuracy()
    half = server.half
    optimizer = torch.optim.SGD(half.parameters(), lr=cfg.lr_value(), momentum=cfg.momentum_value(),
                                weight_decay=cfg.weight_decay)
    total = epochs * len(train)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * k / max(total, 1))))
    torch.manual_seed(cfg.seed)   # the sandwich's draws
    nested, start = NestedPrefixes("sandwich"), time.time()
    device.half.eval()
    for epoch in range(epochs):
        train.set_epoch(1000 + epoch)   # other orders and augmentations than the run's own epochs
        half.train()
        for x, y in train:
            with torch.no_grad():
                z = device.half(x)
            if mode == "sandwich":
                loss = sum(F.cross_entropy(half(server_input(device, z, b, True), b), y)
                           for b in nested.budgets(device.channels))
            else:
                b = 16 if anybudget else int(meta["budget"])
                loss = F.cross_entropy(half(server_input(device, z, b, anybudget), b if anybudget else None), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return {"mode": mode, "epochs": epochs, "before": before, "after": accuracy(),
            "seconds": round(time.time() - start, 1), "validation_images": len(val.dataset.labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", default=["anybudget", "anybudget_seed1", "ca16"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["sandwich", "dedicated"], choices=["sandwich", "dedicated"],
                        help="what an any-budget run is trained with (a gated run: dedicated only)")
    parser.add_argument("--out", default=str(ROOT / "bench_results/adaptive/limits.json"))
    args = parser.parse_args()
    if args.epochs < 1:
        sys.exit(f"error: --epochs must be at least 1, got {args.epochs}")
    torch.set_num_threads(1)
    out = Path(args.out)
    results = json.loads(out.read_text()).get("results", []) if out.exists() else []
    for name in args.runs:
        checkpoint = ROOT / "bench_results/adaptive/runs" / name / "checkpoint"
        if not (checkpoint / "meta.json").exists():
            sys.exit(f"error: no trained run {checkpoint}: run `splitprune bench adaptive` first")
        anybudget = json.loads((checkpoint / "meta.json").read_text())["config"]["method"] == "anybudget"
        for mode in (args.modes if anybudget else ["dedicated"]):
            result = {"run": name, **fine_tune(checkpoint, mode, args.epochs)}
            print(json.dumps(result), flush=True)
            results = [r for r in results if (r["run"], r["mode"], r["epochs"]) != (name, mode, args.epochs)]
            results.append(result)
            out.write_text(json.dumps({"command": "python scripts/anybudget_limits.py", "results": results},
                                      indent=1))


if __name__ == "__main__":
    main()
