"""(b) prune vs ca from scratch at B=4 (paper Fig. 10): accuracy against epochs and wall time.

prune starts from the trained sl model (the paper's transfer setting: the sl model already exists, its
training is not counted) and trains B=32 then B=4; ca trains B=4 from scratch. At each seed. Claim C3: a model
at each new budget up to 6x faster than ca, accuracy unaffected. Measured here: training time (the
trainer's per-epoch training seconds, evaluation excluded) until the curve first comes within 1 point
of the from-scratch run's final curve accuracy; the same in epochs (equal samples per epoch on both sides).
"""
from __future__ import annotations

from pathlib import Path

from splitprune.bench.core import plots
from splitprune.bench.core.profiles import Profile
from splitprune.bench.core.report import (accuracy_interval, curve, final_curve_accuracy, first_reaching, load_profile,
                                          markdown_table, partial_note, pct, pts, ratio, run_row, seeded_records,
                                          write_csv, write_suite)
from splitprune.bench.core.runs import headline_accuracy
from splitprune.bench.core.verdict import Interval, difference, explain, interval, verdict

BUDGET = 4  # prune's last phase and ca's from-scratch budget compared (B=32 was cut from the quick profile)


def _seed_row(prune: dict, ca: dict, sl: dict) -> dict:
    """One seed: how soon prune's B=4 phase and ca B=4 from scratch come within 1 pt of ca's final curve accuracy."""
    pc, cc = curve(prune), curve(ca)
    start_e = 0
    for p in pc:  # epochs spent before the B=4 phase began
        if str(p["budget"]) == str(BUDGET):
            start_e = p["epoch"] - 1
            break
    reference = final_curve_accuracy(ca, last=1)
    target = reference - 0.01 if reference is not None else None
    t_ca = first_reaching(cc, target, "train_seconds") if target is not None else None
    e_ca = first_reaching(cc, target, "epoch") if target is not None else None
    t_pr = first_reaching(pc, target, "train_seconds", budget=str(BUDGET)) if target is not None else None
    e_pr = first_reaching(pc, target, "epoch", budget=str(BUDGET)) if target is not None else None
    ca_acc, pr_acc = headline_accuracy(ca)[0], headline_accuracy(prune)[0]
    return {"seed": ca["summary"]["config"]["seed"], "budget": BUDGET, "ca_final_curve_accuracy": reference,
            "target": target, "ca_seconds_to_target": t_ca, "ca_epochs_to_target": e_ca,
            "prune_seconds_to_target": t_pr, "prune_epochs_to_target": e_pr,
            "C3_epoch_ratio": e_ca / e_pr if e_ca and e_pr else None,
            "C3_epoch_ratio_phase_only": e_ca / (e_pr - start_e) if e_ca and e_pr and e_pr > start_e else None,
            "C3_time_ratio": t_ca / t_pr if t_ca and t_pr else None,
            "C3_time_ratio_with_sl_training": (t_ca / (t_pr + sum(r["seconds"] for r in sl["rows"]))
                                               if t_ca and t_pr else None),
            "ca_accuracy": ca_acc, "prune_accuracy": pr_acc,
            "prune_minus_ca": pr_acc - ca_acc if pr_acc is not None and ca_acc is not None else None,
            "partial": partial_note(prune, ca)}


def run(profile: str | Profile, out: Path) -> dict:
    prof = load_profile(profile)
    root = Path(out).parent
    seeds = {b: seeded_records(b, prof, root) for b in ("sl", "prune", "ca4")}
    results = [_seed_row(p, c, s) for p, c, s in zip(seeds["prune"], seeds["ca4"], seeds["sl"])]
    table = markdown_table(
        ["seed", "ca B=4 from scratch (final, full test)", "prune 32->4 from sl (final, full test)", "prune - ca",
         "target (ca's last curve epoch - 1 pt)", "ca: time to target", "prune: time to target",
         "epoch ratio (whole prune run)", "epoch ratio (prune's B=4 phase only)", "measured-time ratio"],
        [[r["seed"], pct(r["ca_accuracy"]), pct(r["prune_accuracy"]), pts(r["prune_minus_ca"]), pct(r["target"]),
          _time(r["ca_seconds_to_target"], r["ca_epochs_to_target"]),
          _time(r["prune_seconds_to_target"], r["prune_epochs_to_target"]), ratio(r["C3_epoch_ratio"]),
          ratio(r["C3_epoch_ratio_phase_only"]), ratio(r["C3_time_ratio"])] for r in results])
    names = [r["name"] for rs in seeds.values() for r in rs]
    records = {r["name"]: r for rs in seeds.values() for r in rs}
    runs_table = markdown_table(["run", "accuracy (final model, full test)", "epochs", "train seconds", "command"],
                                [[records[n]["label"], run_row(records[n])["accuracy_text"],
                                  run_row(records[n])["epochs_text"],
                                  f"{sum(r['seconds'] for r in records[n]['rows']):.0f}",
                                  f"`{records[n]['command']}`"] for n in names])
    partial = [r["partial"] for r in results if r["partial"]]
    gap = difference(accuracy_interval(seeds["prune"]), accuracy_interval(seeds["ca4"]))
    speed = interval([r["C3_epoch_ratio"] or 0.0 for r in results])  # not reached counts as no speed-up
    accuracy_verdict = partial[0] if partial else explain(gap, -0.01, "prune - ca B=4")
    speed_verdict = partial[0] if partial else verdict(speed, 1.0 + 1e-9)
    lines = [
        f"- C3 accuracy (prune's final B=4 model within 1 pt of ca B=4 trained from scratch) -> {accuracy_verdict}.",
        f"- C3 speed (paper: up to 6x less training time; here: prune reaches ca's final curve accuracy - 1 pt in "
        f"fewer epochs than ca, whole prune run counted): epoch ratio "
        f"{', '.join(ratio(r['C3_epoch_ratio']) if r['C3_epoch_ratio'] else 'not reached' for r in results)} "
        f"over seeds {list(prof.seeds)} -> {speed_verdict}"
        + (f" (worst seed {ratio(speed.low)})" if isinstance(speed, Interval) and speed.low else "") + ".",
        "- Epochs hold the same samples and a prune step costs what a ca step costs, so the epoch ratio is the "
        "time ratio on an idle machine; measured seconds also carry whatever else ran. A ratio is a lower "
        "bound when prune is within 1 pt after its first epoch (the curve is sampled once per epoch).",
    ]
    markdown = (f"### prune vs ca from scratch at B=4 ({prof.name} profile)\n\n{table}\n{runs_table}\n"
                + "\n".join(lines) + "\n\nTimes: cumulative training seconds (evaluation excluded) until the "
                "per-epoch curve first reaches the target; prune's time counts from the start of the prune run "
                "(both its phases), not the sl model's own training.\n")
    print(markdown)

    fig, (ax1, ax2) = plots.figure(2)
    series_e, series_t = [], []
    for n in names:
        if n.startswith("sl"):
            continue
        c = curve(records[n])
        series_e.append((records[n]["label"], [p["epoch"] for p in c], [p["accuracy"] for p in c]))
        series_t.append((records[n]["label"], [p["train_seconds"] for p in c], [p["accuracy"] for p in c]))
    plots.curves(ax1, series_e, "epoch (prune: from the sl model)", title="accuracy against epochs")
    plots.curves(ax2, series_t, "training time (s, evaluation excluded)", title="accuracy against wall time")
    accs = [a for _, _, ys in series_e for a in ys]
    for ax in (ax1, ax2):
        plots.zoom_y(ax, sorted(accs)[len(accs) // 4:], pad=2.0)
    plots.save(fig, Path(out) / "prune.png")

    rows = [run_row(records[n]) for n in names]
    claims = {"C3_accuracy": accuracy_verdict, "C3_speed": speed_verdict,
              "prune_minus_ca4_interval": gap.__dict__ if gap else None}
    write_csv(Path(out) / "prune.csv", results)
    write_csv(Path(out) / "prune_runs.csv", rows)
    write_csv(Path(out) / "prune_curves.csv", [{"run": n, **p} for n in names for p in curve(records[n])])
    write_suite(Path(out), "prune", prof, {"budgets": results, "runs": rows, "claims": claims}, markdown)
    return {"table": table, "results": results, "claims": claims}


def _time(seconds: float | None, epochs: float | None) -> str:
    if seconds is None:
        return "not reached"
    return f"{seconds:.0f} s ({epochs:g} ep)"

