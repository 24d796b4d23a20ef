"""Bring a trained model: a torchvision network trained in plain PyTorch (a user's own loop, weights saved as a
.pth state_dict), then `splitprune train --weights` fine-tunes it compression-aware at a small budget.

Target (issue 23): within 1 pt of the loaded model on the full 10k test set, at >= 100x less uplink per sample
than the uncompressed cut, after at most 2 fine-tuning epochs, 2 seeds. The verdict follows the project's rule:
each seed's difference to the loaded model is the paired mean over the test images +- one standard error (the
images' own difficulty cancels), and the interval over the seeds is the worse low to the better high.
Nothing is selected: the recipes below are fixed before any run, and no validation or test number feeds back.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from splitprune.bench.core.verdict import Interval, explain, paired, verdict
from splitprune.errors import UserError

MODEL, SPLIT, SIZE = "torchvision:resnet18", "layer2", 32
BUDGET, DTYPE_UP = 4, "int8"
SEEDS = (0, 1)
NEED_PT, NEED_RATIO = -0.01, 100.0
# plain PyTorch training of the model a user brings (SGD + momentum, cosine to zero, the usual ResNet recipe)
PRETRAIN = {"full": {"epochs": 2, "train_subset": None}, "smoke": {"epochs": 1, "train_subset": 4000}}
FINETUNE = {"full": {"epochs": 2, "train_subset": None}, "smoke": {"epochs": 1, "train_subset": 4000}}
LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.05, 0.9, 5e-4, 64
FINETUNE_BATCH = 64  # fine-tuning: the method's lr (0.01), with the momentum and batch of the pretraining


def _config(settings: dict, seed: int = 0):
    from splitprune.config import make_config

    return make_config({"model": MODEL, "split": SPLIT, "input_size": SIZE, "method": "ca", "budget": BUDGET,
                        "dtype_up": DTYPE_UP, "seed": seed, "epochs": settings["epochs"],
                        "train_subset": settings["train_subset"]})


def _loaders(cfg, train_subset: int | None):
    from splitprune.data import make_loaders

    train, test, _ = make_loaders(cfg.dataset, cfg.data_dir, BATCH, SIZE, 3, cfg.seed, train_subset, None, None,
                                  normalisation=cfg.normalisation())
    return train, test


def pretrain(out: Path, settings: dict) -> dict:
    """The user's model: resnet18 trained from scratch on Fashion-MNIST (to 3 channels, 32 x 32), saved as
    base.pth; resumable per epoch (base_epoch.pt)."""
    from splitprune.models import build_whole

    info_path, weights, partial = out / "base.json", out / "base.pth", out / "base_epoch.pt"
    if info_path.exists() and weights.exists():
        return json.loads(info_path.read_text())
    cfg = _config(settings)
    torch.manual_seed(0)
    model = build_whole(MODEL, 10, 3)
    train, _ = _loaders(cfg, settings["train_subset"])
    steps = settings["epochs"] * len(train)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    done, seconds, log = 0, 0.0, []
    if partial.exists():
        state = torch.load(partial, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        done, seconds, log = state["epoch"], state["seconds"], json.loads(state["log"])
        print(f"[bring] pretraining resumes after epoch {done}", flush=True)
    for epoch in range(done + 1, settings["epochs"] + 1):
        torch.manual_seed(1000 + epoch)
        model.train()
        started, seen, correct, total_loss = time.perf_counter(), 0, 0, 0.0
        for i, (x, y) in enumerate(train):
            loss = torch.nn.functional.cross_entropy(logits := model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            total_loss += loss.item() * len(y)
            if i % 200 == 0:
                print(f"[bring] pretrain epoch {epoch} batch {i}/{len(train)} loss {loss.item():.3f} "
                      f"({time.perf_counter() - started:.0f}s)", flush=True)
        seconds += time.perf_counter() - started
        log.append({"epoch": epoch, "loss": total_loss / seen, "train_accuracy": correct / seen,
                    "seconds": time.perf_counter() - started})
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "epoch": epoch, "seconds": seconds, "log": json.dumps(log)}, partial)
    torch.save(model.state_dict(), weights)  # what a user has: a plain state_dict
    info = {"model": MODEL, "input_size": SIZE, "recipe": {"lr": LR, "momentum": MOMENTUM, "nesterov": True,
            "weight_decay": WEIGHT_DECAY, "batch": BATCH, "schedule": "cosine", **settings},
            "seconds": seconds, "epochs": log, "weights": weights.name}
    info_path.write_text(json.dumps(info, indent=2))
    partial.unlink()
    return info


def base_correct(out: Path, settings: dict) -> list[bool]:
    """Which test images the loaded (whole, unsplit) model gets right."""
    from splitprune.models import build_whole

    model = build_whole(MODEL, 10, 3)
    model.load_state_dict(torch.load(out / "base.pth", weights_only=True))
    model.eval()
    _, test = _loaders(_config(settings), None)
    correct: list[bool] = []
    with torch.no_grad():
        for x, y in test:
            correct.extend((model(x).argmax(1) == y).tolist())
    return correct


def finetune(out: Path, settings: dict) -> list[Path]:
    """`splitprune train --weights base.pth` as a user types it, one run per seed side by side at one thread each
    (2 cores); a stopped run resumes from its checkpoint. Each run's output goes to runs/NAME.log."""
    runs, procs = [], []
    for seed in SEEDS:
        run = out / "runs" / f"ca{BUDGET}_{DTYPE_UP}_seed{seed}"
        runs.append(run)
        if (run / "summary.json").exists():
            continue
        command = ["train", "--model", MODEL, "--split", SPLIT, "--input-size", str(SIZE), "--weights",
                   str(out / "base.pth"), "--method", "ca", "--budget", str(BUDGET), "--dtype-up", DTYPE_UP,
                   "--batch-size", str(FINETUNE_BATCH), "--momentum", str(MOMENTUM), "--epochs",
                   str(settings["epochs"]), "--seed", str(seed), "--threads", "1", "--out", str(run)]
        if settings["train_subset"]:
            command += ["--train-subset", str(settings["train_subset"])]
        log = run.parent / f"{run.name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        print(f"[bring] splitprune {' '.join(command)}  (output: {log})", flush=True)
        procs.append((subprocess.Popen([sys.executable, "-m", "splitprune", *command], stdout=open(log, "w"),
                                       stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        if proc.wait() != 0:
            raise UserError(f"fine-tuning failed, see {log}")
    return runs


def run_correct(run: Path) -> list[bool]:
    """Which test images the fine-tuned split model gets right at its budget, through the real codec."""
    from splitprune.adaptive.controller import Option
    from splitprune.bench.adaptive.inference import option_correct

    return option_correct(run, (Option(BUDGET, DTYPE_UP, 0, 0),))[(BUDGET, DTYPE_UP)]


def uncompressed_bytes_per_sample(batch: int) -> float:
    """Uplink bytes per training sample that plain split learning sends at this cut: the encoded fp32 message of
    a batch with every channel, per sample (the same codec, so headers are counted alike)."""
    from splitprune.compression import ChannelCodec
    from splitprune.models import cut_shape

    c, h, w = cut_shape(MODEL, SPLIT, 3, SIZE)
    values = torch.rand(batch, c, h, w, generator=torch.Generator().manual_seed(0))
    return len(ChannelCodec("fp32").compress(values, None, c).SerializeToString()) / batch


def run(profile: str, out: Path) -> dict:
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"pretrain": PRETRAIN[profile], "finetune": FINETUNE[profile]}
    base = pretrain(out, settings["pretrain"])
    base_ok = base_correct(out, settings["finetune"])
    base_accuracy = sum(base_ok) / len(base_ok)
    print(f"[bring] loaded model: {100 * base_accuracy:.2f}% on {len(base_ok)} test images", flush=True)
    seeds, sl_bytes = [], None
    for seed, run_dir in zip(SEEDS, finetune(out, settings["finetune"])):
        summary = json.loads((run_dir / "summary.json").read_text())
        ok = run_correct(run_dir)
        diff = paired([float(a) - float(b) for a, b in zip(ok, base_ok)])
        epochs = _metrics(run_dir / "metrics.csv", summary["train_samples"])
        up = summary["bytes_up"] / (summary["train_samples"] * len(epochs))
        sl_bytes = uncompressed_bytes_per_sample(summary["batch_size"])
        seeds.append({"seed": seed, "run": str(run_dir.relative_to(out)), "accuracy": sum(ok) / len(ok),
                      "summary_accuracy": summary.get("final_test_accuracy"), "difference": [diff.low, diff.high],
                      "uplink_bytes_per_sample": up, "seconds": sum(e["seconds"] for e in epochs),
                      "epochs": epochs})
    diff = Interval(min(s["difference"][0] for s in seeds), max(s["difference"][1] for s in seeds))
    ratios = [sl_bytes / s["uplink_bytes_per_sample"] for s in seeds if s["uplink_bytes_per_sample"]]
    ratio = Interval(min(ratios), max(ratios)) if len(ratios) == len(seeds) else None
    results = {"model": MODEL, "split": SPLIT, "input_size": SIZE, "budget": BUDGET, "dtype_up": DTYPE_UP,
               "profile": profile, "base": {**base, "test_accuracy": base_accuracy, "test_images": len(base_ok)},
               "sl_uplink_bytes_per_sample": sl_bytes, "seeds": seeds,
               "accuracy_verdict": explain(diff, NEED_PT, "difference"),
               "traffic_verdict": verdict(ratio, NEED_RATIO) if ratio else "not measured",
               "uplink_ratio": [ratio.low, ratio.high] if ratio else None}
    plot(results, out / "bring.png")
    return results


def _metrics(path: Path, samples: int) -> list[dict]:
    import csv

    rows = []
    with open(path) as fh:
        for r in csv.DictReader(fh):
            rows.append({"epoch": int(r["epoch"]), "budget": r["budget"], "test_accuracy": float(r["test_accuracy"]),
                         "bytes_up": int(r["bytes_up"]), "bytes_down": int(r["bytes_down"]), "samples": samples,
                         "seconds": float(r["seconds"]), "eval_seconds": float(r["eval_seconds"])})
    return rows


def plot(results: dict, path: Path) -> None:
    from splitprune.bench.core.plots import figure, save

    fig, (ax_epoch, ax_bytes) = figure(ncols=2, width=4.5, height=3.6)
    base = 100 * results["base"]["test_accuracy"]
    for ax in (ax_epoch, ax_bytes):
        ax.axhline(base, color="black", lw=1, label=f"loaded model {base:.2f}%")
        ax.axhspan(base - 1, base, color="grey", alpha=0.15, label="within 1 pt")
        ax.grid(True, alpha=0.3)
    for s in results["seeds"]:
        epochs = [0] + [e["epoch"] for e in s["epochs"]]
        acc = [base] + [100 * e["test_accuracy"] for e in s["epochs"]]
        ax_epoch.plot(epochs, acc, marker="o", label=f"seed {s['seed']}")
        sent, total = [0.0], 0
        for e in s["epochs"]:
            total += e["bytes_up"]
            sent.append(total / 1e6)
        ax_bytes.plot(sent, acc, marker="o", label=f"seed {s['seed']}")
        sl = results["sl_uplink_bytes_per_sample"] * sum(e["samples"] for e in s["epochs"]) / 1e6
    ax_bytes.axvline(sl, color="tab:red", ls="--", label=f"sl uplink over the same steps ({sl:,.0f} MB)")
    ax_bytes.set_xscale("symlog")
    ax_epoch.set_xlabel("fine-tuning epoch (0: the loaded model, every channel)")
    ax_bytes.set_xlabel("uplink MB sent while fine-tuning")
    for ax in (ax_epoch, ax_bytes):
        ax.set_ylabel("test accuracy, % (10k)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{results['model']} cut at {results['split']}, fine-tuned at B={results['budget']} "
                 f"{results['dtype_up']}", fontsize=9)
    save(fig, path)


def report(r: dict) -> str:
    from splitprune.bench.core.common import markdown_table

    base = r["base"]
    text = (f"Loaded model: {r['model']} trained from scratch in plain PyTorch ({base['recipe']['epochs']} epochs, "
            f"{base['seconds'] / 60:.0f} min at 1 thread), {100 * base['test_accuracy']:.2f}% on "
            f"{base['test_images']:,} test images. Cut at {r['split']} ({r['input_size']} x {r['input_size']}); "
            f"plain split learning would send {r['sl_uplink_bytes_per_sample']:,.0f} B per training sample up.\n\n")
    rows = [[s["seed"], f"{100 * s['accuracy']:.2f}%",
             Interval(*s["difference"]).text(), f"{s['uplink_bytes_per_sample']:.1f}",
             f"{r['sl_uplink_bytes_per_sample'] / s['uplink_bytes_per_sample']:.0f}x",
             " / ".join(f"{100 * e['test_accuracy']:.2f}" for e in s["epochs"]),
             f"{s['seconds'] / 60:.0f} min"] for s in r["seeds"]]
    text += markdown_table(["seed", f"B={r['budget']} {r['dtype_up']} accuracy", "minus loaded (paired, +-1 s.e.)",
                            "uplink B/sample", "less than sl", "test % per epoch", "fine-tuning time"], rows)
    text += ("\nAccuracy: the saved model scored again per image through the codec, 250 images per message; the "
             "per-epoch figures are the run's own evaluations (256 per message: int8 scales are per message, so "
             "the last epoch's figure can differ by a few images).\n")
    text += (f"\nWithin 1 pt of the loaded model: **{r['accuracy_verdict']}**; at least {NEED_RATIO:.0f}x less "
             f"uplink: **{r['traffic_verdict']}** ({r['uplink_ratio'][0]:.0f}x to {r['uplink_ratio'][1]:.0f}x).\n")
    return text
