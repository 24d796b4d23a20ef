"""(c) resolution compression r = 1, 2 (paper Fig. 8) where the shapes allow.

The encoder Conv(k=2+r, stride r, pad r) shrinks the 4x4 cut of 32x32 inputs to 3x3 at r=2; r=3 gives
2x2, which the decoder cannot restore to 4x4, so the run is refused (recorded here). Compared: deprune
and ca B=4 at r=1 (the deprune suite's runs) and r=2.
"""
from __future__ import annotations

from pathlib import Path

from splitprune.bench import plots
from splitprune.bench.report import (curve, load_profile, markdown_table, megabytes, partial_note, pct, pts, ratio,
                                     run_row, write_csv, write_suite)
from splitprune.bench.runs import ensure
from splitprune.compression import encoded_shape
from splitprune.errors import UserError
from splitprune.models import cut_shape

PAIRS = [("ca4", "ca4_r2")]


def shapes(model: str, input_size: int = 32, in_channels: int = 1) -> list[dict]:
    cut = cut_shape(model, "conv5", in_channels, input_size)
    out = []
    for r in (1, 2, 3):
        try:
            out.append({"resolution": r, "cut": list(cut), "wire": list(encoded_shape(cut, r)), "refused": None})
        except UserError as exc:
            out.append({"resolution": r, "cut": list(cut), "wire": None, "refused": str(exc)})
    return out


def run(profile: str, out: Path) -> dict:
    prof = load_profile(profile)
    root = Path(out).parent
    names = [n for pair in PAIRS for n in pair]
    records = {n: ensure(n, prof, root) for n in ["sl", *names]}
    rows = [run_row(records[n], records["sl"]) for n in names]
    by = {r["run"]: r for r in rows}
    geometry = shapes(prof.model)
    table = markdown_table(
        ["run", "r", "wire tensor", "accuracy (full test)", "vs sl", "train MB up", "train MB down", "traffic vs sl",
         "inference B/sample", "single-sample request B", "epochs"],
        [[r["label"], r["resolution"], "x".join(str(v) for v in r["wire_shape"] or []), r["accuracy_text"],
          pts(r["accuracy_vs_sl"]), megabytes(r["train_bytes_up"]), megabytes(r["train_bytes_down"]),
          ratio(r["traffic_vs_sl"]), f"{r['inference_bytes_per_sample']:,.1f}" if r["inference_bytes_per_sample"]
          else "n/a", r["inference_bytes_single_sample"] or "n/a", r["epochs_text"]] for r in rows])
    lines = []
    for base, r2 in PAIRS:
        a, b = by[base], by[r2]
        if a["accuracy"] is None or b["accuracy"] is None or not a["inference_bytes_per_sample"] \
                or not b["inference_bytes_per_sample"]:
            continue
        note = partial_note(records[base], records[r2])
        if note:
            lines.append(f"- {b['label']} vs r=1: {note}.")
            continue
        lines.append(f"- {b['label']} vs r=1: accuracy {pts(b['accuracy'] - a['accuracy'])}, training traffic "
                     f"{ratio(a['train_bytes'] / b['train_bytes'])} less, inference uplink "
                     f"{ratio(a['inference_bytes_per_sample'] / b['inference_bytes_per_sample'])} less.")
    refused = [g for g in geometry if g["refused"]]
    for g in refused:
        lines.append(f"- r={g['resolution']} refused at this cut: {g['refused']}")
    markdown = f"### resolution compression ({prof.name} profile)\n\n{table}\n" + "\n".join(lines) + "\n"
    print(markdown)

    plots.accuracy_panels(records, names, curve, "accuracy per epoch, r=1 vs r=2", Path(out) / "resolution.png")

    write_csv(Path(out) / "resolution.csv", rows)
    write_csv(Path(out) / "resolution_curves.csv", [{"run": n, **p} for n in names for p in curve(records[n])])
    write_suite(Path(out), "resolution", prof, {"runs": rows, "geometry": geometry}, markdown)
    return {"table": table}
