"""`splitprune train`: run sl, ca, deprune, prune or anybudget, in-process or against a `splitprune serve` server."""
from __future__ import annotations

import argparse

from splitprune.cli.common import (HelpFormatter, add_config_flags, add_connect_flags, config_from_args, connect_config,
                                   percent, print_table)
from splitprune.config import stored_config
from splitprune.errors import UserError
from splitprune.files import check_out_folder


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="train a split model (sl, ca, deprune, prune, anybudget)",
                              description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="run folder: summary.json, metrics.csv, checkpoint/ "
                                                "(a run started again with the same --out resumes)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_connect_flags(p)
    add_config_flags(p)
    p.add_argument("--step-ms", type=float, metavar="T",
                   help="the step-time target of budget 'auto' (remote runs): each step the device sends the most "
                        "channels (up to the phase's budget) whose predicted step time is within T ms")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    auto = args.budget == "auto"   # a CLI value, not a RunConfig one: the phases keep the schedule's budgets
    if auto:
        args.budget = None
        if args.step_ms is None:
            raise UserError("--budget auto needs a --step-ms target")
        if not args.step_ms > 0:
            raise UserError(f"--step-ms must be a positive number of milliseconds, got {args.step_ms:g}")
    elif args.step_ms is not None:
        raise UserError("--step-ms goes with --budget auto")
    cfg = config_from_args(args)
    remote = connect_config(args)
    if remote.measure_socket and not remote.server:
        raise UserError("--measure-socket counts the bytes on the socket to a server: it needs --server")
    if auto and not remote.server:
        raise UserError("--budget auto fits each step's budget to the link it measures: it needs --server (in "
                        "process there is no link to measure)")
    check_out_folder(args.out)
    from splitprune.training.trainer import Trainer

    endpoint = None
    if remote.server:
        from splitprune.client.connect import connect

        endpoint = connect(cfg, remote, out=args.out)
    try:
        parts = step_budget = None
        if auto:
            from splitprune.client.auto import step_budget as make_step_budget
            from splitprune.training.setup import build_run

            parts = build_run(cfg, server=endpoint is None)
            step_budget = make_step_budget(parts, args.step_ms)
        summary = Trainer(cfg, args.out, endpoint=endpoint, parts=parts, show_progress=not args.quiet,
                          step_budget=step_budget).run()
    finally:
        if endpoint is not None:
            endpoint.close()
    print_summary(summary)
    if step_budget is not None:
        print(step_budget_line(step_budget, args.step_ms))
    print(f"results: {args.out}/summary.json, {args.out}/metrics.csv, checkpoint {args.out}/checkpoint")
    return 0


def print_summary(s: dict) -> None:
    auto = s.get("budget_auto")
    rows = [[f"auto <= {p['budget']}" if auto else p["budget"], p["epochs"], f"{p['bytes_up'] / 1e6:.2f}",
             f"{p['bytes_down'] / 1e6:.2f}", percent(p["final_test_accuracy"])] for p in s["phases"]]
    print(f"\n{s['method']} on {s['dataset']} ({s['train_samples']} train images), {s['model']} cut at {s['split']}, "
          f"up {s['dtype_up']} / down {s['dtype_down']}")
    print_table(rows, ["budget", "epochs", "MB up", "MB down", "test acc"])
    print(f"final test accuracy {percent(s['final_test_accuracy'])}  best {percent(s['best_test_accuracy'])}  "
          f"mean of last 3 {percent(s['mean_last3_test_accuracy'])}")
    print(f"training traffic {s['bytes_up'] / 1e6:.2f} MB up, {s['bytes_down'] / 1e6:.2f} MB down; "
          f"inference uplink {s['inference_bytes_per_sample']:.1f} B/sample "
          f"({s['inference_bytes_single_sample']} B for a single-sample request); {s['wall_seconds']:.0f} s")
    transport = s.get("transport")
    if transport:
        print(traffic_lines(transport))
    lost = (transport or {}).get("discarded") or {}
    if lost.get("processes"):
        print(f"  besides: {lost['bytes_up'] / 1e6:.3f} MB up, {lost['bytes_down'] / 1e6:.3f} MB down sent by "
              f"{lost['processes']} stopped process(es) after their last checkpoint (that work was redone)")
    from splitprune.training.evaluation import short_run_warning

    advice = short_run_warning(stored_config(s["config"]), s["train_samples"] // s["batch_size"] * s["epochs"])
    if advice:
        print(f"warning: {advice}")


def step_budget_line(auto, step_ms: float) -> str:
    """What `--budget auto` chose over the steps of this process."""
    steps = auto.history
    counts: dict[int, int] = {}
    for budget, _ in steps:
        counts[budget] = counts.get(budget, 0) + 1
    within = sum(seconds * 1e3 <= step_ms for _, seconds in steps)
    chosen = ", ".join(f"B={b} x{n}" for b, n in sorted(counts.items()))
    return (f"auto budget, step target {step_ms:g} ms: {within} of {len(steps)} steps within it; budgets: {chosen}"
            + (f"; warning: {auto.impossible_steps} steps could not meet the target even at the smallest budget"
               if auto.impossible_steps else ""))


def traffic_lines(t: dict) -> str:
    """Network traffic of a remote run by purpose, as the summary's `transport` counted it."""
    from splitprune.wire.accounting import PURPOSES, totals

    key = "socket_bytes" if t["counted"] == "socket" else "message_bytes"
    up, down = totals(t)
    what = "on the socket" if t["counted"] == "socket" else "encoded messages; --measure-socket counts the socket"
    runs = f", {t['processes']} processes" if t.get("processes", 1) > 1 else ""
    parts = [f"{p} {t['purposes'][p][key + '_up'] / 1e6:.3f}/{t['purposes'][p][key + '_down'] / 1e6:.3f}"
             for p in PURPOSES]
    return (f"network ({what}{runs}): {up / 1e6:.3f} MB up, {down / 1e6:.3f} MB down\n"
            f"  by purpose, MB up/down: " + ", ".join(parts))
