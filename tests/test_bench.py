"""Smoke tests of the paper-claim benchmark suites: plumbing, resumability, baselines, honest byte counts."""
import json

import pytest
import torch

from splitprune.bench.core import plan as planning
from splitprune.bench.core import profiles, runs
from splitprune.bench.paper import baselines
from splitprune.bench.paper.measure import Point, evaluate_points, load_model
from splitprune.cli import build_parser
from splitprune.cli.common import config_from_args
from splitprune.config import make_config
from splitprune.proto import pb
from splitprune.training.checkpoint import read_meta
from splitprune.training.evaluation import evaluate_checkpoint
from splitprune.training.link import OptimizerSettings
from splitprune.training.server_worker import LocalLink


@pytest.fixture(scope="module")
def smoke():
    return profiles.get_profile("quick", smoke=True)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_every_trainer_run_is_the_command_it_records(smoke, root):
    specs = planning.plan(smoke)
    parser = build_parser()
    for spec in specs.values():
        if spec.kind != "train":
            continue
        argv = planning.cli_command(spec, root, specs).split()[1:]
        cfg = config_from_args(parser.parse_args(argv))
        assert cfg.validation_size == smoke.validation
        assert cfg.fingerprint() == planning.run_config(spec, root, specs).fingerprint(), spec.name


def test_profile_settings_are_flags_of_bench_and_of_bench_runs(capsys):
    from splitprune.bench.__main__ import build_parser as bench_runs_parser
    from splitprune.bench.__main__ import main as bench_runs
    from splitprune.bench.core.profiles import profile_from_args
    from splitprune.cli import main

    flags = ["--train-subset", "100", "--epochs", "6", "--threads", "3", "--data-dir", "d", "--no-train",
             "--use-partial"]
    p = profile_from_args(build_parser().parse_args(["bench", "deprune", "--profile", "paper", *flags]))
    assert p == profile_from_args(bench_runs_parser().parse_args(["--profile", "paper", *flags]))
    assert (p.name, p.train_subset, p.chain_subset, p.epochs, p.prune_epochs, p.threads) == ("paper", 100, 50, 6, 5, 3)
    assert (p.data_dir, p.no_train, p.use_partial, p.smoke) == ("d", True, True, False)
    assert planning.plan(p)["sl"].values["data_dir"] == "d"
    assert profiles.get_profile("quick", smoke=True, train_subset=20).chain_subset == 16
    for bad, message in ((["--epochs", "0"], "--epochs must be an integer >= 1"),
                         (["--threads", "x"], "--threads must be an integer >= 1"),
                         (["--train-subset", "-1"], "--train-subset must be an integer >= 1")):
        for run in (lambda argv: main(["bench", "deprune", *argv]), lambda argv: bench_runs(["--list", *argv])):
            assert run(bad) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, err
    with pytest.raises(runs.UserError, match="epochs must be an integer >= 1"):
        profiles.get_profile("quick", epochs=0)


def test_headline_runs_have_every_seed_and_share_the_validation_split(smoke):
    specs = planning.plan(smoke)
    for base in ("sl", "ca4", "deprune", "ca1_i8", "prune", "ca4_r2"):
        names = planning.seed_names(base, smoke)
        assert [specs[n].values["seed"] for n in names] == list(smoke.seeds) and len(names) >= 2
        assert {specs[n].values["validation_size"] for n in names} == {smoke.validation}
    assert specs["prune_seed1"].needs == ("sl_seed1",)


def test_a_finished_run_made_with_other_settings_is_not_reused(smoke, root):
    runs.ensure("sl", smoke, root)
    other = smoke.train_subset + 16
    with pytest.raises(runs.UserError, match="train_subset"):
        runs.ensure("sl", profiles.get_profile("quick", smoke=True, train_subset=other), root)
    reading = profiles.get_profile("quick", smoke=True, train_subset=other, no_train=True)  # reported, with a warning
    assert runs.ensure("sl", reading, root)["complete"]


def test_prune_suite_runs_shares_sl_and_resumes(smoke, root, monkeypatch):
    from splitprune.bench.paper import prune

    result = prune.run(smoke, root / "prune")
    assert [r["seed"] for r in result["results"]] == list(smoke.seeds)
    for row, name in zip(result["results"], planning.seed_names("prune", smoke)):  # the final models' accuracy
        final = json.loads((root / "prune" / "runs" / name / "full_test.json").read_text())[-1]
        assert row["prune_accuracy"] == final["accuracy"]
    for name in ("prune.json", "prune.md", "prune.csv", "prune.png"):
        assert (root / "prune" / name).exists()
    assert (root / "deprune" / "runs" / "sl" / "summary.json").exists()  # sl lives with the deprune suite
    summary = json.loads((root / "prune" / "runs" / "prune" / "summary.json").read_text())
    assert summary["bench"]["full_test"][-1]["samples"] == smoke.full_subset
    assert (root / "prune" / "runs" / "prune" / "models" / "budget_32" / "meta.json").exists()

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train", fail)
    prune.run(smoke, root / "prune")  # everything is there: nothing trains


def test_measured_points_match_evaluate_checkpoint(smoke, root):
    runs.ensure("sl", smoke, root)
    folder = root / "deprune" / "runs" / "sl" / "checkpoint"
    model = load_model(folder)
    loader = runs.full_test_loader(model.cfg, smoke)
    points = evaluate_points(model, loader, [Point(None, "int8"), Point(8, "fp16")])
    meta = read_meta(folder)
    for point, (budget, dtype) in zip(points, [(512, "int8"), (8, "fp16")]):
        ref = evaluate_checkpoint(meta, budget, dtype, test_subset=smoke.full_subset)
        assert point["accuracy"] == ref["test_accuracy"]
        assert point["bytes_per_sample"] == ref["bytes_per_sample"]
        assert point["single_sample_bytes"] == ref["single_sample_bytes"]


def test_topk_codec_round_trip_and_size():
    reference = torch.full((4, 2, 2), 0.5)
    codec = baselines.TopKCodec(3, reference)
    wire = torch.full((2, 4, 2, 2), 0.5)
    wire[0, 1, 0, 1], wire[0, 3, 1, 1], wire[0, 0, 0, 0] = 0.9, 0.0, 0.25
    wire[1, 2, 1, 0] = 1.0
    data = codec.compress(wire)
    assert len(data) == 12 + 2 * 3 * (2 + 2)
    restored = codec.decompress(data)
    assert torch.allclose(restored[0], wire[0], atol=1e-3)
    assert torch.allclose(restored[1], wire[1], atol=1e-3)


class Recording(LocalLink):
    """A LocalLink that keeps every training request it carries."""

    def __init__(self, server) -> None:
        super().__init__(server)
        self.sent: list[bytes] = []

    def train(self, request):
        self.sent.append(request)
        return super().train(request)


def test_random_channels_and_bottleneck_send_what_they_claim(smoke):
    import numpy as np

    from splitprune.compression.bottleneck import FixedRandomChannels, NarrowBottleneck

    values = {"model": "vgg11_bn_compact", "train_subset": 32, "test_subset": 32, "batch_size": 16, "threads": 1}
    cfg = make_config({**values, "method": "ca", "budget": 3})
    parts = baselines.build_parts(cfg, baselines.Baseline(selector=FixedRandomChannels(3)))
    link = Recording(parts.server_worker)
    parts.device.start_phase(link, 0, 3, OptimizerSettings(0.01, 0.0, 0.0), use_budget_loss=True)
    assert not parts.device.use_budget_loss  # a fixed choice has no gate to steer
    x, y = next(iter(parts.train_loader))
    parts.device.train_step(x, y, link)
    with torch.no_grad():  # however the gate moves, the same channels travel
        parts.device.half.gate_logits.copy_(torch.arange(512, dtype=torch.float32).view(1, 512, 1, 1))
    parts.device.train_step(x, y, link)
    expected = torch.randperm(512, generator=torch.Generator().manual_seed(0 + 4242))[:3].sort().values.tolist()
    for request in link.sent:
        message = pb.TrainRequest.FromString(request)
        assert np.frombuffer(message.activations.channels, dtype="<u2").tolist() == expected

    bcfg = make_config({**values, "method": "sl", "scaling": "binary", "dtype_up": "int8"})
    bparts = baselines.build_parts(bcfg, baselines.Baseline(bottleneck=NarrowBottleneck(2)))
    blink = Recording(bparts.server_worker)
    bparts.device.start_phase(blink, 0, None, OptimizerSettings(0.01, 0.0, 0.0), use_budget_loss=False)
    stats = bparts.device.train_step(x, y, blink)
    message = pb.TrainRequest.FromString(blink.sent[0])
    assert stats.bytes_up == len(blink.sent[0])
    assert len(message.activations.data) == 16 * 2 * 4 * 4  # 16 samples x 2 channels x 4x4 values x 1 byte
    assert message.activations.channels == b""              # every channel of the bottleneck: no indices
    assert bparts.geometry.wire_shape == (2, 4, 4)


def test_verdict_counts_the_noise_against_the_claim():
    from splitprune.bench.core.verdict import (FAILS, HOLDS, NOT_RESOLVED, Interval, at_most, difference, interval,
                                               verdict)

    need = -0.005
    assert verdict(interval([-0.004, -0.001]), need) == HOLDS           # the worse seed meets it
    assert verdict(interval([-0.005, 0.002]), need) == HOLDS            # exactly at the target
    assert verdict(interval([-0.0032, -0.0094]), need) == NOT_RESOLVED  # issue 9's ca B=4: one seed misses
    assert verdict(interval([-0.006, -0.009]), need) == FAILS           # even the better seed misses
    assert verdict(interval([-0.004], noise=0.002), need) == NOT_RESOLVED  # one value, widened by its noise
    assert verdict(interval([-0.004, None]), need) == "not measured"
    gap = difference(interval([0.85, 0.86]), interval([0.84, 0.845]))   # unpaired: worst 0.85-0.845
    assert gap == Interval(pytest.approx(0.005), pytest.approx(0.02))
    assert verdict(gap, 0.01) == NOT_RESOLVED and verdict(gap, 0.004) == HOLDS and verdict(gap, 0.03) == FAILS
    assert at_most(interval([14.0, 16.0]), 16) == HOLDS and at_most(interval([15.0, 17.0]), 16) == NOT_RESOLVED
    assert at_most(interval([17.0, 18.0]), 16) == FAILS


def _seed_difference(a: list[float], b: list[float]) -> dict:
    """The rule of splitprune/bench/core/verdict.py, written again here so that the suites' verdicts are not
    checked with the code that made them: a difference A - B between runs is taken over every pairing of their
    seeds, [min(A) - max(B), max(A) - min(B)]."""
    return {"low": min(a) - max(b), "high": max(a) - min(b)}


def _rule(gap: dict, need: float) -> str:
    """Against the target value >= need: holds when low >= need, fails when high < need, else not resolved."""
    return "holds" if gap["low"] >= need else "fails" if gap["high"] < need else "not resolved"


def _final_accuracies(smoke, root, base: str) -> list[float]:
    """Each seed's last full-test accuracy, read from its run folder (full_test.json)."""
    specs = planning.plan(smoke)
    return [json.loads((planning.run_dir(root, specs[n]) / "full_test.json").read_text())[-1]["accuracy"]
            for n in planning.seed_names(base, smoke)]


def _train_bytes(smoke, root, base: str) -> list[int]:
    """Each seed's training traffic, both directions, read from its run folder (summary.json)."""
    specs = planning.plan(smoke)
    summaries = [json.loads((planning.run_dir(root, specs[n]) / "summary.json").read_text())
                 for n in planning.seed_names(base, smoke)]
    return [s["bytes_up"] + s["bytes_down"] for s in summaries]


def test_deprune_suite_verdicts_follow_the_rule_on_the_final_models(smoke, root):
    from splitprune.bench.paper import deprune

    claims = deprune.run(smoke, root / "deprune")["claims"]
    dep, sl, ca = (_final_accuracies(smoke, root, base) for base in ("deprune", "sl", "ca4"))
    vs_sl, vs_ca = _seed_difference(dep, sl), _seed_difference(dep, ca)
    assert claims["vs_sl_interval"]["deprune"] == vs_sl
    assert claims["C2_deprune_minus_ca4"] == vs_ca
    # C1 needs deprune to send at least 3.5x less than sl at every seed (sl's bytes / deprune's, same seed), and
    # then at most 0.5 pt of accuracy lost; C2 needs 4 pt more than ca B=4
    least = min(s / d for s, d in zip(_train_bytes(smoke, root, "sl"), _train_bytes(smoke, root, "deprune")))
    assert claims["traffic_vs_sl_least"]["deprune"] == pytest.approx(least)
    assert claims["C1_verdict"] == (_rule(vs_sl, -0.005) if least >= 3.5 else "fails")
    assert claims["C2_verdict"] == _rule(vs_ca, 0.04)
    assert (root / "deprune" / "deprune.png").exists()


def test_curves_show_the_four_methods_at_every_seed(smoke, root, monkeypatch):
    import csv

    from splitprune.bench.paper import curves

    def fail(*args, **kwargs):
        raise AssertionError("the curves suite trained a run")

    for base in ("sl", "ca4", "deprune", "prune"):
        for name in planning.seed_names(base, smoke):
            runs.ensure(name, smoke, root)
    monkeypatch.setattr(runs, "train", fail)
    curves.run(smoke, root / "curves")
    with open(root / "curves" / "curves.csv") as fh:
        points = list(csv.DictReader(fh))
    seen = {(p["method"], p["seed"]) for p in points}
    assert seen == {(b, str(s)) for b in curves.METHODS for s in smoke.seeds}
    sl = [p for p in points if p["run"] == "sl"]
    metrics = json.loads((root / "deprune" / "runs" / "sl" / "summary.json").read_text())
    assert int(sl[-1]["bytes"]) == metrics["bytes_up"] + metrics["bytes_down"]  # cumulative, from the run's rows
    assert (root / "curves" / "curves.png").stat().st_size > 10_000


def test_rate_suite_chooses_on_validation_and_reports_test(smoke, root):
    from splitprune.bench.paper import rate

    rate.run(smoke, root / "rate")
    data = json.loads((root / "rate" / "rate.json").read_text())
    series = {p["series"] for p in data["points"]}
    assert any(s.startswith("top-k") for s in series) and any(s.startswith("random") for s in series)
    assert any(s.startswith("narrow bottleneck") for s in series)
    assert {p["samples"] for p in data["points"]} == {smoke.validation}  # every candidate judged on validation
    chain = [p for p in data["points"] if p["model"] == "chain B=1" and p["dtype"] == "int8"]
    assert chain and chain[0]["bytes_per_sample"] < 20  # 16 values of 1 byte, plus per-message overhead
    by_config = {}
    for p in data["points"]:
        by_config.setdefault(p["config"], []).append(p)
    sl = _final_accuracies(smoke, root, "sl")
    assert data["sl_test"] == {"low": min(sl), "high": max(sl)}
    for choice in data["choices"]:
        fits = {c: ps for c, ps in by_config.items() if len(ps) == len(smoke.seeds)
                and max(p["bytes_per_sample"] for p in ps) <= choice["limit"]}
        if not fits:
            assert choice["config"] is None
            continue
        # best mean validation accuracy; ties go to the fewer bytes, then to the name
        best = max(fits, key=lambda c: (sum(p["accuracy"] for p in fits[c]) / len(fits[c]),
                                        -max(p["bytes_per_sample"] for p in fits[c]), c))
        assert choice["config"] == best
        assert len(choice["test_accuracy"]) == len(smoke.seeds)
        cached = []
        for n in planning.seed_names(best.split(" ")[0], smoke):  # the test evaluation of the chosen point
            files = [json.loads(f.read_text()) for f in (root / "rate" / "evals").glob(f"{n}.test.*.json")]
            (entry,) = [f for f in files if f["points"][0]["point"] == choice["point"]]
            cached.append(entry["points"][0])
        assert choice["test_accuracy"] == [c["accuracy"] for c in cached]
        assert {c["samples"] for c in cached} == {smoke.full_subset}
        gap = _seed_difference(choice["test_accuracy"], sl)
        assert choice["vs_sl"] == gap
        assert choice["verdict"] == _rule(gap, choice["need"])
    assert (root / "rate" / "rate.png").exists()


def test_stopped_run_is_read_from_its_results_without_weights(smoke, root, tmp_path):
    import shutil

    runs.ensure("sl", smoke, root)
    spec = planning.plan(smoke)["sl"]
    src, dst = planning.run_dir(root, spec), planning.run_dir(tmp_path, spec)
    dst.mkdir(parents=True)
    for name in ("metrics.csv", "command.txt"):  # what a time-boxed GPU run returns, minus run.json
        shutil.copy(src / name, dst / name)
    record = runs.load_record(spec, tmp_path)
    assert not record["complete"] and record["planned_epochs"] == smoke.epochs
    assert record["summary"]["config"]["train_subset"] == smoke.train_subset
    assert runs.headline_accuracy(record)[0] == record["rows"][-1]["test_accuracy"]  # the model it ends with
    from splitprune.bench.core.report import partial_note
    assert "stopped" in partial_note(record)


def test_document_includes_are_refreshed_from_the_suite_files(tmp_path):
    from splitprune.bench.core.document import update

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "t.md").write_text("| a |\n|---|\n| 2 |\n")
    doc = tmp_path / "B.md"
    doc.write_text("intro\n<!-- include: r/t.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\nafter\n")
    assert update(doc) == ["r/t.md"]
    assert doc.read_text() == "intro\n<!-- include: r/t.md -->\n| a |\n|---|\n| 2 |\n<!-- end include -->\nafter\n"
    (tmp_path / "r" / "t.md").unlink()
    with pytest.raises(SystemExit, match="does not exist"):
        update(doc)


def test_validation_split_is_stratified_fixed_and_disjoint_from_every_training_subset():
    import numpy as np

    from splitprune.data import ImageDataset, hold_out, subset
    from splitprune.errors import UserError

    n = 1000
    labels = np.repeat(np.arange(10), n // 10)
    ids = np.arange(n)  # each image carries its index in its pixels
    images = np.stack([ids % 256, ids // 256], axis=1).astype(np.uint8).reshape(n, 1, 2, 1)
    ds = ImageDataset(images, labels, 10, [str(i) for i in range(10)])

    def index(d):
        return set((d.images[:, 0, 0, 0].astype(int) + 256 * d.images[:, 0, 1, 0].astype(int)).tolist())

    rest, held = hold_out(ds, 200)
    assert np.bincount(held.labels).tolist() == [20] * 10       # stratified
    assert index(rest) | index(held) == set(range(n)) and not index(rest) & index(held)
    assert index(hold_out(ds, 200)[1]) == index(held)            # fixed: no run seed enters the draw
    for seed in (0, 1, 2):
        assert not index(subset(rest, 300, seed)) & index(held)
    with pytest.raises(UserError, match="validation split"):
        hold_out(ds, n)
