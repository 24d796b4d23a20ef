"""The benchmark suites by name: `splitprune bench SUITE` and `python -m splitprune.bench --suite SUITE` run them.

Each suite is a module under splitprune.bench with `run(profile, out, **options) -> dict`; `all` runs the
ones that are not long stress runs, in this order.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from splitprune.bench.core.profiles import Profile
from splitprune.errors import UserError

SUITES = {
    "deprune": "paper.deprune",       # training suites first,
    "prune": "paper.prune",
    "curves": "paper.curves",         # the four methods' curves in one figure (runs of deprune and prune)
    "resolution": "paper.resolution",
    "rate": "paper.rate",
    "adaptive": "adaptive.suite",     # any-budget model, --budget auto over traces (inference and training)
    "link": "paper.link_time",
    "device": "systems.device",
    "models": "models.suite",         # real torchvision / timm networks at 224: cuts, bytes, device latency
    "step": "systems.step",           # the timing suites last (transport measures rate's chosen configurations)
    "transport": "systems.transport",
    "fuzz": "systems.fuzz",
    "soak": "systems.soak",
    "scale": "systems.scale",         # server samples/s and latency vs concurrent clients, with and without batching
}
STRESS = ("fuzz", "soak", "scale")    # long server stress runs: not part of 'all'
SUITE_OPTIONS = {"soak": ("clients", "minutes"), "fuzz": ("messages",), "scale": ("accelerator",), "models": ("part",)}


def suite_names(name: str) -> list[str]:
    """The suites `name` stands for ('all': every suite but the stress runs)."""
    if name == "all":
        return [s for s in SUITES if s not in STRESS]
    if name not in SUITES:
        raise UserError(f"unknown benchmark suite {name!r}; choose one of {', '.join(SUITES)} or all")
    return [name]


def run_suite(suite: str, profile: Profile, out: Path, **options) -> dict:
    """Run `suite` with results under OUT/SUITE."""
    module = importlib.import_module(f"splitprune.bench.{SUITES[suite]}")
    return module.run(profile, Path(out) / suite, **options)
