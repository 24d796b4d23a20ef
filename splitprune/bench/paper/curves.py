"""The four methods side by side (paper Fig. 6 and 10 in one figure): accuracy per epoch and cumulative
training traffic per epoch of sl, ca B=4, deprune and prune 32->4, at every seed of the profile. Nothing is
judged here (the deprune and prune suites do that); it trains nothing the two suites do not.
"""
from __future__ import annotations

from pathlib import Path

from splitprune.bench.core import plots
from splitprune.bench.core.profiles import Profile
from splitprune.bench.core.report import curve, load_profile, megabytes, pct, seeded_records, write_csv, write_suite

METHODS = ("sl", "ca4", "deprune", "prune")
STYLES = ("-", "--", ":", "-.")  # per seed


def run(profile: str | Profile, out: Path) -> dict:
    prof = load_profile(profile)
    root = Path(out).parent
    records = {b: seeded_records(b, prof, root) for b in METHODS}
    fig, (ax1, ax2) = plots.figure(2, width=6.8, height=4.8)
    rows = []
    for i, base in enumerate(METHODS):
        for j, record in enumerate(records[base]):
            points = curve(record)
            seed = record["summary"]["config"]["seed"]
            style = dict(color=plots.COLORS[i], linestyle=STYLES[j % len(STYLES)], marker="o", markersize=2.5,
                         linewidth=1.4, label=record["label"], zorder=3 if base == "ca4" else 2)
            epochs = [p["epoch"] for p in points]
            ax1.plot(epochs, [100 * p["accuracy"] for p in points], **style)
            ax2.plot(epochs, [p["bytes"] / 1e6 for p in points], **style)
            rows += [{"run": record["name"], "method": base, "seed": seed, **p} for p in points]
    subset = records["sl"][0]["summary"]["config"].get("test_subset")
    ax1.set_title(f"accuracy per epoch ({subset or 'all'} test images; prune: epochs after sl)", fontsize=10)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("test accuracy (%)")
    accuracies = sorted(100 * r["accuracy"] for r in rows)
    ax1.set_ylim(accuracies[len(accuracies) // 5] - 2, min(100, accuracies[-1] + 1))
    ax2.set_yscale("log")
    ax2.set_title("cumulative training traffic, up + down (prune: sl's own not counted)", fontsize=10)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("MB (log)")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.text(0.5, 0.115, "deprune is ca B=4 until its budget is relaxed (same seed, same steps): their lines "
             "coincide there", ha="center", fontsize=8)
    fig.tight_layout(rect=(0, 0.16, 1, 1))
    Path(out).mkdir(parents=True, exist_ok=True)
    fig.savefig(Path(out) / "curves.png", dpi=110)
    plots.plt.close(fig)

    lines = [f"- {r['label']} (seed {r['summary']['config']['seed']}): last curve point "
             f"{pct(curve(r)[-1]['accuracy'])}, {megabytes(curve(r)[-1]['bytes'])} MB up + down in "
             f"{len(r['rows'])} epochs" for rs in records.values() for r in rs]
    markdown = (f"### the four methods' curves ({prof.name} profile)\n\n![curves](curves.png)\n\n"
                + "\n".join(lines) + "\n")
    write_csv(Path(out) / "curves.csv", rows)
    write_suite(Path(out), "curves", prof, {"points": len(rows)}, markdown)
    return {"points": len(rows)}
