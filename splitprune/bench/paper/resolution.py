"""(c) resolution compression r = 1, 2 (paper Fig. 8) where the shapes allow.

The encoder Conv(k=2+r, stride r, pad r) shrinks the 4x4 cut of 32x32 inputs to 3x3 at r=2; r=3 gives
2x2, which the decoder cannot restore to 4x4, so the run is refused (recorded here). Compared: deprune
and ca B=4 at r=1 (the deprune suite's runs) and r=2.
"""
from __future__ import annotations

from pathlib import Path

from splitprune.bench.core import plots
from splitprune.bench.core.profiles import Profile
from splitprune.bench.core.report import (accuracy_interval, curve, load_profile, markdown_table, megabytes,
                                          partial_note, pts, ratio, run_row, seeded_records, write_csv, write_suite)
from splitprune.bench.core.verdict import difference
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


def run(profile: str | Profile, out: Path) -> dict:
    prof = load_profile(profile)
    root = Path(out).parent
    bases = [n for pair in PAIRS for n in pair]
    seeds = {b: seeded_records(b, prof, root) for b in ["sl", *bases]}
    sl_of = {r["summary"]["config"]["seed"]: r for r in seeds["sl"]}
    records = {r["name"]: r for b in bases for r in seeds[b]}
    names = list(records)
    rows = [run_row(r, sl_of[r["summary"]["config"]["seed"]]) for r in records.values()]
    by = {r["run"]: r for r in rows}
    geometry = shapes(prof.model)
    table = markdown_table(
        ["run", "seed", "r", "wire tensor", "accuracy (final model, full test)", "vs sl (same seed)", "train MB up",
         "train MB down", "traffic vs sl", "inference B/sample (batch)", "single-request payload B", "epochs"],
        [[r["label"], r["seed"], r["resolution"], "x".join(str(v) for v in r["wire_shape"] or []), r["accuracy_text"],
          pts(r["accuracy_vs_sl"]), megabytes(r["train_bytes_up"]), megabytes(r["train_bytes_down"]),
          ratio(r["traffic_vs_sl"]), f"{r['inference_bytes_per_sample']:,.1f}" if r["inference_bytes_per_sample"]
          else "n/a", r["inference_bytes_single_sample"] or "n/a", r["epochs_text"]] for r in rows])
    lines = []
    for base, r2 in PAIRS:
        a, b = by[base], by[r2]
        note = partial_note(*seeds[base], *seeds[r2])
        if note:
            lines.append(f"- {b['label']} vs r=1: {note}.")
            continue
        gap = difference(accuracy_interval(seeds[r2]), accuracy_interval(seeds[base]))
        lines.append(f"- {b['label']} vs r=1: accuracy {gap.text() if gap else 'n/a'} (any pairing of seeds "
                     f"{list(prof.seeds)}), training traffic {ratio(a['train_bytes'] / b['train_bytes'])} less, "
                     f"inference uplink {ratio(a['inference_bytes_per_sample'] / b['inference_bytes_per_sample'])} "
                     "less (seed 0).")
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
