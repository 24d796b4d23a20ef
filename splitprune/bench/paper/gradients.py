"""Training traffic both ways (issue 24, item 4): the gradient downlink's form, chosen on validation data.

The uplink of `bench rate`'s headline candidate (ca B=4, r=2: a 3x3 wire tensor) is cheap; its fp32 gradient
downlink is what is left of the training traffic. Candidates, each trained with the quick profile's command at
seed 0: the uplink int8 or int4 (the affine per-channel grid every training step already uses) and the
gradient downlink fp32, int8 or int4 (affine per kept channel over the batch, docs/design.md "Wire dtypes").
Training traffic is every byte of the TrainRequests and TrainReplies of the run (encoded messages), against
sl's at the same profile (bench_results/deprune/runs/sl*). The final models are scored on the 2,000 validation
images through their trained uplink dtype; the most accurate candidate among those with >= 1000x less
traffic than sl (ties: less traffic; none: the one with the least traffic within half a point of the best) is
trained at seed 1 too, and only it is scored on the full test set against sl's final models
(bench_results/rate/rate.json), target: at most 0.5 pt lost, every pairing of seeds.

    python -m splitprune.bench.paper.gradients --out bench_results/gradients
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.core.verdict import Interval, difference, explain, interval

CANDIDATES = (("int8", "fp32"), ("int8", "int8"), ("int8", "int4"), ("int4", "int4"))
TRAIN = ("splitprune train --model vgg11_bn_compact --dataset fashion-mnist --epochs 4 --lr-schedule cosine "
         "--train-subset 2500 --test-subset 1000 --threads 1 --validation-size 2000 --method ca --schedule 4:22 "
         "--resolution 2 --dtype-up {up} --dtype-down {down} --seed {seed} --out {out}")
SL_RUNS = ("bench_results/deprune/runs/sl", "bench_results/deprune/runs/sl_seed1")
FACTOR, LOSS = 1000.0, -0.005


def _train(out: Path, up: str, down: str, seed: int) -> Path:
    run = out / "runs" / f"up{up}_down{down}_seed{seed}"
    if not (run / "summary.json").exists():
        command = TRAIN.format(up=up, down=down, seed=seed, out=run)
        print(f"[gradients] {command}", flush=True)
        subprocess.run([sys.executable, "-m", "splitprune", *shlex.split(command)[1:], "--quiet"], check=True)
        (run / "command.txt").write_text(command + "\n")
    return run


def _traffic(run: Path) -> int:
    summary = json.loads((run / "summary.json").read_text())
    return int(summary["bytes_up"]) + int(summary["bytes_down"])


def _accuracy(run: Path, up: str, data: str) -> dict:
    from splitprune.bench.paper.entropy import _loader
    from splitprune.bench.paper.measure import Point, evaluate_points, load_model

    model = load_model(run / "checkpoint")
    return evaluate_points(model, _loader(model.cfg, data), [Point(4, up)])[0]


def run(out: Path, root: Path = Path(".")) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    sl_traffic = max(_traffic(root / p) for p in SL_RUNS)
    rows = []
    for up, down in CANDIDATES:
        path = _train(out, up, down, 0)
        traffic = _traffic(path)
        rows.append({"uplink": up, "downlink": down, "seed": 0, "traffic_bytes": traffic,
                     "less_than_sl": sl_traffic / traffic, "validation": _accuracy(path, up, "validation")["accuracy"]})
    fits = [r for r in rows if r["less_than_sl"] >= FACTOR]
    if fits:
        chosen = max(fits, key=lambda r: (r["validation"], -r["traffic_bytes"]))
    else:
        best = max(r["validation"] for r in rows)
        chosen = min((r for r in rows if r["validation"] >= best + LOSS), key=lambda r: r["traffic_bytes"])
    up, down = chosen["uplink"], chosen["downlink"]
    runs = [_train(out, up, down, seed) for seed in (0, 1)]
    tested = [_accuracy(run_dir, up, "test") for run_dir in runs]
    traffic = [_traffic(run_dir) for run_dir in runs]
    sl = json.loads((root / "bench_results/rate/rate.json").read_text())["sl_test"]
    gap = difference(interval([t["accuracy"] for t in tested]), Interval(sl["low"], sl["high"]))
    factor = sl_traffic / max(traffic)
    result = {"chosen": f"up {up} / down {down}", "test_accuracy": [t["accuracy"] for t in tested],
              "test_samples": tested[0]["samples"], "traffic_bytes": traffic, "less_than_sl": factor,
              "vs_sl": gap.__dict__ if gap else None,
              "accuracy_verdict": explain(gap, LOSS, "chosen - sl"),
              "traffic_verdict": "holds" if factor >= FACTOR else "fails"}
    command = f"python -m splitprune.bench.paper.gradients --out {out}"
    table = markdown_table(["uplink", "gradient downlink", "training MB (both ways)", "less than sl",
                            "validation accuracy (seed 0)"],
                           [[r["uplink"], r["downlink"], f"{r['traffic_bytes'] / 1e6:.3f}",
                            f"{r['less_than_sl']:,.0f}x", f"{100 * r['validation']:.2f}%"] for r in rows])
    markdown = (f"`{command}`\n\nca B=4, r=2, quick profile; sl's training traffic {sl_traffic / 1e6:.1f} MB; "
                f"sl's final models {100 * sl['low']:.2f} to {100 * sl['high']:.2f} % (full test set).\n\n{table}\n\n"
                f"Chosen on validation: **{result['chosen']}**: {factor:,.0f}x less training traffic than sl "
                f"(>= {FACTOR:,.0f}x: {result['traffic_verdict']}); full test set "
                f"{', '.join(f'{100 * a:.2f}%' for a in result['test_accuracy'])} (seeds 0, 1): "
                f"{result['accuracy_verdict']}.\n")
    (out / "gradients.md").write_text(markdown)
    write_results(out, "gradients", {"gradients_command": command, "candidates": rows, "result": result,
                                     "sl_traffic_bytes": sl_traffic, "sl_test": sl})
    print(markdown)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/gradients")
    args = p.parse_args(argv)
    run(Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
