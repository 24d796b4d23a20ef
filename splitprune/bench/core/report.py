"""Helpers for the paper-claim suites: result files, per-run numbers read from the runs, formatting."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from splitprune.bench.core.common import markdown_table, write_results
from splitprune.bench.core.plan import seed_names
from splitprune.bench.core.profiles import Profile, get_profile
from splitprune.bench.core.runs import ensure, headline_accuracy
from splitprune.bench.core.verdict import Interval, interval

__all__ = ["seeded_records", "accuracy_interval", "partial_note", "pct", "pts", "megabytes", "ratio", "write_suite", "write_csv", "curve", "traffic", "markdown_table",
           "final_curve_accuracy", "first_reaching", "run_row"]


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f} pt"


def megabytes(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.2f}"


def ratio(x: float | None) -> str:
    return "n/a" if x is None else (f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x")


def write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def write_suite(out: Path, name: str, profile: Profile, results: dict, markdown: str) -> Path:
    """NAME.json (results + command + machine + profile), NAME.md (tables and claims)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(markdown)
    return write_results(out, name, {"profile": profile.settings(), **results})


def curve(record: dict) -> list[dict]:
    """Per-epoch points of a run: epoch, budget, accuracy (curve test subset), cumulative bytes and train seconds."""
    points, up, down, seconds = [], 0, 0, 0.0
    for row in record["rows"]:
        up += row["bytes_up"]
        down += row["bytes_down"]
        seconds += row["seconds"]
        points.append({"epoch": row["epoch"], "budget": row["budget"], "accuracy": row["test_accuracy"],
                       "bytes_up": up, "bytes_down": down, "bytes": up + down, "train_seconds": seconds,
                       "phase": row["phase"]})
    return points


def traffic(record: dict) -> dict:
    s = record["summary"]
    samples = sum(1 for _ in record["rows"])
    per_epoch = s.get("train_samples")
    total = s["bytes_up"] + s["bytes_down"]
    return {"bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"], "bytes": total,
            "bytes_per_sample": total / (samples * per_epoch) if per_epoch and samples else None}


def final_curve_accuracy(record: dict, last: int = 2) -> float | None:
    rows = record["rows"][-last:]
    return sum(r["test_accuracy"] for r in rows) / len(rows) if rows else None


def first_reaching(points: list[dict], target: float, key: str, budget: str | None = None,
                   start: float = 0.0) -> float | None:
    """`key` (minus `start`) at the first point whose accuracy reaches `target` (optionally at one budget)."""
    for p in points:
        if budget is not None and str(p["budget"]) != budget:
            continue
        if p["accuracy"] >= target - 1e-12:
            return p[key] - start
    return None


def run_row(record: dict, sl: dict | None = None) -> dict:
    """The numbers every suite reports for a run."""
    acc, how = headline_accuracy(record)
    t = traffic(record)
    s = record["summary"]
    full = record["full_test"]
    last3 = [r["test_accuracy"] for r in record["rows"][-3:]]
    row = {"run": record["name"], "label": record["label"], "complete": record["complete"],
           "epochs": len(record["rows"]), "planned_epochs": record.get("planned_epochs"),
           "epochs_text": (f"{len(record['rows'])}" if record["complete"] else
                           f"{len(record['rows'])} of {record.get('planned_epochs')} (stopped)"),
           "accuracy": acc, "accuracy_measured_on": how,
           "accuracy_text": pct(acc) + ("" if full or record["summary"]["config"].get("test_subset") is None
                                        else f" ({record['summary']['config']['test_subset']} test images)"),
           "seed": s["config"].get("seed"),
           "curve_last_epoch": last3[-1] if last3 else None,
           "curve_change_last_2": abs(last3[-1] - last3[-2]) if len(last3) >= 2 else None,
           "train_bytes_up": t["bytes_up"], "train_bytes_down": t["bytes_down"], "train_bytes": t["bytes"],
           "train_bytes_per_sample": t["bytes_per_sample"],
           "inference_bytes_per_sample": full[-1]["bytes_per_sample"] if full else s.get("inference_bytes_per_sample"),
           "inference_bytes_single_sample": full[-1]["single_sample_bytes"] if full else
           s.get("inference_bytes_single_sample"),
           "final_budget": s.get("final_budget"), "dtype_up": s["config"]["dtype_up"],
           "dtype_down": s["config"]["dtype_down"], "resolution": s["config"]["resolution"],
           "wire_shape": s.get("wire_shape"), "train_seconds": sum(r["seconds"] for r in record["rows"]),
           "command": record["command"]}
    if sl is not None:
        sl_acc, _ = headline_accuracy(sl)
        sl_bytes = traffic(sl)["bytes"]
        row["traffic_vs_sl"] = sl_bytes / t["bytes"] if t["bytes"] else None
        row["accuracy_vs_sl"] = acc - sl_acc if acc is not None and sl_acc is not None else None
    return row


def load_profile(profile: str | Profile) -> Profile:
    return profile if isinstance(profile, Profile) else get_profile(profile)


def dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))


def partial_note(*records: dict) -> str | None:
    """None if every run finished; else a verdict saying which did not (claims need whole schedules)."""
    stopped = [f"{r['name']} ({len(r['rows'])} of {r.get('planned_epochs')} epochs)" for r in records
               if not r["complete"]]
    return f"not measured: run(s) stopped before the end of their schedule: {', '.join(stopped)}" if stopped else None


def seeded_records(base: str, profile: Profile, root: Path) -> list[dict]:
    """The run BASE at every seed of the profile (trained if missing)."""
    return [ensure(name, profile, root) for name in seed_names(base, profile)]


def accuracy_interval(records: list[dict]) -> Interval | None:
    """[worst, best] final-model accuracy over a run's seeds; None if a seed stopped early or is missing."""
    if any(not r["complete"] for r in records):
        return None
    return interval([headline_accuracy(r)[0] for r in records])
