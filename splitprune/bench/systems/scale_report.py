"""The report of `splitprune bench scale`: per-cell rows -> medians, batched/alone ratios, the verdict,
scale.{json,csv,md,png}. merge_rows() is where rows of other server layouts (e.g. 1 vs 2 replicas,
splitprune/bench/systems/scale_replicas.py) join the same table and plot: same keys as scale.Cell, their own
`replicas`.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.core.verdict import Interval, verdict

TARGET, TARGET_CLIENTS = 1.5, 8  # batching's samples/s over one-at-a-time with 8 concurrent clients
WORKLOAD_ORDER = ("infer-1", "infer-4", "train-8")


def summarize(rows: list[dict]) -> list[dict]:
    """Median over repeats per (workload, clients, mode, replicas)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["clients"], r["mode"], r.get("replicas", 1)), []).append(r)
    summary = []
    for (workload, clients, mode, replicas), group in sorted(groups.items()):
        summary.append({"workload": workload, "clients": clients, "mode": mode, "replicas": replicas,
                        "repeats": len(group),
                        **{k: statistics.median(g[k] for g in group)
                           for k in ("samples_per_s", "p50_ms", "p99_ms", "client_cpu", "server_cpu",
                                     "samples_per_cpu_s")},
                        "samples_per_s_min": min(g["samples_per_s"] for g in group),
                        "samples_per_s_max": max(g["samples_per_s"] for g in group),
                        "failed": sum(g["failed"] for g in group),
                        "load1": statistics.median(g.get("load1", float("nan")) for g in group)})
    return summary


def speedups(summary: list[dict]) -> list[dict]:
    """Batched over alone per workload and client count (one replica): median ratio and the conservative
    one (slowest batched repeat over fastest alone repeat)."""
    by = {(s["workload"], s["clients"], s["mode"]): s for s in summary if s["replicas"] == 1}
    out = []
    for (workload, clients, mode), s in sorted(by.items()):
        base = by.get((workload, clients, "alone"))
        if mode == "batched" and base:
            out.append({"workload": workload, "clients": clients,
                        "speedup": s["samples_per_s"] / base["samples_per_s"],
                        "speedup_conservative": s["samples_per_s_min"] / base["samples_per_s_max"],
                        "speedup_optimistic": s["samples_per_s_max"] / base["samples_per_s_min"],
                        "cpu_efficiency": s["samples_per_cpu_s"] / base["samples_per_cpu_s"]})
    return out


def verdict_line(r: dict) -> str:
    """The verdict rule (bench.core.verdict) on the speed-up's interval over the repeats: from the slowest batched
    repeat over the fastest one-at-a-time one to the fastest over the slowest; holds only if even the first
    meets the target."""
    speedup = Interval(r["speedup_conservative"], r.get("speedup_optimistic", r["speedup_conservative"]))
    return (f"{r['workload']}, {r['clients']} clients: {verdict(speedup, TARGET)}: batching gives {r['speedup']:.2f}x the samples/s "
            f"of one request at a time (median of repeats; slowest vs fastest repeat {r['speedup_conservative']:.2f}x; "
            f"per server CPU second {r['cpu_efficiency']:.2f}x); target >= {TARGET}x")


def report(out: Path, rows: list[dict], meta: dict) -> dict:
    from splitprune.bench.core.plots import COLORS, figure, save
    from splitprune.bench.core.report import write_csv

    summary = summarize(rows)
    ratios = speedups(summary)
    verdict = "\n".join(verdict_line(r) for r in ratios if r["clients"] == TARGET_CLIENTS) or "n/a"
    write_csv(out / "scale.csv", summary)
    series = sorted({(s["workload"], s["mode"], s["replicas"]) for s in summary})
    fig, (ax_rate, ax_lat) = figure(ncols=2)
    for i, (workload, mode, replicas) in enumerate(series):
        pts = [s for s in summary if (s["workload"], s["mode"], s["replicas"]) == (workload, mode, replicas)]
        label = f"{workload} {mode}" + (f" x{replicas}" if replicas != 1 else "")
        style = dict(color=COLORS[WORKLOAD_ORDER.index(workload) % len(COLORS)] if workload in WORKLOAD_ORDER
                     else COLORS[(i + 3) % len(COLORS)], linestyle="-" if mode == "batched" else "--", marker="o")
        ax_rate.plot([p["clients"] for p in pts], [p["samples_per_s"] for p in pts], label=label, **style)
        ax_lat.plot([p["clients"] for p in pts], [p["p99_ms"] for p in pts], label=label, **style)
    for ax, ylabel in ((ax_rate, "server samples/s (median)"), (ax_lat, "p99 request latency (ms)")):
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ticks = sorted({s["clients"] for s in summary})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(True, which="both", alpha=0.3)
    ax_lat.set_yscale("log")
    ax_rate.legend(fontsize=7)
    save(fig, out / "scale.png")
    table = markdown_table(
        ["workload", "clients", "server", "replicas", "samples/s (median; min-max)", "p50 ms", "p99 ms",
         "client / server CPU", "samples per server CPU-s", "load", "failed"],
        [[s["workload"], s["clients"], s["mode"], s["replicas"],
          f"{s['samples_per_s']:.0f} ({s['samples_per_s_min']:.0f}-{s['samples_per_s_max']:.0f})",
          f"{s['p50_ms']:.1f}", f"{s['p99_ms']:.1f}", f"{s['client_cpu']:.2f} / {s['server_cpu']:.2f}",
          f"{s['samples_per_cpu_s']:.0f}", f"{s['load1']:.1f}", s["failed"]] for s in summary])
    ratio_table = markdown_table(["workload", "clients", "samples/s batched / alone (median)", "conservative",
                                  "samples per server CPU-s, batched / alone"],
                                 [[r["workload"], r["clients"], f"{r['speedup']:.2f}x",
                                   f"{r['speedup_conservative']:.2f}x", f"{r['cpu_efficiency']:.2f}x"]
                                  for r in ratios])
    (out / "scale.md").write_text(f"`{meta['scale_command']}`\n\nLoad before / after: {meta['uptime_before']} / "
                                  f"{meta['uptime_after']}\n\n{table}\n{ratio_table}\n{verdict}\n")
    (out / "command.txt").write_text(meta["scale_command"] + "\n")
    print(table + "\n" + ratio_table + "\n" + verdict)
    write_results(out, "scale", {**meta, "verdict": verdict, "speedups": ratios, "summary": summary, "rows": rows})
    return {"summary": summary, "speedups": ratios, "verdict": verdict}


def merge_rows(out: Path, extra: list[dict]) -> dict:
    """Add rows measured elsewhere (same keys as Cell: workload, clients, mode, repeat, samples_per_s,
    p50_ms, p99_ms, failed, client_cpu, server_cpu, replicas) to bench_results/scale and rewrite it."""
    saved = json.loads((out / "scale.json").read_text())
    meta = {k: saved[k] for k in ("scale_command", "uptime_before", "uptime_after", "profile", "window_ms",
                                  "clients_are", "accelerator")}
    return report(out, saved["rows"] + list(extra), meta)
