"""The figure of one `--budget auto` run: the link's rate, the budget chosen and the latency of every request
over time, from the JSON log `splitprune infer --budget auto --log FILE` writes."""
from __future__ import annotations

import json
from pathlib import Path

from splitprune.errors import UserError
from splitprune.link.trace import LinkTrace


def read_log(path: str | Path) -> dict:
    try:
        doc = json.loads(Path(path).read_text())
        rows = doc["rows"]
        doc["target_ms"] = float(doc["target_ms"])
        if not rows or not all({"t", "unix", "budget", "dtype", "latency_ms", "within"} <= set(r) for r in rows):
            raise KeyError("rows")
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path} is not a log of `splitprune infer --budget auto --log` ({exc})") from None
    return doc


def plot_stream(doc: dict, out: Path, trace: LinkTrace | None = None, trace_start_unix: float | None = None,
                title: str | None = None) -> Path:
    """Three panels over the seconds of the run: rate (the trace's, when given, and the controller's estimate),
    the budget of each request (marker per uplink dtype), its latency against the target."""
    from splitprune.bench.core.plots import COLORS, plt, save

    rows = doc["rows"]
    t0 = doc.get("started_unix", rows[0]["unix"])
    ts = [r["unix"] - t0 for r in rows]
    fig, (rate, budget, latency) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    shown: list[float] = []
    if trace is not None:
        offset = t0 - (trace_start_unix if trace_start_unix is not None else t0)   # trace seconds at t = 0
        end = ts[-1] + 0.5
        xs = [0.0] + [t - offset for t in trace.times if 0 < t - offset < end] + [end]
        shown = [trace.mbit_at(x + offset) for x in xs]
        rate.step(xs, shown, where="post", color=COLORS[0], label="link (trace)")
    estimates = [(t, r["estimated_mbit"]) for t, r in zip(ts, rows) if r.get("estimated_mbit")]
    if not shown and estimates:   # no trace: the axis spans most estimates, not a stray one
        ordered = sorted(e for _, e in estimates)
        shown = ordered[len(ordered) // 10: max(len(ordered) * 9 // 10, 1)]
    low, high = (min(shown) / 10, max(shown) * 10) if shown else (None, None)
    if estimates:   # estimates off the axis (a fit of two nearly equal sizes) are drawn at its edge
        clipped = [(t, min(max(e, low), high) if shown else e) for t, e in estimates]
        rate.plot(*zip(*clipped), ".", markersize=2.5, color=COLORS[1], label="controller's estimate")
    rate.set(ylabel="Mbit/s", yscale="log", title="link rate")
    if shown:
        rate.set_ylim(low / 1.2, high * 1.2)
    rate.legend(fontsize=8)
    for i, dtype in enumerate(sorted({r["dtype"] for r in rows})):
        own = [(t, r["budget"]) for t, r in zip(ts, rows) if r["dtype"] == dtype]
        budget.plot(*zip(*own), "o", markersize=2.5, color=COLORS[i + 2], label=dtype)
    budget.set(ylabel="budget (channels)", yscale="log", title="chosen budget")
    budget.legend(fontsize=8)
    for late, color, label in ((False, COLORS[2], "within target"), (True, COLORS[1], "late")):
        own = [(t, r["latency_ms"]) for t, r in zip(ts, rows) if r["within"] != late]
        if own:
            latency.plot(*zip(*own), ".", markersize=3, color=color, label=label)
    latency.axhline(doc["target_ms"], color="gray", linestyle="--", linewidth=1, label=f"target {doc['target_ms']:g} ms")
    top = max(max(r["latency_ms"] for r in rows), doc["target_ms"])
    latency.set(xlabel="seconds since the first request", ylabel="ms", title="latency per request",
                ylim=(0, min(top, 4 * doc["target_ms"]) * 1.1))
    latency.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, out)
