"""Would the server read the entropy-coded grid better at each level's training-set mean than at its grid value?

    python scripts/reconstruction_probe.py \
        --runs bench_results/entropy/runs/ca4_r2_seed0,bench_results/entropy/runs/ca4_r2_seed1 \
        --out bench_results/entropy/reconstruction.json

For each run's final model at its trained budget: the values every kept channel sends on 10,000 training
images (a seeded, class-stratified choice), their means per channel and grid level (the centroids), and the
accuracy on the 2,000 validation images of the server half fed the values as sent (fp32), rounded to the
grid of L+1 levels and read back as q / L (what dtypes ec3 / ec7 decode to), or read back as the centroid of
level q. A probe: no configuration is chosen from it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from splitprune.bench.core.report import load_profile  # noqa: E402
from splitprune.bench.paper.entropy import _loader  # noqa: E402
from splitprune.bench.paper.measure import load_model  # noqa: E402
from splitprune.compression import channel_mask, keep_channels  # noqa: E402
from splitprune.data import calibration_batches, make_loaders  # noqa: E402
from splitprune.training.setup import input_channels  # noqa: E402

GRIDS = (3, 7)


@torch.no_grad()
def probe(run: Path) -> dict:
    model = load_model(run / "checkpoint")
    device, server, cfg = model.device, model.server, model.cfg
    device.half.eval()
    server.half.eval()
    kept = device.kept_channels(model.budget)
    mask = channel_mask(device.half.gate_logits)
    train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, 256, cfg.input_size, input_channels(cfg), cfg.seed,
                               validation_size=load_profile("quick").validation)

    def sent(x: torch.Tensor) -> torch.Tensor:
        return keep_channels(device.half(x), kept, mask, device.scaling)

    seen = torch.cat([sent(x) for x in calibration_batches(train, 10_000, 256)])
    validation = [(sent(x), y) for x, y in _loader(cfg, "validation")]
    channels = device.channels

    def accuracy(read) -> float:
        correct = total = 0
        for values, y in validation:
            dense = values.new_zeros(values.shape[0], channels, *values.shape[2:])
            dense[:, kept] = read(values)
            correct += int((server.half(dense, len(kept)).argmax(1) == y).sum())
            total += len(y)
        return correct / total

    out = {"run": str(run), "budget": model.budget, "fp32": accuracy(lambda v: v)}
    for levels in GRIDS:
        q_seen = seen.mul(levels).round().clamp(0, levels).long()
        centroids = torch.stack([torch.stack([seen[:, j][q_seen[:, j] == k].mean() if (q_seen[:, j] == k).any()
                                              else torch.tensor(k / levels) for k in range(levels + 1)])
                                 for j in range(len(kept))])

        def grid(v: torch.Tensor, levels=levels) -> torch.Tensor:
            return v.mul(levels).round().clamp(0, levels) / levels

        def centroid(v: torch.Tensor, levels=levels, centroids=centroids) -> torch.Tensor:
            q = v.mul(levels).round().clamp(0, levels).long()
            return torch.stack([centroids[j][q[:, j]] for j in range(len(kept))], dim=1)

        out[f"ec{levels}_grid"] = accuracy(grid)
        out[f"ec{levels}_centroid"] = accuracy(centroid)
        out[f"ec{levels}_centroids"] = [[round(float(c), 4) for c in row] for row in centroids]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="run folders, comma-separated")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [Path(r) for r in args.runs.split(",")]
    missing = [str(r) for r in runs if not (r / "checkpoint").is_dir()]
    if missing:
        parser.error(f"no checkpoint in {', '.join(missing)}")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the folder {args.out.parent} does not exist")
    torch.set_num_threads(1)
    results = [probe(r) for r in runs]
    command = "python scripts/reconstruction_probe.py --runs " + args.runs + f" --out {args.out}"
    args.out.write_text(json.dumps({"command": command, "results": results}, indent=1) + "\n")
    for r in results:
        print(r["run"], ", ".join(f"{k} {100 * v:.2f}%" for k, v in r.items() if isinstance(v, float)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
