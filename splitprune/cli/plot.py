"""`splitprune plot RUN`: a run's test accuracy and cumulative training traffic per epoch, its phases marked.
`splitprune plot RUN RUN...`: several runs on the same axes: test accuracy per epoch, and against the training
traffic it cost (the trade at a glance, e.g. plain split learning against a compression-aware run).
`splitprune plot LOG.json`: the link rate, chosen budget and latency over time of `infer --budget auto --log`."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from splitprune.cli.common import HelpFormatter
from splitprune.errors import UserError
from splitprune.files import check_out_file


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="plot a training run: accuracy and cumulative bytes per epoch",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="a `splitprune train` run folder (holds metrics.csv), or the "
                                                  "--log file of `splitprune infer --budget auto`")
    p.add_argument("others", metavar="RUN", nargs="*", help="more run folders: all of them compared on the same axes")
    p.add_argument("--out", help="PNG file to write (default: RUN/plot.png; LOG.png for a log; with several runs, "
                                 "compare.png next to the first one)")
    p.add_argument("--trace", metavar="FILE|NAME", help="with a log: the link trace it ran over, drawn as the rate")
    p.add_argument("--trace-start", type=float, metavar="UNIX",
                   help="with --trace: when the link started its trace, in Unix seconds (default: with the log)")
    p.set_defaults(run=run)


def read_run(run_dir: Path) -> tuple[list[dict], dict]:
    """metrics.csv rows (numbers parsed) and summary.json ({} while the run is unfinished)."""
    try:
        with open(run_dir / "metrics.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        rows = [{**r, **{k: float(r[k]) for k in ("epoch", "phase", "train_accuracy", "test_accuracy",
                                                  "bytes_up", "bytes_down")}} for r in rows]
    except FileNotFoundError:
        raise UserError(f"{run_dir} holds no metrics.csv: give a `splitprune train` run folder") from None
    except (KeyError, ValueError, TypeError, csv.Error) as exc:
        raise UserError(f"{run_dir}/metrics.csv is not a splitprune metrics file: {exc}") from None
    if not rows:
        raise UserError(f"{run_dir}/metrics.csv has no finished epoch yet")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    return rows, summary if isinstance(summary, dict) else {}


def plot_run(rows: list[dict], summary: dict, out: Path) -> Path:
    from splitprune.bench.core.plots import COLORS, figure, save

    epochs = [r["epoch"] for r in rows]
    fig, (acc, traffic) = figure(2, width=6.0, height=4.2)
    for i, phase in enumerate(sorted({r["phase"] for r in rows})):  # shade each phase, label its budget
        own = [r for r in rows if r["phase"] == phase]
        lo, hi = own[0]["epoch"] - 0.5, own[-1]["epoch"] + 0.5
        for ax in (acc, traffic):
            ax.axvspan(lo, hi, color=COLORS[i % len(COLORS)], alpha=0.08, lw=0)
        for ax in (acc, traffic):
            ax.text((lo + hi) / 2, 0.02, f"B={own[0]['budget']}", ha="center", va="bottom",
                    transform=ax.get_xaxis_transform(), fontsize=9)
    acc.plot(epochs, [100 * r["test_accuracy"] for r in rows], "o-", color=COLORS[0], label="test")
    acc.plot(epochs, [100 * r["train_accuracy"] for r in rows], "s--", color="#7f7f7f", label="training (running)")
    last = 100 * rows[-1]["test_accuracy"]
    acc.annotate(f"{last:.1f}%", (epochs[-1], last), textcoords="offset points", xytext=(0, 8), ha="center",
                 fontsize=9, color=COLORS[0])
    acc.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100), title="accuracy per epoch")
    acc.legend(loc="upper left", fontsize=8)
    up, down, total_up, total_down = [], [], 0.0, 0.0
    for r in rows:
        total_up, total_down = total_up + r["bytes_up"], total_down + r["bytes_down"]
        up.append(total_up / 1e6)
        down.append(total_down / 1e6)
    traffic.plot(epochs, up, "o-", color=COLORS[1], label="uplink (measured)")
    traffic.plot(epochs, down, "s-", color=COLORS[2], label="downlink (measured)")
    reference = _all_channels_fp32(summary)
    if reference:
        traffic.plot(epochs, [e * reference / 1e6 for e in epochs], ":", color="black",
                     label="uplink sending every channel in fp32\n(computed: images x C x H x W x 4 B)")
    traffic.set(xlabel="epoch", ylabel="MB since the start (log scale)", yscale="log",
                title="cumulative training traffic")
    traffic.legend(loc="center left", fontsize=8)
    for ax in (acc, traffic):
        ax.set_xticks(epochs)
        ax.grid(alpha=0.3)
    if summary:
        fig.suptitle(f"{summary.get('method')} on {summary.get('dataset')} ({summary.get('train_samples')} training "
                     f"images), {summary.get('model')} cut at {summary.get('split')}", fontsize=10)
    return save(fig, out)


def plot_compare(runs: list[tuple[Path, list[dict], dict]], out: Path) -> Path:
    """Runs on the same axes: test accuracy per epoch, and test accuracy against the cumulative training traffic
    (up + down, log scale) it took to get there."""
    from splitprune.bench.core.plots import COLORS, figure, save

    fig, (per_epoch, per_byte) = figure(2, width=6.0, height=4.2)
    finals = []
    for i, (folder, rows, summary) in enumerate(runs):
        label = summary.get("method", folder.name) + (f" B={summary['final_budget']}" if summary.get(
            "final_budget") not in (None, "all") else " (all channels)") + f", {summary.get('dtype_up', '?')} up"
        accuracy = [100 * r["test_accuracy"] for r in rows]
        traffic, total = [], 0.0
        for r in rows:
            total += r["bytes_up"] + r["bytes_down"]
            traffic.append(total / 1e6)
        color = COLORS[i % len(COLORS)]
        per_epoch.plot([r["epoch"] for r in rows], accuracy, "o-", color=color, label=label)
        per_byte.plot(traffic, accuracy, "o-", color=color, label=label)
        per_byte.annotate(f"{accuracy[-1]:.1f}% for {traffic[-1]:,.1f} MB", (traffic[-1], accuracy[-1]),
                          textcoords="offset points", xytext=(-6, -4), ha="right", va="top", fontsize=8, color=color)
        finals.append((label, accuracy[-1], traffic[-1]))
    if len(finals) == 2:
        (a, acc_a, mb_a), (b, acc_b, mb_b) = sorted(finals, key=lambda f: -f[2])
        fig.suptitle(f"{b.split(',')[0]}: {acc_b:.1f}% with {mb_a / mb_b:,.0f}x less training traffic than "
                     f"{a.split(',')[0]} ({acc_a:.1f}%)", fontsize=10)
    per_epoch.set_xticks(sorted({r["epoch"] for _, rows, _ in runs for r in rows}))
    per_byte.set_xlim(left=min(r["bytes_up"] + r["bytes_down"] for _, rows, _ in runs for r in rows[:1]) / 1e6 / 4)
    per_epoch.set(xlabel="epoch", ylabel="test accuracy (%)", title="accuracy per epoch")
    per_byte.set(xlabel="training traffic so far, MB up + down (log scale)", ylabel="test accuracy (%)",
                 xscale="log", title="accuracy against the bytes it cost")
    for ax in (per_epoch, per_byte):
        ax.grid(alpha=0.3, which="both")
        ax.legend(loc="lower right", fontsize=8)
    return save(fig, out)


def _all_channels_fp32(summary: dict) -> float | None:
    """Uplink payload bytes per epoch if every channel of the cut went as fp32 (plain split learning)."""
    try:
        c, h, w = summary["cut_shape"]
        return float(summary["train_samples"]) * c * h * w * 4
    except (KeyError, TypeError, ValueError):
        return None


def run(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    if run_dir.is_file():
        from splitprune.bench.adaptive.plot import plot_stream, read_log
        from splitprune.link.trace import LinkTrace

        doc = read_log(run_dir)
        trace = LinkTrace.load(args.trace) if args.trace else None
        out = check_out_file(args.out or run_dir.with_suffix(".png"))
        print(f"plot: {plot_stream(doc, out, trace, args.trace_start)}")
        return 0
    if args.trace or args.trace_start is not None:
        raise UserError("--trace and --trace-start go with the log of `splitprune infer --budget auto`")
    if args.others:
        runs = [(Path(d), *read_run(Path(d))) for d in [run_dir, *args.others]]
        out = check_out_file(args.out or run_dir.parent / "compare.png")
        print(f"plot: {plot_compare(runs, out)}")
        return 0
    rows, summary = read_run(run_dir)
    out = check_out_file(args.out or run_dir / "plot.png")
    print(f"plot: {plot_run(rows, summary, out)}")
    return 0
