"""Run configuration: every method.md default is a field here; YAML files and CLI flags override them."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from splitprune.errors import UserError

METHODS = ("sl", "ca", "deprune", "prune")
LR_SCHEDULES = ("constant", "cosine")
ALL = "all"

# Paper defaults per method (method.md §5): schedule, lr, momentum.
METHOD_DEFAULTS = {
    "sl": {"schedule": "all:22", "lr": 1e-2, "momentum": 0.0, "dtype_up": "fp32"},
    "ca": {"schedule": "{budget}:22", "lr": 1e-2, "momentum": 0.0, "dtype_up": "fp16"},
    "deprune": {"schedule": "4:15,all:7", "lr": 1e-2, "momentum": 0.0, "dtype_up": "fp16"},
    "prune": {"schedule": "32:10,4:10", "lr": 1e-3, "momentum": 0.9, "dtype_up": "fp16"},
}


@dataclass
class RunConfig:
    method: str = "deprune"
    model: str = "vgg11_bn_compact"
    split: str = "conv5"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    input_size: int = 32
    in_channels: int | None = None        # None = the dataset's own
    budget: int = 4                       # ca's fixed budget
    schedule: str | None = None           # "B:epochs,..." (B an int or "all"); None = the method's default
    epochs: int | None = None             # sl/ca: epochs; deprune/prune: total, the default schedule scaled to it
    dtype_up: str | None = None           # None = the method's paper value: fp32 for sl, fp16 otherwise
    dtype_down: str = "fp32"
    resolution: int = 1
    scaling: str = "paper"                # "paper": kept channels times mask_c; "binary": kept as they are
    batch_size: int = 16
    test_batch_size: int = 256
    lr: float | None = None
    momentum: float | None = None
    lr_schedule: str = "constant"         # "constant" (paper) or "cosine": each phase decays its lr to ~0
    weight_decay: float = 5e-4
    budget_eps: float = 1000.0
    budget_delta: float = 0.01
    gate_init: float = 15.0
    bn_momentum: float = 0.03
    bn_eps: float = 1e-4
    reset_threshold: float = 0.9
    reset_low: float = 3.0
    reset_high: float = 15.0
    augment: bool | None = None           # None = the dataset's default
    seed: int = 0
    train_subset: int | None = None
    test_subset: int | None = None
    from_checkpoint: str | None = None
    threads: int | None = None
    accelerator: str = "cpu"              # where both halves compute: "cpu" or "cuda" (the wire is the same)
    tensorboard: bool = False
    extra: dict = field(default_factory=dict)
    # --- issue 9 (bench helper): validation split. Training images held out (class-stratified, drawn with a
    # fixed seed, the same for every run seed); the training subset is drawn from the rest. 0 = none (nothing
    # changes). Benchmarks choose configurations on these images, never on the test set.
    validation_size: int = 0

    def __post_init__(self) -> None:
        if self.dtype_up is None and self.method in METHOD_DEFAULTS:
            self.dtype_up = METHOD_DEFAULTS[self.method]["dtype_up"]

    def lr_value(self) -> float:
        return self.lr if self.lr is not None else METHOD_DEFAULTS[self.method]["lr"]

    def momentum_value(self) -> float:
        return self.momentum if self.momentum is not None else METHOD_DEFAULTS[self.method]["momentum"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that shapes the model and its training (not where data lives)."""
        skip = ("data_dir", "threads", "tensorboard", "accelerator")
        keep = {k: v for k, v in self.to_dict().items() if k not in skip}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Phase:
    budget: int | None   # None = all channels
    epochs: int

    def label(self) -> str:
        return ALL if self.budget is None else str(self.budget)


def parse_schedule(text: str) -> list[Phase]:
    phases = []
    for part in text.split(","):
        budget, sep, epochs = part.strip().partition(":")
        if not sep:
            raise UserError(f"bad schedule phase {part!r}: write BUDGET:EPOCHS, e.g. 4:15,all:7")
        try:
            n_epochs = int(epochs)
            b = None if budget.strip().lower() == ALL else int(budget)
        except ValueError:
            raise UserError(f"bad schedule phase {part!r}: budget is an integer or 'all', epochs an integer") from None
        if n_epochs < 1 or (b is not None and b < 1):
            raise UserError(f"bad schedule phase {part!r}: budget and epochs must be at least 1")
        phases.append(Phase(b, n_epochs))
    return phases


def _scale(phases: list[Phase], total: int) -> list[Phase]:
    if total < len(phases):
        raise UserError(f"--epochs {total} is fewer than the schedule's {len(phases)} phases")
    full = sum(p.epochs for p in phases)
    scaled = [max(1, round(p.epochs * total / full)) for p in phases]
    scaled[0] += total - sum(scaled)
    return [Phase(p.budget, n) for p, n in zip(phases, scaled)]


def resolve_schedule(cfg: RunConfig, channels: int) -> list[Phase]:
    """The phases a run goes through, with budgets checked against the cut's channel count."""
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    if cfg.schedule:
        phases = parse_schedule(cfg.schedule)
        if cfg.epochs is not None:
            phases = _scale(phases, cfg.epochs)
    else:
        phases = parse_schedule(METHOD_DEFAULTS[cfg.method]["schedule"].format(budget=cfg.budget))
        if cfg.epochs is not None:
            phases = [Phase(phases[0].budget, cfg.epochs)] if len(phases) == 1 else _scale(phases, cfg.epochs)
    if cfg.method == "sl" and any(p.budget is not None for p in phases):
        raise UserError("method sl sends every channel: its schedule can only use 'all'")
    for p in phases:
        if p.budget is not None and p.budget > channels:
            raise UserError(f"budget {p.budget} exceeds the {channels} channels at the cut")
    return [Phase(None if p.budget == channels else p.budget, p.epochs) for p in phases]


def load_yaml(path: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_config(values: dict) -> RunConfig:
    """Build a RunConfig from a dict, refusing unknown keys and wrongly-typed values with one clear message."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(f"unknown config option(s): {', '.join(unknown)}")
    cfg = RunConfig(**values)
    _validate(cfg)
    return cfg


def _validate(cfg: RunConfig) -> None:
    checks = [
        (cfg.method in METHODS, f"method must be one of {', '.join(METHODS)}"),
        (cfg.scaling in ("paper", "binary"), "scaling must be 'paper' or 'binary'"),
        (cfg.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}"),
        (isinstance(cfg.batch_size, int) and cfg.batch_size >= 1, "batch_size must be a positive integer"),
        (isinstance(cfg.budget, int) and cfg.budget >= 1, "budget must be a positive integer"),
        (isinstance(cfg.resolution, int) and cfg.resolution >= 1, "resolution must be a positive integer"),
        (cfg.lr is None or (isinstance(cfg.lr, (int, float)) and cfg.lr > 0), "lr must be a positive number"),
        (cfg.in_channels in (None, 1, 3), "in_channels must be 1 or 3"),
        (cfg.accelerator in ("cpu", "cuda"), "accelerator must be 'cpu' or 'cuda'"),
        (isinstance(cfg.input_size, int) and cfg.input_size >= 8, "input_size must be an integer of at least 8"),
        (cfg.method != "prune" or cfg.from_checkpoint, "method prune needs --from CHECKPOINT (a trained model)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    from splitprune.compression.codec import WIRE_DTYPES
    for name in (cfg.dtype_up, cfg.dtype_down):
        if name not in WIRE_DTYPES:
            raise UserError(f"unknown wire dtype {name!r}; choose one of {', '.join(WIRE_DTYPES)}")
