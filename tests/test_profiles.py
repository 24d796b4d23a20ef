"""The benchmark profiles' plans: what each profile trains (runs, schedules, seeds, subsets), checked without
training (the quick profile's runs themselves are trained at smoke sizes in test_bench.py)."""
import pytest

from splitprune.bench.core.plan import plan, seed_names
from splitprune.bench.core.profiles import PROFILES, get_profile
from splitprune.config import make_config, resolve_schedule

PAPER_SCHEDULES = {"sl": "all:22", "ca4": "4:22", "deprune": "4:15,all:7", "prune": "32:10,4:10", "ca1_i8": "1:22"}


def _phases(values: dict) -> list[tuple[str, int]]:
    cfg = make_config({k: v for k, v in values.items() if k != "from_checkpoint"} | {"from_checkpoint": "x"}
                      if values["method"] == "prune" else values)
    return [(p.label(), p.epochs) for p in resolve_schedule(cfg, 512)]


def test_the_paper_cpu_profile_runs_the_papers_schedules_exactly():
    profile = get_profile("paper-cpu")
    assert (profile.model, profile.train_subset, profile.validation, profile.threads) == ("vgg11_bn_compact", 2500,
                                                                                          2000, 1)
    assert profile.lr_schedule == "constant" and profile.seeds == (0, 1) and profile.full_subset is None
    specs = plan(profile)
    expected = {"sl": [("all", 22)], "ca4": [("4", 22)], "deprune": [("4", 15), ("all", 7)],
                "prune": [("32", 10), ("4", 10)], "ca1_i8": [("1", 22)]}
    for base, phases in expected.items():
        for seed, name in zip(profile.seeds, seed_names(base, profile)):
            values = specs[name].values
            assert values["schedule"] == PAPER_SCHEDULES[base] and values["seed"] == seed
            assert _phases(values) == phases, name
            assert (values["batch_size"], values["train_subset"], values["validation_size"]) == (16, 2500, 2000)
            assert values.get("lr") is None and values.get("momentum") is None   # the paper's, per method
            assert values["lr_schedule"] == "constant" and values["threads"] == 1
    assert specs["prune_seed1"].needs == ("sl_seed1",)
    cfg = make_config({**specs["prune"].values, "from_checkpoint": "x"})
    assert (cfg.lr_value(), cfg.momentum_value()) == (1e-3, 0.9)
    assert make_config(specs["deprune"].values).lr_value() == 1e-2


@pytest.mark.parametrize("name", list(PROFILES))
def test_every_profile_plans_every_headline_run_at_every_seed(name):
    profile = get_profile(name, smoke=True)
    specs = plan(profile)
    for base in ("sl", "ca4", "deprune", "ca1_i8", "prune"):
        assert all(n in specs for n in seed_names(base, profile)), base


def test_settings_on_top_of_the_paper_cpu_profile_scale_its_schedules():
    tiny = get_profile("paper-cpu", train_subset=32, epochs=2)
    specs = plan(tiny)
    assert specs["sl"].values["train_subset"] == 32 and _phases(specs["deprune"].values) == [("4", 1), ("all", 1)]
    assert tiny.prune_epochs == 2
