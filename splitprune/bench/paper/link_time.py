"""(e) time to accuracy over an emulated Wi-Fi link (10 Mbit/s each way, 20 ms one-way delay).

Measured: a `splitprune serve` process (gRPC) on loopback, a LinkProxy (LinkProfile(rate_mbit=10,
delay_ms=20)) in front of it, and the device side training through the proxy (Trainer + the gRPC client)
for `link_steps` steps of each phase of sl, deprune (B=4 then all) and ca B=1 (int8/int8), with
the same configs as the deprune suite. Per-step wall time per phase is measured, and so are the bytes
on the proxy's socket. The same steps are also measured straight to the server (no emulated link).

Extrapolated (stated as such): time to a target accuracy = sum over the deprune suite's epochs up to the
first one whose accuracy reaches the target, of (steps in that epoch) x (measured per-step time of that
epoch's phase). The accuracy curves are the in-process runs' (the transport does not change the
arithmetic); evaluation time and checkpoint saves are excluded.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from splitprune.bench.core import plots
from splitprune.bench.core.plan import plan
from splitprune.bench.core.processes import ServeSubprocess, free_port
from splitprune.bench.core.profiles import Profile
from splitprune.bench.core.report import (curve, final_curve_accuracy, load_profile, markdown_table, pct, write_csv,
                                          write_suite)
from splitprune.bench.core.runs import ensure
from splitprune.config import make_config

RUNS = ["sl", "deprune", "ca1_i8"]
PROFILE = {"rate_mbit": 10.0, "delay_ms": 20.0}
CONDITIONS = ("link", "direct")


def _link_config(name: str, prof, condition: str):
    spec = plan(prof)[name]
    values = dict(spec.values)
    values.update({"train_subset": prof.link_steps * values["batch_size"], "test_subset": 16, "epochs": None,
                   "threads": 1, "extra": {"link_condition": condition}})
    schedule = {"sl": "all:1", "deprune": "4:1,all:1", "ca1_i8": "1:1"}[name]
    values["schedule"] = schedule
    return make_config(values)


def measure(name: str, prof, condition: str, server: ServeSubprocess, out: Path) -> dict:
    from splitprune.client.connect import connect
    from splitprune.link.proxy import LinkProfile, LinkProxy
    from splitprune.training.trainer import Trainer

    folder = out / "runs" / f"{name}_{condition}"
    result_path = folder / "measurement.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    cfg = _link_config(name, prof, condition)
    proxy = None
    target = f"127.0.0.1:{server.port}"
    if condition == "link":
        proxy = LinkProxy(("127.0.0.1", 0), ("127.0.0.1", server.port), LinkProfile(**PROFILE)).start()
        target = f"127.0.0.1:{proxy.address[1]}"
    endpoint = connect(cfg, target, out=None, fresh_start=True)
    try:
        start = time.perf_counter()
        # no checkpoints: a save would fetch the whole server half over the slow link (measurement only)
        summary = Trainer(cfg, folder, endpoint=endpoint, show_progress=False, checkpoints=False,
                          log=lambda message: print(f"[link {folder.name}] {message}", flush=True)).run()
        total = time.perf_counter() - start
    finally:
        endpoint.close()
        counters = proxy.counters() if proxy else None
        if proxy:
            proxy.stop()
    steps = math.ceil(cfg.train_subset / cfg.batch_size)
    phases = [{"budget": r["budget"], "steps": steps, "seconds": r["seconds"], "seconds_per_step": r["seconds"] / steps,
               "payload_bytes_up": r["bytes_up"], "payload_bytes_down": r["bytes_down"]}
              for r in summary_rows(folder)]
    result = {"run": name, "condition": condition, "link": PROFILE if condition == "link" else None,
              "phases": phases, "wall_seconds_total": total,
              "socket_bytes_up": counters.bytes_up if counters else None,
              "socket_bytes_down": counters.bytes_down if counters else None,
              "transport": summary.get("transport"), "config": cfg.to_dict()}
    result_path.write_text(json.dumps(result, indent=2))
    return result


def summary_rows(folder: Path) -> list[dict]:
    import csv
    with open(folder / "metrics.csv") as fh:
        return [{k: (float(v) if k in ("seconds",) else int(v) if k.startswith("bytes") else v) for k, v in r.items()}
                for r in csv.DictReader(fh)]


def time_to_target(record: dict, per_step: dict[str, float], target: float) -> tuple[float | None, int | None]:
    """Seconds (extrapolated) and epochs until the run's curve first reaches `target`."""
    steps = math.ceil(record["summary"]["train_samples"] / record["summary"]["config"]["batch_size"])
    total = 0.0
    for p in curve(record):
        budget = str(p["budget"])
        total += steps * per_step[budget]
        if p["accuracy"] >= target - 1e-12:
            return total, p["epoch"]
    return None, None


def run(profile: str | Profile, out: Path) -> dict:
    prof = load_profile(profile)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root = out.parent
    records = {n: ensure(n, prof, root) for n in RUNS}
    measurements = {}
    todo = [(n, c) for n in RUNS for c in CONDITIONS
            if not (out / "runs" / f"{n}_{c}" / "measurement.json").exists()]
    server = ServeSubprocess(free_port(), "--accelerator", prof.accelerator, "--quiet", "--idle-timeout", "3600",
                             log_path=out / "serve.log", threads=1).start() if todo else None
    try:
        for n in RUNS:
            for c in CONDITIONS:
                measurements[(n, c)] = measure(n, prof, c, server, out)
    finally:
        if server is not None:
            server.stop()

    finals = {n: final_curve_accuracy(records[n]) for n in RUNS}
    targets = {"common": min(finals.values()) - 0.005, "sl_minus_1pt": finals["sl"] - 0.01}
    rows, step_rows = [], []
    for n in RUNS:
        for c in CONDITIONS:
            m = measurements[(n, c)]
            per_step = {p["budget"]: p["seconds_per_step"] for p in m["phases"]}
            # a phase label of the suite's run maps to the measured phase with the same budget
            for p in m["phases"]:
                step_rows.append({"run": n, "condition": c, **p,
                                  "socket_bytes_up_total": m["socket_bytes_up"],
                                  "socket_bytes_down_total": m["socket_bytes_down"]})
            row = {"run": n, "label": records[n]["label"], "condition": c}
            for tname, t in targets.items():
                seconds, epoch = time_to_target(records[n], per_step, t)
                row[f"target_{tname}"] = t
                row[f"seconds_to_{tname}"] = seconds
                row[f"epochs_to_{tname}"] = epoch
            rows.append(row)
    link = {r["run"]: r for r in rows if r["condition"] == "link"}
    speedups = {t: {n: (link["sl"][f"seconds_to_{t}"] / link[n][f"seconds_to_{t}"])
                    if link["sl"][f"seconds_to_{t}"] and link[n][f"seconds_to_{t}"] else None for n in RUNS}
                for t in targets}

    steps_table = markdown_table(
        ["run", "condition", "phase budget", "steps measured", "s/step", "payload KB up/step", "payload KB down/step",
         "socket MB up (whole run)", "socket MB down (whole run)"],
        [[r["run"], r["condition"], r["budget"], r["steps"], f"{r['seconds_per_step']:.3f}",
          f"{r['payload_bytes_up'] / r['steps'] / 1e3:,.2f}", f"{r['payload_bytes_down'] / r['steps'] / 1e3:,.2f}",
          f"{r['socket_bytes_up_total'] / 1e6:.2f}" if r["socket_bytes_up_total"] else "-",
          f"{r['socket_bytes_down_total'] / 1e6:.2f}" if r["socket_bytes_down_total"] else "-"] for r in step_rows])

    def fmt(s):
        return "not reached" if s is None else f"{s / 60:.1f} min"

    tta_table = markdown_table(
        ["run", "condition", f"to {pct(targets['common'])} (all runs reach it)", "epochs",
         f"to {pct(targets['sl_minus_1pt'])} (sl final - 1 pt)", "epochs"],
        [[r["label"], r["condition"], fmt(r["seconds_to_common"]), r["epochs_to_common"] or "-",
          fmt(r["seconds_to_sl_minus_1pt"]), r["epochs_to_sl_minus_1pt"] or "-"] for r in rows])
    n_train = records["sl"]["summary"]["train_samples"]
    lines = [f"- Over the 10 Mbit/s, 20 ms link, to {pct(targets['common'])}: "
             + ", ".join(f"{records[n]['label']} {speedups['common'][n]:.1f}x faster than sl" for n in RUNS[1:]
                         if speedups["common"][n]) + ".",
             f"- To {pct(targets['sl_minus_1pt'])}: "
             + ", ".join(f"{records[n]['label']} " + (f"{speedups['sl_minus_1pt'][n]:.1f}x faster than sl"
                                                       if speedups["sl_minus_1pt"][n] else "does not reach it")
                         for n in RUNS[1:]) + ".",
             f"- Extrapolation: per-step times measured on {prof.link_steps} steps of each phase; accuracy per "
             f"epoch from the deprune suite's seed-0 in-process runs ({n_train} training images per epoch, accuracy "
             f"on the curve test subset); evaluation and checkpoint time excluded. One seed and an extrapolation: "
             f"a measurement of what the link costs, not a verdict."]
    markdown = (f"### time to accuracy over a 10 Mbit/s, 20 ms link ({prof.name} profile)\n\nMeasured per step:\n\n"
                f"{steps_table}\nTime to accuracy (extrapolated from the measured per-step times):\n\n{tta_table}\n"
                + "\n".join(lines) + "\n")
    print(markdown)

    fig, (ax1, ax2) = plots.figure(2)
    for cond, ax in zip(CONDITIONS, (ax1, ax2)):
        series = []
        for n in RUNS:
            per_step = {p["budget"]: p["seconds_per_step"] for p in measurements[(n, cond)]["phases"]}
            steps = math.ceil(records[n]["summary"]["train_samples"] / records[n]["summary"]["config"]["batch_size"])
            xs, t = [], 0.0
            for p in curve(records[n]):
                t += steps * per_step[str(p["budget"])]
                xs.append(t / 60)
            series.append((records[n]["label"], xs, [p["accuracy"] for p in curve(records[n])]))
        title = "over 10 Mbit/s, 20 ms (emulated)" if cond == "link" else "straight to the server (loopback gRPC)"
        plots.curves(ax, series, "training wall time (min, extrapolated from measured steps)", title=title)
        plots.hline(ax, targets["common"], "target (all reach)")
        accs = [a for _, _, ys in series for a in ys]
        plots.zoom_y(ax, sorted(accs)[len(accs) // 4:], pad=2.0)
    plots.save(fig, out / "link.png")

    write_csv(out / "link_steps.csv", step_rows)
    write_csv(out / "link.csv", rows)
    write_suite(out, "link", prof, {"link": PROFILE, "targets": targets, "time_to_target": rows, "steps": step_rows,
                                    "speedup_vs_sl": speedups}, markdown)
    return {"table": tta_table}
