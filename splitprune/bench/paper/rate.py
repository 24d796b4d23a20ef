"""(d) rate-accuracy: trained models' test accuracy against measured uplink bytes per sample.

Models: the sl model (all channels) and a prune chain from it (B = 64, 32, 16, 8, 4, 2, 1, one short phase
each: a trained model at every budget), each evaluated with fp32, fp16, int8 and int4 on the wire (the
profile's `chain_dtypes` for the chain). Baselines at
the same bytes (splitprune.bench.paper.baselines): top-k activation values of the sl model, 2 random fixed
channels, a narrow 2-channel bottleneck without a gate, and int8 of the full tensor (the sl model's int8
point). The headline runs of the other suites add their final models (every seed), as trained and with
int8 / int4 uplinks. Every candidate is evaluated on the validation split (training images held out of
every training subset); per byte limit (32 and 16 B/sample) the best configuration on validation is
chosen, and only it is evaluated on the full test set, at every seed, against sl's final models.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from splitprune.bench.core import plots
from splitprune.bench.core.plan import plan
from splitprune.bench.core.profiles import Profile
from splitprune.bench.core.report import (accuracy_interval, load_profile, markdown_table, pct, pts, seeded_records,
                                          write_csv, write_suite)
from splitprune.bench.core.runs import ensure, full_test_loader
from splitprune.bench.core.verdict import difference, explain, interval, verdict
from splitprune.bench.paper.baselines import TopKCodec
from splitprune.bench.paper.measure import Point, evaluate_points, load_model, wire_reference
from splitprune.data import make_loaders, validation_loader
from splitprune.errors import UserError
from splitprune.training.checkpoint import read_meta
from splitprune.training.setup import input_channels

DTYPES = ("fp32", "fp16", "int8", "int4")
QUANTIZED = ("int8", "int4")  # the other runs' final models are also evaluated at these
CHAIN = (64, 32, 16, 8, 4, 2, 1)
AS_TRAINED = ["ca4", "ca1_i8", "ca4_r2", "deprune"]  # at every seed: the candidates a headline can pick
TARGETS = ((32, -0.01), (16, -0.01))  # (uplink B/sample at the evaluation batch, accuracy vs sl) to choose for


def _cached_points(out: Path, name: str, folder: Path, prof, plan: tuple, points_fn, data: str,
                   baseline=None) -> list[dict]:
    """Evaluate a model's points once on `data` ("validation" or "test"); cached under rate/evals/ keyed by the
    checkpoint, the data and `plan` (what decides the points), so a cache hit loads no model."""
    # one file per model and data, and per chosen point on the test images (two limits may choose two points)
    label = "" if data == "validation" else "." + hashlib.sha256(json.dumps(plan, default=str).encode()).hexdigest()[:8]
    cache = out / "evals" / f"{name}.{data}{label}.json"
    if not (Path(folder) / "meta.json").exists() and cache.exists():
        return json.loads(cache.read_text())["points"]  # results copied without weights: keep what was measured
    if not (Path(folder) / "meta.json").exists():
        print(f"[rate] {name}: no trained model at {folder} (stopped before its first epoch?): left out")
        return []
    meta = read_meta(folder)
    key = {"fingerprint": meta.get("fingerprint"), "epoch": meta.get("progress", {}).get("epoch"), "data": data,
           "test_subset": prof.full_subset, "validation": prof.validation, "folder": str(folder),
           "plan": json.loads(json.dumps(plan, default=str))}
    if cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["points"]
    model = load_model(folder, prof.accelerator, baseline)
    points = points_fn(model)
    cfg = model.cfg
    loader = (full_test_loader(cfg, prof) if data == "test" else
              validation_loader(cfg.dataset, cfg.data_dir, cfg.input_size, input_channels(cfg), prof.validation,
                                prof.test_batch_size))
    print(f"[rate] evaluating {name}: {len(points)} point(s) on {len(loader.dataset)} {data} images", flush=True)
    results = evaluate_points(model, loader, points)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": key, "points": results}, indent=2))
    return results


def _preference(points: list[dict]) -> tuple[float, float]:
    """How configurations rank on validation: mean accuracy over the seeds, then fewer bytes (then the name)."""
    return sum(p["accuracy"] for p in points) / len(points), -max(p["bytes_per_sample"] for p in points)


def _point(result: dict) -> Point:
    return Point(None if result["budget"] == "all" else int(result["budget"]), result["dtype"])


def run(profile: str | Profile, out: Path) -> dict:
    prof = load_profile(profile)
    out = Path(out)
    root = out.parent
    specs = plan(prof)
    sl_seeds = seeded_records("sl", prof, root)
    records = {"sl": sl_seeds[0], "chain": ensure("chain", prof, root)}
    for name in ("random2", "bottleneck2"):
        try:
            records[name] = ensure(name, prof, root)
        except UserError as exc:  # only without training (--no-train): report the rest
            print(f"[rate] {name} left out: {exc}")
    points: list[dict] = []  # validation accuracy of every (model, point); "config" names it across seeds

    def add(series: str, model: str, config: str, seed: int, results: list[dict]) -> None:
        for r in results:
            points.append({"series": series, "model": model, "config": f"{config} {r['point']}", "seed": seed, **r})

    def sl_points(model):
        cfg = model.cfg
        train, _, _ = make_loaders(cfg.dataset, cfg.data_dir, 256, cfg.input_size, input_channels(cfg), cfg.seed,
                                   cfg.train_subset, 16, False, 256, cfg.validation_size)
        reference = wire_reference(model, train)  # known to both sides, like the model's weights
        return [Point(None, d) for d in DTYPES] + [Point(topk=TopKCodec(k, reference)) for k in prof.topk]

    for r in _cached_points(out, "sl", records["sl"]["dir"] / "checkpoint", prof, (DTYPES, prof.topk), sl_points,
                            "validation"):
        series = "top-k values of the sl model (fp16 + uint16 index)" if r["topk"] else \
            f"sl model, all channels ({r['dtype']})"
        add(series, "sl", "sl", 0, [r])
    for b in CHAIN:
        folder = records["chain"]["dir"] / "models" / f"budget_{b}"  # a stopped chain lacks the last ones
        res = _cached_points(out, f"chain_B{b}", folder, prof, prof.chain_dtypes,
                             lambda m, b=b: [Point(b, d) for d in prof.chain_dtypes], "validation")
        add("prune chain from sl, seed 0", f"chain B={b}", f"chain B={b}", 0, res)
    if "random2" in records:
        res = _cached_points(out, "random2", records["random2"]["dir"] / "checkpoint", prof, DTYPES,
                             lambda m: [Point(2, d) for d in DTYPES], "validation", specs["random2"].baseline)
        add("random 2 fixed channels (no gate), seed 0", "random2", "random2", 0, res)
    if "bottleneck2" in records:
        res = _cached_points(out, "bottleneck2", records["bottleneck2"]["dir"] / "checkpoint", prof, DTYPES,
                             lambda m: [Point(None, d) for d in DTYPES], "validation", specs["bottleneck2"].baseline)
        add("narrow bottleneck, 2 channels (no gate), seed 0", "bottleneck2", "bottleneck2", 0, res)
    seeded = {}
    for base in AS_TRAINED:  # final models of the other suites' runs at every seed (the suites train them)
        seeded[base] = seeded_records(base, prof, root)
        for rec in seeded[base]:
            seed = rec["summary"]["config"]["seed"]
            res = _cached_points(out, rec["name"], rec["dir"] / "checkpoint", prof, DTYPES,
                                 lambda m: [Point(m.budget if m.budget < m.channels else None, d)
                                            for d in dict.fromkeys((m.cfg.dtype_up, *QUANTIZED))], "validation")
            add("final models of the headline runs (every seed)", seeded[base][0]["label"], base, seed, res)

    # choose on validation: per configuration, the mean validation accuracy over its seeds; only
    # configurations trained at every seed can be chosen (a headline needs the seed spread)
    configs: dict[str, list[dict]] = {}
    for p in points:
        configs.setdefault(p["config"], []).append(p)
    candidates = {c: ps for c, ps in configs.items() if len(ps) == len(prof.seeds)}
    sl_test = accuracy_interval(sl_seeds)
    choices = []
    for limit, need in TARGETS:
        fits = {c: ps for c, ps in candidates.items() if max(p["bytes_per_sample"] for p in ps) <= limit}
        if not fits:
            choices.append({"limit": limit, "need": need, "config": None, "verdict": "no configuration fits"})
            continue
        best = max(fits, key=lambda c: _preference(fits[c]) + (c,))
        base = best.split(" ")[0]
        tested = []
        for rec, p in zip(seeded[base], sorted(fits[best], key=lambda p: p["seed"])):
            res = _cached_points(out, rec["name"], rec["dir"] / "checkpoint", prof, (p["point"],),
                                 lambda m, p=p: [_point(p)], "test")
            tested += res
        test = interval([t["accuracy"] for t in tested])
        gap = difference(test, sl_test)
        choices.append({"limit": limit, "need": need, "config": best, "label": seeded[base][0]["label"],
                        "point": fits[best][0]["point"], "budget": fits[best][0]["budget"],
                        "dtype": fits[best][0]["dtype"], "resolution": seeded[base][0]["summary"]["config"]["resolution"],
                        "candidates": len(fits),
                        "validation_accuracy": [p["accuracy"] for p in fits[best]],
                        "test_accuracy": [t["accuracy"] for t in tested],
                        "bytes_per_sample": max(t["bytes_per_sample"] for t in tested),
                        "single_sample_bytes": max(t["single_sample_bytes"] for t in tested),
                        "vs_sl": gap.__dict__ if gap else None, "verdict": verdict(gap, need),
                        "explained": explain(gap, need, "chosen - sl")})

    sl_val = next(p for p in points if p["model"] == "sl" and p["point"] == "Ball-fp32")
    for p in points:
        p["validation_vs_sl_fp32"] = p["accuracy"] - sl_val["accuracy"]
    order = sorted(points, key=lambda p: (p["series"], p["bytes_per_sample"], p["seed"]))
    table = markdown_table(
        ["series", "model", "seed", "point", "uplink B/sample (batch)", "single-request payload B",
         "validation accuracy", "vs sl fp32 (validation)"],
        [[p["series"], p["model"], p["seed"], p["point"], f"{p['bytes_per_sample']:,.1f}", p["single_sample_bytes"],
          pct(p["accuracy"]), pts(p["validation_vs_sl_fp32"])] for p in order])
    chosen = markdown_table(
        ["limit (B/sample)", "chosen on validation (of N candidates)", "uplink B/sample (batch)",
         "single-request payload B", "validation accuracy (seeds)", "test accuracy (seeds, full test)",
         "sl test accuracy (seeds)", "chosen - sl (test)", "verdict (within 1 pt)"],
        [[c["limit"], f"{c['label']} {c['point']} (of {c['candidates']})" if c["config"] else "none",
          f"{c['bytes_per_sample']:.1f}" if c["config"] else "-", c.get("single_sample_bytes", "-"),
          ", ".join(pct(a) for a in c.get("validation_accuracy", [])) or "-",
          ", ".join(pct(a) for a in c.get("test_accuracy", [])) or "-",
          sl_test.text(signed=False, unit=" %") if sl_test else "n/a",
          (difference(interval(c["test_accuracy"]), sl_test).text() if c["config"] and sl_test else "-"),
          c["verdict"]] for c in choices])
    stopped = [f"{r['name']} ({len(r['rows'])} of {r.get('planned_epochs')} epochs)" for r in records.values()
               if not r["complete"]]
    lines = [f"- Chosen on {prof.validation} validation images held out of the training set (the same for every "
             "seed, never trained on): per byte limit, the configuration (run, budget, uplink dtype) with the "
             "best mean validation accuracy over its seeds (ties: fewer bytes), among those trained at every seed; "
             "then only that "
             "configuration is evaluated on the full test set, at each seed.",
             f"- sl (fp32, all channels), final models on the full test set: "
             f"{sl_test.text(signed=False, unit=' %') if sl_test else 'n/a'} over seeds {list(prof.seeds)}."]
    for c in choices:
        if c["config"]:
            lines.append(f"- Target (<= {c['limit']} B/sample at batch {prof.test_batch_size}, within 1 pt of sl): "
                         f"{c['label']} {c['point']}, {c['bytes_per_sample']:.1f} B/sample, single-request payload "
                         f"{c['single_sample_bytes']} B -> {c['explained']}.")
        else:
            lines.append(f"- Target (<= {c['limit']} B/sample): no configuration fits.")
    if stopped:
        lines.append(f"- Runs stopped before the end of their schedule (their last finished epoch is evaluated): "
                     f"{', '.join(stopped)}.")
    markdown = (f"### rate-accuracy ({prof.name} profile)\n\nChosen on validation data, reported on the full "
                f"test set:\n\n{chosen}\n" + "\n".join(lines) + f"\n\nEvery candidate, validation accuracy "
                f"({sl_val['samples']} held-out training images):\n\n{table}\n"
                "Bytes: serialized EvalRequest messages at the evaluation batch size (top-k: its raw message: "
                "12-byte header + uint16 indices + fp16 values), divided by the number of samples; single-request "
                "payload: the EvalRequest of one sample (on the wire gRPC adds its framing: the transport suite).\n")
    print(markdown)
    _plot(points, sl_val, out / "rate.png")
    write_csv(out / "rate.csv", order)
    write_suite(out, "rate", prof, {"points": order, "choices": choices,
                                    "sl_test": sl_test.__dict__ if sl_test else None}, markdown)
    return {"table": table, "choices": choices}


def _plot(points: list[dict], sl_val: dict, path: Path) -> None:
    fig, axes = plots.figure(2, width=7.6, height=5.6)
    styles = {series: plots.COLORS[i % len(plots.COLORS)]
              for i, series in enumerate(dict.fromkeys(p["series"] for p in points))}
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
        ax.axhline(100 * (sl_val["accuracy"] - 0.01), color="gray", linestyle="--", linewidth=1,
                   label="sl fp32 validation accuracy - 1 pt" if k == 1 else None)
        for limit, _ in TARGETS:
            ax.axvline(limit, color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("uplink bytes per sample (measured messages, log)")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_title(f"all candidates ({sl_val['samples']} validation images); square fp32, circle fp16, "
                      "triangles int8 / int4", fontsize=9)
    axes[1].set_title("zoom: within 6 points of sl", fontsize=9)
    axes[1].set_ylim(100 * sl_val["accuracy"] - 6, 100 * max(p["accuracy"] for p in points) + 1)
    axes[1].legend(fontsize=6.5, loc="lower right")
    plots.save(fig, path)
