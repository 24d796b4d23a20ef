"""Inference over time-varying links: `--budget auto` against every fixed option and an oracle, per shipped trace.

For each trace, `--budget auto` streams single-sample requests for real: a `splitprune serve` subprocess
hosts the model, a `splitprune link --trace NAME` subprocess replays the trace on loopback in front of
it, and this process is the device (PyTorch, one thread). Every fixed option, an oracle that knows the
trace, and the controller itself are then SIMULATED over the same trace with the latencies the real run
measured (splitprune.adaptive.replay); every simulated figure is labelled so. Accuracy per request is
the model's real prediction on that sample at the option used.

`run_adaptive_inference(checkpoint, out)` is what `splitprune bench adaptive` calls.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from splitprune.adaptive.controller import Option
from splitprune.adaptive.replay import (controller_replay, fixed, measured, oracle, reaction_summary, replay, score,
                                        shares)
from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.core.verdict import Interval
from splitprune.errors import UserError
from splitprune.link.trace import LinkTrace, builtin_traces

if TYPE_CHECKING:
    from splitprune.bench.core.profiles import Profile

MIN_SECONDS = 20.0    # a trace that ends sooner (steady: one row) is run this long
TAIL_SECONDS = 10.0   # after the trace's last change, how long its last row is run
TARGET_SHARE = 0.99   # the target: 99% of requests within the latency target
ACCURACY_SLACK = 0.005
ACCURACY_BASIS = "option correctness per image of the whole test set"   # others: rescored (adaptive.py)


def start_link(upstream: str, trace: str) -> tuple[subprocess.Popen, str]:
    """`splitprune link --trace NAME --trace-on-connect` in a subprocess: (process, its address)."""
    proc = subprocess.Popen([sys.executable, "-m", "splitprune", "link", "--listen", "127.0.0.1:0", "--upstream",
                             upstream, "--trace", trace, "--trace-on-connect", "--interval", "0"],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "listening on" not in line:
        proc.kill()
        raise RuntimeError(f"splitprune link did not start: {line!r}")
    return proc, line.split("listening on ")[1].split(" ")[0]


def trace_started(proc: subprocess.Popen) -> float:
    """Unix time the link's trace started (it says so on its first connection)."""
    line = proc.stdout.readline()
    if "started at the first connection" not in line:
        raise RuntimeError(f"splitprune link did not report its trace's start: {line!r}")
    return float(line.split("unix ")[1].rstrip(")\n"))


@functools.lru_cache(maxsize=4)   # both targets' results of one model ask for the same options
def option_correct(checkpoint: str | Path, options: tuple[Option, ...],
                   images: int | None = None) -> dict[tuple[int, str], list[bool]]:
    """correct[budget, dtype]: which images of the model's whole test set (its first `images`) it gets right at
    that option (in-process, both halves, through the real codec)."""
    import torch

    from splitprune.compression import ChannelCodec
    from splitprune.data import BatchLoader, make_loaders
    from splitprune.export import load_workers
    from splitprune.training.server_worker import LocalLink

    device, server, cfg, meta, _ = load_workers(str(checkpoint))
    _, test, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, meta["in_channels"],
                              cfg.seed, 1, None, False, 250,
                              normalisation=cfg.normalisation())
    if images is not None:
        test = BatchLoader(_first(test.dataset, images), test.batch_size, test.input_size, test.in_channels,
                           test.mean, test.std, shuffle=False, augment=False, seed=test.seed)
    link, correct = LocalLink(server), {}
    with torch.no_grad():
        for dtype in dict.fromkeys(o.dtype for o in options):
            device.codec = ChannelCodec(dtype)
            budgets = sorted({o.budget for o in options if o.dtype == dtype})   # options sized apart: once
            for x, y in test:
                for budget, (predictions, _, _) in zip(budgets, device.predict_budgets(x, link, budgets)):
                    correct.setdefault((budget, dtype), []).extend((predictions == y).tolist())
    return correct


def run_trace(session, upstream: str, name: str, latency_ms: float, dtypes: list[str], seconds: float | None,
              out: Path) -> dict:
    """One trace: the real auto run, its log and plot, and the simulated policies."""
    from splitprune.bench.adaptive.plot import plot_stream
    from splitprune.client.auto import run_auto
    from splitprune.client.inference import InferenceClient

    trace = LinkTrace.load(name)
    length = seconds or max(trace.duration + TAIL_SECONDS, MIN_SECONDS)
    proc, address = start_link(upstream, name)
    try:
        client = InferenceClient(address, session.meta["fingerprint"])
        try:
            client.describe()   # the first connection: the trace starts
            started = trace_started(proc)
            result = run_auto(dataclasses.replace(session, client=client), latency_ms, dtypes,
                              duration=length - (time.time() - started), every=0)
        finally:
            client.close()
    finally:
        proc.terminate()
        proc.wait(10)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{name}.json").write_text(result.log())
    doc = json.loads(result.log())
    plot = plot_stream(doc, out / f"{name}.png", trace, started,
                       title=f"--budget auto over trace {name}, target {latency_ms:g} ms (real run)")
    return {"trace": name, "trace_start_unix": started, "seconds": length, "real": result.summary(),
            "options": result.options, "rows": doc["rows"], "plot": plot.name}


def simulate(trace_name: str, run: dict, accuracy: dict[tuple[int, str], float], target: float,
             fixed_options: list) -> list[dict]:
    """The controller and the oracle choose from the run's options (ranked by validation accuracy when the
    model measured it); every option of `fixed_options` (the size-ranked ladder) is also held fixed."""
    trace, options = LinkTrace.load(trace_name), run["options"]
    real = measured(trace, run["rows"], options, run["trace_start_unix"])
    policies = [("auto (controller, simulated)", options, controller_replay(trace, options, real, target)),
                ("auto + hedge (simulated)", options, controller_replay(trace, options, real, target, hedge=True)),
                ("oracle (knows the trace, simulated)", options,
                 replay(trace, options, real, oracle(trace, options, target), target))]
    policies += [(f"fixed {o.label()} (simulated)", fixed_options, replay(trace, fixed_options, real, fixed(k), target))
                 for k, o in enumerate(fixed_options)]
    return [{"policy": label, "kind": "simulated",
             **score(requests, chosen, [accuracy[o.budget, o.dtype] for o in chosen], target)}
            for label, chosen, requests in policies]


def per_image(policy: dict, correct: dict[str, list[bool]]) -> list[float]:
    """A policy's expected correctness on each test image: its options' correctness weighted by how often it
    used each (its accuracy is the mean of this)."""
    rows = [[share * c for c in correct[label]] for label, share in policy["option_share"].items()]
    return [sum(column) for column in zip(*rows)]


def verdict(real: dict, simulated: list[dict], correct: dict[str, list[bool]]) -> dict:
    """The issue's targets for one trace, with the real auto run and the noise counted against it
    (splitprune.bench.core.verdict): >= 99% within (a Wilson interval of one standard error over its requests);
    accuracy within 0.5 pt of the oracle and above every fixed option that may meet 99% (one that misses
    it by less than the noise is still a rival), each difference +- one paired standard error over the
    test images (every policy is scored on the same images). `correct`: each option's correctness per
    test image, by option label."""
    from splitprune.bench.core.verdict import NOT_MEASURED, binomial, paired
    from splitprune.bench.core.verdict import verdict as rule

    mine = per_image(real, correct)

    def versus(rival: dict) -> Interval | None:
        return paired([a - b for a, b in zip(mine, per_image(rival, correct))])

    oracle_row = next(p for p in simulated if p["policy"].startswith("oracle"))
    rivals = [p for p in simulated if p["policy"].startswith("fixed")
              and binomial(p["share_within_target"], p["requests"]).high >= TARGET_SHARE]
    best = max(rivals, key=lambda p: p["accuracy"], default=None)
    share, to_oracle = binomial(real["share_within_target"], real["requests"]), versus(oracle_row)
    gap = versus(best) if best else None
    if best is None:
        above = NOT_MEASURED
    elif real["option_share"] == best["option_share"]:
        above = "tie"   # auto used that one option throughout: "above" cannot pass
    else:
        above = rule(Interval(gap.low - 1e-12, gap.high - 1e-12), 0.0)   # strictly above
    return {"within_99": rule(share, TARGET_SHARE), "share_interval": [share.low, share.high],
            "auto_vs_oracle_pt": 100 * (real["accuracy"] - oracle_row["accuracy"]),
            "auto_vs_oracle_interval_pt": [100 * to_oracle.low, 100 * to_oracle.high],
            "within_half_pt_of_oracle": rule(to_oracle, -ACCURACY_SLACK),
            "best_fixed_meeting_99": best["policy"] if best else None,
            "auto_vs_best_fixed_pt": 100 * (real["accuracy"] - best["accuracy"]) if best else None,
            "auto_vs_best_fixed_interval_pt": [100 * gap.low, 100 * gap.high] if gap else None,
            "above_best_fixed_meeting_99": above}


def score_trace(name: str, run: dict, correct: dict[tuple[int, str], list[bool]], target: float,
                fixed_options: list) -> tuple[list[dict], dict]:
    """(policies, verdict) of one trace's real run: the real auto row, then the simulated ones."""
    accuracy = {key: sum(hits) / len(hits) for key, hits in correct.items()}
    simulated = simulate(name, run, accuracy, target, fixed_options)
    real = {"policy": "auto (real run)", "kind": "real", **{k: run["real"][k] for k in (
        "requests", "share_within_target", "bytes_up", "bytes_down", "mean_budget")},
            "accuracy": sum(accuracy[r["budget"], r["dtype"]] for r in run["rows"]) / max(len(run["rows"]), 1),
            "accuracy_of_its_samples": run["real"]["accuracy"],
            "option_share": shares([_label(r["budget"], r["dtype"]) for r in run["rows"]])}
    by_label = {_label(b, d): hits for (b, d), hits in correct.items()}
    judged = verdict(real, simulated, by_label)
    judged["reaction"] = reaction_summary(LinkTrace.load(name), run["rows"], run["options"], run["trace_start_unix"],
                                          target)
    return [real, *simulated], judged


def run_adaptive_inference(checkpoint: str | Path, out: str | Path, traces: list[str] | None = None,
                           latency_ms: float = 200.0, dtypes: str | None = None, test_subset: int = 1000,
                           seconds: float | None = None) -> dict:
    """Every trace (default: the shipped ones): real `--budget auto` (cycling through `test_subset` test
    images), then every fixed option and the oracle simulated on the same trace; every option's accuracy on
    the whole test set. Writes adaptive_infer.json, adaptive_infer.csv, logs/ and one plot per trace."""
    import torch

    from splitprune.adaptive.budgets import uplink_dtypes
    from splitprune.bench.core.processes import ServeSubprocess, free_port
    from splitprune.client.auto import inference_options
    from splitprune.client.split_inference import open_session
    from splitprune.training.checkpoint import SEAL_KEY

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    traces = traces or builtin_traces()
    server = ServeSubprocess(free_port(), "--model", str(checkpoint), log_path=out / "serve.log").start()
    try:
        session = open_session(str(checkpoint), server.address, test_subset=test_subset)  # checks the model
        session.client.close()   # each trace connects through its own link
        chosen = uplink_dtypes(dtypes, session.cfg.dtype_up)
        options, fixed_options = inference_options(session, chosen), inference_options(session, chosen, ranked=False)
        correct = option_correct(str(checkpoint), tuple(sorted(set(options + fixed_options), key=Option.label)))
        results = []
        for name in traces:
            print(f"trace {name}: --budget auto over a real link, target {latency_ms:g} ms ...", flush=True)
            run = run_trace(session, server.address, name, latency_ms, chosen, seconds, out)
            policies, judged = score_trace(name, run, correct, latency_ms / 1e3, fixed_options)
            results.append({"trace": name, "seconds": run["seconds"], "trace_start_unix": run["trace_start_unix"],
                            "log": f"logs/{name}.json", "plot": run["plot"], "real": run["real"],
                            "policies": policies, "verdict": judged})
            print(report_trace(results[-1]), flush=True)
    finally:
        server.stop()
    summary = {"checkpoint": str(checkpoint), "model_seal": session.meta.get(SEAL_KEY),
               "latency_target_ms": latency_ms, "dtypes_up": chosen, "test_samples": len(session.batches),
               "traces": results}
    return _write(out, summary, correct)


def _first(ds, n: int):
    from splitprune.data import ImageDataset

    return ImageDataset(ds.images[:n], ds.labels[:n], ds.num_classes, ds.classes)


def rescore(checkpoint: str | Path, out: str | Path, images: int | None = None) -> dict:
    """The stored results under `out` (of this model) with every accuracy computed again as this module
    now does, without sending a request again: the latencies and choices are the real run's. `images`: score
    on the first ones of the test set only (tests); default all."""
    out = Path(out)
    summary = json.loads((out / "adaptive_infer.json").read_text())
    runs = {r["trace"]: json.loads((out / r["log"]).read_text()) for r in summary["traces"]}
    fixed_options = {r["trace"]: [_fixed_option(p) for p in r["policies"] if p["policy"].startswith("fixed ")]
                     for r in summary["traces"]}
    every = {o for run in runs.values() for o in (Option(**d) for d in run["options"])}
    every |= {o for options in fixed_options.values() for o in options}
    correct = option_correct(str(checkpoint), tuple(sorted(every, key=Option.label)), images)
    for r in summary["traces"]:
        run = {"options": [Option(**d) for d in runs[r["trace"]]["options"]], "rows": runs[r["trace"]]["rows"],
               "trace_start_unix": r["trace_start_unix"], "real": r["real"]}
        r["policies"], r["verdict"] = score_trace(r["trace"], run, correct, summary["latency_target_ms"] / 1e3,
                                                  fixed_options[r["trace"]])
    return _write(out, summary, correct)


def _label(budget: int, dtype: str) -> str:
    return Option(budget, dtype, 0, 0).label()   # the one spelling of an option's name


def _fixed_option(policy: dict) -> Option:
    """The option a stored "fixed B=.. DTYPE (simulated)" row held: every request of it the same bytes."""
    budget, dtype = policy["policy"].removeprefix("fixed B=").removesuffix(" (simulated)").split(" ")
    n = policy["requests"]
    return Option(int(budget), dtype, policy["bytes_up"] // n, policy["bytes_down"] // n)


def _write(out: Path, summary: dict, correct: dict[tuple[int, str], list[bool]]) -> dict:
    summary = {**summary, "accuracy_images": len(next(iter(correct.values()))),
               "option_accuracy": [{"budget": b, "dtype": d, "accuracy": sum(hits) / len(hits),
                                    "correct": "".join("1" if c else "0" for c in hits)}
                                   for (b, d), hits in sorted(correct.items())],
               "method": "auto: real requests over `splitprune link --trace` on loopback; every other policy "
                         "simulated on the same trace from the real run's per-request residual latencies "
                         "(splitprune.adaptive.replay); accuracy: the mean over requests of the accuracy of "
                         "their option on the whole test set (the model's real predictions), so every policy "
                         "is scored on the same images",
               "accuracy_basis": ACCURACY_BASIS}
    write_results(out, "adaptive_infer", summary)
    with open(out / "adaptive_infer.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["trace", "policy", "kind", "requests", "share_within_target", "accuracy", "bytes_up",
                         "bytes_down", "mean_budget"])
        for r in summary["traces"]:
            for p in r["policies"]:
                writer.writerow([r["trace"], p["policy"], p["kind"], p["requests"], round(p["share_within_target"], 4),
                                 round(p["accuracy"], 4), p["bytes_up"], p["bytes_down"], round(p["mean_budget"], 2)])
    return summary


def report_trace(r: dict) -> str:
    rows = [[p["policy"], p["requests"], f"{100 * p['share_within_target']:.1f}", f"{100 * p['accuracy']:.2f}",
             f"{p['bytes_up'] / max(p['requests'], 1):.0f}", f"{p['mean_budget']:.1f}"] for p in r["policies"]]
    return (f"trace {r['trace']} ({r['seconds']:.0f} s):\n"
            + markdown_table(["policy", "requests", "% within target", "accuracy %", "B up/request", "mean budget"], rows)
            + verdict_line(r["verdict"]) + reaction_line(r["verdict"].get("reaction")))


def reaction_line(reaction: dict | None) -> str:
    """The real run's reactions to the trace's rate steps of 2x or more, and how often its choice changed."""
    if reaction is None:
        return ""
    parts = []
    for direction, answer in (("fall", "the first request in time again"), ("rise", "at the oracle's option")):
        r = reaction[direction]
        if not r["count"]:
            continue
        late = f", {r['late']} requests late on the way" if direction == "fall" else ""
        never = f", {r['unanswered']} never answered" if r.get("unanswered") else ""
        if r["median_seconds"] is None:   # most never answered
            parts.append(f"{r['count']} {direction}s: {r['unanswered']} never answered{late}")
        else:
            most = "never" if r["max_seconds"] is None else f"{r['max_seconds']:.2f} s"
            parts.append(f"{r['count']} {direction}s: {answer} {r['median_seconds']:.2f} s after the step (median; "
                         f"at most {most}), {r['within_1s']} of {r['count']} within 1 s{never}{late}")
    steps = "; ".join(parts) if parts else "no rate step of 2x or more"
    return f"\nreaction (real run): {steps}; option switches {reaction['switches_per_100']:.1f} per 100 requests\n"


def verdict_line(v: dict) -> str:
    def pt(low: float, high: float) -> str:
        return f"{low:+.2f} to {high:+.2f} pt"

    share = f"{100 * v['share_interval'][0]:.1f}-{100 * v['share_interval'][1]:.1f} %"
    line = (f"verdict, one standard error counted against auto: >= 99 % within the target: {v['within_99']} "
            f"({share}); within 0.5 pt of the oracle: {v['within_half_pt_of_oracle']} "
            f"({v['auto_vs_oracle_pt']:+.2f} pt, {pt(*v['auto_vs_oracle_interval_pt'])}); above the best fixed "
            f"option that may meet 99 % ({v['best_fixed_meeting_99']}): {v['above_best_fixed_meeting_99']}")
    if v["auto_vs_best_fixed_interval_pt"] is not None:
        line += f" ({v['auto_vs_best_fixed_pt']:+.2f} pt, {pt(*v['auto_vs_best_fixed_interval_pt'])})"
    return line


def run(profile: str | Profile, out: Path, checkpoint: str | None = None, **options) -> dict:
    """`splitprune bench adaptive` hook (the lead wires the suite): needs the model to evaluate."""
    if checkpoint is None:
        raise UserError("the adaptive inference benchmark needs --checkpoint RUN (the model to serve)")
    return run_adaptive_inference(checkpoint, out, **options)
