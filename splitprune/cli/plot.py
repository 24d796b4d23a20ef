"""`splitprune plot RUN`: a run's test accuracy and cumulative training traffic per epoch, its phases marked.
`splitprune plot LOG.json`: the link rate, chosen budget and latency over time of `infer --budget auto --log`."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from splitprune.cli.common import HelpFormatter, check_out_file
from splitprune.errors import UserError


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="plot a training run: accuracy and cumulative bytes per epoch",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("run_dir", metavar="RUN", help="a `splitprune train` run folder (holds metrics.csv), or the "
                                                  "--log file of `splitprune infer --budget auto`")
    p.add_argument("--out", help="PNG file to write (default: RUN/plot.png; LOG.png for a log)")
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
    rows, summary = read_run(run_dir)
    out = check_out_file(args.out or run_dir / "plot.png")
    print(f"plot: {plot_run(rows, summary, out)}")
    return 0
