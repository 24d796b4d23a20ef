"""(d) rate-accuracy: trained models' test accuracy against measured uplink bytes per sample.

Models: the sl model (all channels) and a prune chain from it (B = 64, 32, 16, 8, 4, 2, 1, one short phase
each: a trained model at every budget), each evaluated with fp32, fp16, int8 and int4 on the wire (the
profile's `chain_dtypes` for the chain). Baselines at
the same bytes (splitprune.bench.baselines): top-k activation values of the sl model, 2 random fixed
channels, a narrow 2-channel bottleneck without a gate, and int8 of the full tensor (the sl model's int8
point). Runs of the other suites add their final models, as trained and with int8 / int4 uplinks. Target: 32 B or fewer per sample on
the uplink within 1 point of plain split learning's accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path

from splitprune.bench import plots
from splitprune.bench.baselines import TopKCodec
from splitprune.bench.measure import Point, evaluate_points, load_model, wire_reference
from splitprune.bench.report import load_profile, markdown_table, pct, pts, write_csv, write_suite
from splitprune.bench.runs import ensure, full_test_loader, load_record, plan
from splitprune.data import make_loaders
from splitprune.errors import UserError
from splitprune.training.checkpoint import read_meta
from splitprune.training.setup import input_channels

DTYPES = ("fp32", "fp16", "int8", "int4")
QUANTIZED = ("int8", "int4")  # the other runs' final models are also evaluated at these
CHAIN = (64, 32, 16, 8, 4, 2, 1)
AS_TRAINED = ["ca4", "ca_same_i8", "ca1_i8", "deprune16_i8", "ca4_r2"]
TARGET_BYTES = 32


def _cached_points(out: Path, name: str, folder: Path, prof, plan: tuple, points_fn) -> list[dict]:
    """Evaluate a model's points once; cached under rate/evals/ keyed by the checkpoint, the test set and
    `plan` (what decides the points), so a cache hit loads no model."""
    cache = out / "evals" / f"{name}.json"
    if not (Path(folder) / "meta.json").exists() and cache.exists():
        return json.loads(cache.read_text())["points"]  # results copied without weights: keep what was measured
    if not (Path(folder) / "meta.json").exists():
        print(f"[rate] {name}: no trained model at {folder} (stopped before its first epoch?): left out")
        return []
    meta = read_meta(folder)
    key = {"fingerprint": meta.get("fingerprint"), "epoch": meta.get("progress", {}).get("epoch"),
           "test_subset": prof.full_subset, "folder": str(folder), "plan": json.loads(json.dumps(plan))}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["points"]
    model = load_model(folder, prof.accelerator)
    points = points_fn(model)
    loader = full_test_loader(model.cfg, prof)
    print(f"[rate] evaluating {name}: {len(points)} point(s) on {len(loader.dataset)} test images", flush=True)
    results = evaluate_points(model, loader, points)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "points": results}, indent=2))
    return results


def run(profile: str, out: Path) -> dict:
    prof = load_profile(profile)
    out = Path(out)
    root = out.parent
    records = {n: ensure(n, prof, root) for n in ["sl", "chain"]}
    for name in ("random2", "bottleneck2"):
        try:
            records[name] = ensure(name, prof, root)
        except UserError as exc:  # only without training (SPLITPRUNE_BENCH_NO_TRAIN): report the rest
            print(f"[rate] {name} left out: {exc}")
    points: list[dict] = []

    def add(series: str, model: str, results: list[dict]) -> None:
        for r in results:
            points.append({"series": series, "model": model, **r})

    sl_dir = records["sl"]["dir"] / "checkpoint"

    def sl_points(model):
        cfg = model.cfg
        train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, 256, cfg.input_size, input_channels(cfg), cfg.seed,
                                   cfg.train_subset, 16, False, 256)
        reference = wire_reference(model, train)  # known to both sides, like the model's weights
        return [Point(None, d) for d in DTYPES] + [Point(topk=TopKCodec(k, reference)) for k in prof.topk]

    sl_results = _cached_points(out, "sl", sl_dir, prof, (DTYPES, prof.topk), sl_points)
    for r in sl_results:
        if r["topk"]:
            add("top-k values of the sl model (fp16 + uint16 index)", "sl", [r])
        else:
            add(f"sl model, all channels ({r['dtype']})", "sl", [r])
    for b in CHAIN:
        folder = records["chain"]["dir"] / "models" / f"budget_{b}"  # a stopped chain lacks the last ones
        res = _cached_points(out, f"chain_B{b}", folder, prof, prof.chain_dtypes, lambda m, b=b: [Point(b, d) for d in prof.chain_dtypes])
        for r in res:
            add(f"prune chain from sl ({r['dtype']})", f"chain B={b}", [r])
    if "random2" in records:
        res = _cached_points(out, "random2", records["random2"]["dir"] / "checkpoint", prof, DTYPES,
                             lambda m: [Point(2, d) for d in DTYPES])
        add("random 2 fixed channels (no gate)", "random2", res)
    if "bottleneck2" in records:
        res = _cached_points(out, "bottleneck2", records["bottleneck2"]["dir"] / "checkpoint", prof, DTYPES,
                             lambda m: [Point(None, d) for d in DTYPES])
        add("narrow bottleneck, 2 channels (no gate)", "bottleneck2", res)
    specs = plan(prof)
    for name in AS_TRAINED:  # final models of other suites' finished runs, as trained (not trained here)
        rec = load_record(specs[name], root)
        if rec is None or not rec["complete"]:
            print(f"[rate] {name} has not run (its suite adds it): no point for it")
            continue
        res = _cached_points(out, name, rec["dir"] / "checkpoint", prof, QUANTIZED,
                             lambda m: [Point(m.budget if m.budget < m.channels else None, d) for d in QUANTIZED
                                        if d != m.cfg.dtype_up])  # the as-trained dtype is its own point below
        add("other runs' final models, quantised uplink", rec["label"], res)
        if rec["full_test"]:
            last = rec["full_test"][-1]
            cfg = rec["summary"]["config"]
            points.append({"series": "other runs, final model as trained", "model": rec["label"],
                           "point": f"B{last['budget']}-{cfg['dtype_up']}", "budget": last["budget"],
                           "dtype": cfg["dtype_up"], "topk": None, "accuracy": last["accuracy"],
                           "samples": last["samples"], "bytes_per_sample": last["bytes_per_sample"],
                           "single_sample_bytes": last["single_sample_bytes"]})

    sl_fp32 = next(p for p in points if p["model"] == "sl" and p["point"] == "Ball-fp32")
    for p in points:
        p["accuracy_vs_sl_fp32"] = p["accuracy"] - sl_fp32["accuracy"]
    small = [p for p in points if p["bytes_per_sample"] <= TARGET_BYTES]
    best_small = max(small, key=lambda p: p["accuracy"]) if small else None
    holds = best_small is not None and best_small["accuracy_vs_sl_fp32"] >= -0.01

    order = sorted(points, key=lambda p: (p["series"], p["bytes_per_sample"]))
    table = markdown_table(
        ["series", "model", "point", "uplink B/sample (batch)", "single-sample request B", "accuracy", "vs sl fp32"],
        [[p["series"], p["model"], p["point"], f"{p['bytes_per_sample']:,.1f}", p["single_sample_bytes"],
          pct(p["accuracy"]), pts(p["accuracy_vs_sl_fp32"])] for p in order])
    at_target = markdown_table(
        ["model", "point", "uplink B/sample", "single-sample B", "accuracy", "vs sl fp32"],
        [[p["model"], p["point"], f"{p['bytes_per_sample']:.1f}", p["single_sample_bytes"], pct(p["accuracy"]),
          pts(p["accuracy_vs_sl_fp32"])] for p in sorted(small, key=lambda p: -p["accuracy"])])
    samples = sl_fp32["samples"]
    stopped = [f"{r['name']} ({len(r['rows'])} of {r.get('planned_epochs')} epochs)" for r in records.values()
               if not r["complete"]]
    lines = [f"- sl, fp32, all channels: {pct(sl_fp32['accuracy'])} at {sl_fp32['bytes_per_sample']:,.0f} B/sample.",
             (f"- Target (<= {TARGET_BYTES} B/sample within 1 pt of sl): best at <= {TARGET_BYTES} B is "
              f"{best_small['model']} {best_small['point']} with {pct(best_small['accuracy'])} "
              f"({pts(best_small['accuracy_vs_sl_fp32'])}) at {best_small['bytes_per_sample']:.1f} B/sample "
              f"(single-sample request {best_small['single_sample_bytes']} B) -> {'holds' if holds else 'fails'}.")
             if best_small else f"- Target: no point at <= {TARGET_BYTES} B/sample."]
    if stopped:
        lines.append(f"- Runs stopped before the end of their schedule (their last finished epoch is evaluated): "
                     f"{', '.join(stopped)}.")
    markdown = (f"### rate-accuracy ({prof.name} profile, {samples} test images)\n\nPoints at <= {TARGET_BYTES} "
                f"B/sample:\n\n{at_target}\n" + "\n".join(lines) + f"\n\nAll points:\n\n{table}\n"
                "Bytes: serialized EvalRequest messages at the evaluation batch size (top-k: its raw message: "
                "12-byte header + uint16 indices + fp16 values), divided by the number of samples.\n")
    print(markdown)

    fig, axes = plots.figure(2, width=7.6, height=5.6)
    styles = {}
    for i, series in enumerate(dict.fromkeys(p["series"] for p in points)):
        styles[series] = plots.COLORS[i % len(plots.COLORS)]
    markers = {"fp32": "s", "fp16": "o", "int8": "^", "int4": "v"}
    for k, ax in enumerate(axes):
        for series, color in styles.items():
            own = [p for p in points if p["series"] == series]
            label = series if k == 1 else None
            if series.startswith("prune chain") or series.startswith("top-k"):
                own.sort(key=lambda p: p["bytes_per_sample"])
                ax.plot([p["bytes_per_sample"] for p in own], [100 * p["accuracy"] for p in own], color=color,
                        marker="x" if series.startswith("top-k") else markers.get(own[0]["dtype"], "o"),
                        linewidth=1.3, markersize=5, label=label)
            else:
                for j, p in enumerate(own):
                    ax.scatter(p["bytes_per_sample"], 100 * p["accuracy"], color=color, s=36,
                               marker=markers.get(p["dtype"], "o"), label=label if j == 0 else None, zorder=3)
        ax.axhline(100 * (sl_fp32["accuracy"] - 0.01), color="gray", linestyle="--", linewidth=1,
                   label="sl fp32 accuracy - 1 pt" if k == 1 else None)
        ax.axvline(TARGET_BYTES, color="black", linestyle=":", linewidth=1,
                   label=f"{TARGET_BYTES} B/sample" if k == 1 else None)
        ax.set_xscale("log")
        ax.set_xlabel("uplink bytes per sample (measured messages, log)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"all points ({samples} test images); square fp32, circle fp16, triangles int8 / int4", fontsize=9)
    axes[1].set_title("zoom: within 6 points of sl", fontsize=9)
    axes[1].set_ylim(100 * sl_fp32["accuracy"] - 6, 100 * max(p["accuracy"] for p in points) + 1)
    axes[1].legend(fontsize=6.5, loc="lower right")
    plots.save(fig, out / "rate.png")

    write_csv(out / "rate.csv", order)
    write_suite(out, "rate", prof, {"points": order, "target_bytes": TARGET_BYTES,
                                    "best_at_target": best_small, "target_holds": holds}, markdown)
    return {"table": table, "holds": holds}
