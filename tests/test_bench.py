"""Smoke tests of the paper-claim benchmark suites: plumbing, resumability, baselines, honest byte counts."""
import json
import os

import pytest
import torch

from splitprune.bench import baselines, runs
from splitprune.bench.measure import Point, evaluate_points, load_model
from splitprune.cli import build_parser
from splitprune.cli.common import config_from_args
from splitprune.config import make_config
from splitprune.proto import pb
from splitprune.training.checkpoint import read_meta
from splitprune.training.evaluation import evaluate_checkpoint
from splitprune.training.step import LocalLink, OptimizerSettings


@pytest.fixture(scope="module")
def smoke():
    old = os.environ.get("SPLITPRUNE_BENCH_SMOKE")
    os.environ["SPLITPRUNE_BENCH_SMOKE"] = "1"
    yield runs.get_profile("quick")
    if old is None:
        del os.environ["SPLITPRUNE_BENCH_SMOKE"]
    else:
        os.environ["SPLITPRUNE_BENCH_SMOKE"] = old


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def test_every_trainer_run_is_the_command_it_records(smoke, root):
    specs = runs.plan(smoke)
    parser = build_parser()
    for spec in specs.values():
        if spec.kind != "train":
            continue
        argv = runs.cli_command(spec, root, specs).split()[1:]
        args = parser.parse_args(argv)
        assert config_from_args(args).fingerprint() == runs.run_config(spec, root, specs).fingerprint(), spec.name


def test_a_finished_run_made_with_other_settings_is_not_reused(smoke, root, monkeypatch):
    runs.ensure("sl", smoke, root)
    monkeypatch.setenv("SPLITPRUNE_BENCH_TRAIN_SUBSET", str(smoke.train_subset + 16))
    with pytest.raises(runs.UserError, match="train_subset"):
        runs.ensure("sl", runs.get_profile("quick"), root)
    monkeypatch.setenv("SPLITPRUNE_BENCH_NO_TRAIN", "1")  # reading results back: reported, with a warning
    assert runs.ensure("sl", runs.get_profile("quick"), root)["complete"]


def test_prune_suite_runs_shares_sl_and_resumes(smoke, root, monkeypatch):
    from splitprune.bench import prune

    result = prune.run("quick", root / "prune")
    assert [r["budget"] for r in result["results"]] == [32, 4]
    for name in ("prune.json", "prune.md", "prune.csv", "prune.png"):
        assert (root / "prune" / name).exists()
    assert (root / "deprune" / "runs" / "sl" / "summary.json").exists()  # sl lives with the deprune suite
    summary = json.loads((root / "prune" / "runs" / "prune" / "summary.json").read_text())
    assert summary["bench"]["full_test"][-1]["samples"] == smoke.full_subset
    assert (root / "prune" / "runs" / "prune" / "models" / "budget_32" / "meta.json").exists()

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(runs, "train", fail)
    prune.run("quick", root / "prune")  # everything is there: nothing trains


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


def test_random_channels_and_bottleneck_send_what_they_claim(smoke):
    from splitprune.training.setup import build_run
    parts = build_run(make_config({"model": "vgg11_bn_compact", "train_subset": 32, "test_subset": 32,
                                   "batch_size": 16, "method": "ca", "budget": 3, "threads": 1}))
    device = baselines.FixedChannelsDevice.wrap(parts.device, baselines.random_channels(512, 3, 0))
    link = LocalLink(parts.server_worker)
    device.start_phase(link, 0, 3, OptimizerSettings(0.01, 0.0, 0.0), use_budget_loss=True)
    assert not device.use_budget_loss
    sent = []

    class Recording(LocalLink):
        def train(self, request):
            sent.append(pb.TrainRequest.FromString(request))
            return super().train(request)

    x, y = next(iter(parts.train_loader))
    device.train_step(x, y, Recording(parts.server_worker))
    import numpy as np
    channels = np.frombuffer(sent[0].activations.channels, dtype="<u2").tolist()
    assert channels == baselines.random_channels(512, 3, 0).tolist()

    bcfg = make_config({"model": "vgg11_bn_compact", "train_subset": 32, "test_subset": 32, "batch_size": 16,
                        "method": "sl", "scaling": "binary", "threads": 1, "dtype_up": "int8",
                        "extra": {"baseline": "bottleneck", "width": 2}})
    bparts = baselines.build_parts(bcfg)
    blink = LocalLink(bparts.server_worker)
    bparts.device.start_phase(blink, 0, None, OptimizerSettings(0.01, 0.0, 0.0), use_budget_loss=False)
    stats = bparts.device.train_step(x, y, blink)
    request = pb.TrainRequest(step_id=1, activations=bparts.device.codec.encode(
        torch.rand(16, 2, 4, 4), None, 2), labels=pb.Labels(width=1, data=bytes(16)))
    assert stats.bytes_up == len(request.SerializeToString())   # 2 channels x 16 values x 1 byte, no indices
    assert bparts.geometry.wire_shape == (2, 4, 4)


def test_deprune_suite_compares_deprune_with_ca_at_the_same_traffic(smoke, root):
    from splitprune.bench import deprune

    claims = deprune.run("quick", root / "deprune")["claims"]
    specs = runs.plan(smoke)
    relaxed = runs.run_config(specs["deprune16_i8"], root, specs)
    same = runs.run_config(specs["ca_same_i8"], root, specs)
    assert relaxed.lr_schedule == same.lr_schedule == "cosine"
    # ca's fixed budget sends what deprune 4->16 sends: the byte ratio is measured, not assumed
    assert claims["ca_same_traffic_bytes_over_deprune16"] == pytest.approx(1.0, abs=0.1)
    assert claims["seed_spread_ca4"] is not None
    assert claims["deprune_beats_ca_at_same_traffic"].split(" (")[0] in ("holds", "not resolved", "does not hold")
    assert (root / "deprune" / "deprune.png").exists()


def test_rate_suite_smoke(smoke, root):
    from splitprune.bench import rate

    result = rate.run("quick", root / "rate")
    data = json.loads((root / "rate" / "rate.json").read_text())
    series = {p["series"] for p in data["points"]}
    assert any(s.startswith("top-k") for s in series) and any(s.startswith("random") for s in series)
    assert any(s.startswith("narrow bottleneck") for s in series)
    chain = [p for p in data["points"] if p["model"] == "chain B=1" and p["dtype"] == "int8"]
    assert chain and chain[0]["bytes_per_sample"] < 20  # 16 values of 1 byte, plus per-message overhead
    assert (root / "rate" / "rate.png").exists() and "holds" in result


def test_stopped_run_is_read_from_its_results_without_weights(smoke, root, tmp_path):
    import shutil

    runs.ensure("sl", smoke, root)
    spec = runs.plan(smoke)["sl"]
    src, dst = runs.run_dir(root, spec), runs.run_dir(tmp_path, spec)
    dst.mkdir(parents=True)
    for name in ("metrics.csv", "command.txt"):  # what a time-boxed GPU run returns, minus run.json
        shutil.copy(src / name, dst / name)
    record = runs.load_record(spec, tmp_path)
    assert not record["complete"] and record["planned_epochs"] == smoke.epochs
    assert record["summary"]["config"]["train_subset"] == smoke.train_subset
    assert runs.headline_accuracy(record)[0] == pytest.approx(
        sum(r["test_accuracy"] for r in record["rows"][-3:]) / len(record["rows"][-3:]))
    from splitprune.bench.report import partial_note
    assert "stopped" in partial_note(record)


def test_document_includes_are_refreshed_from_the_suite_files(tmp_path):
    from splitprune.bench.document import update

    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "t.md").write_text("| a |\n|---|\n| 2 |\n")
    doc = tmp_path / "B.md"
    doc.write_text("intro\n<!-- include: r/t.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\nafter\n")
    assert update(doc) == ["r/t.md"]
    assert doc.read_text() == "intro\n<!-- include: r/t.md -->\n| a |\n|---|\n| 2 |\n<!-- end include -->\nafter\n"
    (tmp_path / "r" / "t.md").unlink()
    with pytest.raises(SystemExit, match="does not exist"):
        update(doc)
