"""`splitprune bench adaptive`: one any-budget model, and a device that picks its budget from the link.

Three parts, each its own module, each writing its own results under OUT (= ROOT/adaptive):
1. accuracy (splitprune.bench.adaptive.accuracy): the any-budget model at B = 1, 2, 4, ..., 64, all on the full
   test set against a dedicated ca model per budget and sl, every run at the profile's seeds (trained here if
   missing: the plan's `ca{B}`, `anybudget` runs);
2. inference over every shipped trace (splitprune.bench.adaptive.inference): `--budget auto` for real over
   `splitprune link --trace`, fixed options and an oracle simulated on the same trace (labelled);
3. training through the looped cellular-fades link (splitprune.bench.adaptive.training): `--budget auto` against
   fixed budgets, measured.
"""
from __future__ import annotations

from pathlib import Path

from splitprune.bench.core.common import write_results
from splitprune.bench.core.plan import plan, run_dir, seed_names
from splitprune.bench.core.profiles import Profile
from splitprune.bench.core.report import load_profile
from splitprune.bench.core.runs import ensure

LADDER_RUNS = ("sl", "ca1", "ca2", "ca4", "ca8", "ca16", "ca32", "ca64", "anybudget")
PARTS = ("accuracy", "inference", "training")
LATENCY_MS = 200.0
# cellular-fades at 200 ms is beyond any policy: in a fade the round trip alone is ~165 ms and a request's
# compute 25-45 ms, so even the smallest option misses now and then (the oracle stays under 99%); it is
# also run at a target its fades leave room for
LOOSER = {"cellular-fades": 250.0}


def _markdown(accuracy: dict, inference: dict | None, training: dict | None, command: str) -> str:
    from splitprune.bench.adaptive.inference import report_trace
    from splitprune.bench.core.common import markdown_table

    lines = [f"`{command}`", "", "### One any-budget model against a dedicated model per budget (full 10k test set)",
             "", accuracy["table"].rstrip(), "",
             f"Overall: **{accuracy['overall']}** (every budget within 0.5 pt of its dedicated model, worst pairing "
             f"of seeds).", ""]
    if inference is not None:
        lines += [f"### Inference over the shipped traces, target {inference['latency_target_ms']:g} ms "
                  f"({inference['test_samples']} test images, cycled)", ""]
        lines += [report_trace(r).rstrip() + "\n" for r in inference["traces"]]
        for looser in inference.get("looser", []):
            lines += [f"### The same at target {looser['latency_target_ms']:g} ms", ""]
            lines += [report_trace(r).rstrip() + "\n" for r in looser["traces"]]
    if training is not None:
        s = training["settings"]
        rows = [[r["budget"], f"{100 * r['final_accuracy']:.2f}",
                 "n/a" if r["time_to_common_s"] is None else f"{r['time_to_common_s']:.0f}",
                 f"{r['train_seconds']:.0f}", f"{(r['bytes_up'] + r['bytes_down']) / 1e6:.1f}"]
                for r in training["rows"]]
        lines += [f"### Training through the looped {training['trace']} link (anybudget from scratch, "
                  f"{s['train_subset']} images x {s['epochs']} epochs, {s['test_subset']} test images, "
                  f"auto: --step-ms {s['step_ms']:g})", "",
                  markdown_table(["budget", "final accuracy %", f"s to {100 * training['common_accuracy']:.1f} %",
                                  "training s", "MB up+down"], rows).rstrip(), "",
                  f"auto no slower to the common accuracy than the fastest fixed budget "
                  f"({training['fastest_fixed']}): {_as_verdict(training['auto_no_slower'])} (one run each, no noise "
                  f"counted); no less accurate "
                  f"than the most accurate fixed budget ({training['most_accurate_fixed']}): "
                  f"{training['auto_no_less_accurate']}; with the noise counted against us (one seed, "
                  f"{s['test_subset']} test images: a binomial standard error per accuracy): "
                  f"{training.get('accuracy_verdict', 'not computed')}."]
    return "\n".join(lines) + "\n"


def _inference(checkpoint: Path, out: Path) -> dict:
    """The inference part (every trace at LATENCY_MS, the LOOSER ones again at theirs), each reused when its
    results for this model exist (delete OUT/inference to measure again)."""
    result = _inference_at(checkpoint, out, LATENCY_MS, None)
    result["looser"] = [_inference_at(checkpoint, out / f"{name}_{target:g}ms", target, [name])
                        for name, target in LOOSER.items()]
    return result


def _inference_at(checkpoint: Path, out: Path, latency_ms: float, traces: list[str] | None) -> dict:
    import json

    from splitprune.bench.adaptive import inference as adaptive_infer
    from splitprune.training.checkpoint import SEAL_KEY, read_meta

    done = out / "adaptive_infer.json"
    if done.exists():
        previous = json.loads(done.read_text())
        if previous.get("model_seal") == read_meta(checkpoint).get(SEAL_KEY) \
                and previous.get("latency_target_ms") == latency_ms:
            if previous.get("accuracy_basis") == adaptive_infer.ACCURACY_BASIS:
                return previous
            return adaptive_infer.rescore(checkpoint, out)   # the same run, its accuracies computed again
    return adaptive_infer.run_adaptive_inference(checkpoint, out, traces=traces, latency_ms=latency_ms)


def run(profile: str | Profile, out: Path, parts: tuple[str, ...] = PARTS) -> dict:
    from splitprune.bench.adaptive import accuracy as adaptive_accuracy
    from splitprune.bench.adaptive import training as adaptive_train

    prof = load_profile(profile)
    out = Path(out)
    root = out.parent
    for base in LADDER_RUNS:
        for name in seed_names(base, prof):
            ensure(name, prof, root)
    accuracy = adaptive_accuracy.compare(root, profile=prof)
    checkpoint = run_dir(root, plan(prof)["anybudget"]) / "checkpoint"
    inference = _inference(checkpoint, out / "inference") if "inference" in parts else None
    training = adaptive_train.measure(out / "training") if "training" in parts else None
    command = f"splitprune bench adaptive --profile {prof.name} --out {root}"
    results = {"command": command, "accuracy": {k: v for k, v in accuracy.items() if k != "table"},
               "inference": inference, "training": training}
    write_results(out, "adaptive", results)
    (out / "adaptive.md").write_text(_markdown(accuracy, inference, training, command))
    return results


def _as_verdict(value) -> str:
    """A stored verdict; results from before the rule was applied to it stored a bool."""
    return ("holds" if value else "fails") if isinstance(value, bool) else str(value)
