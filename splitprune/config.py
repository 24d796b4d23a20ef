"""Run configuration: every method.md default is a field here; YAML files and CLI flags override them.

Each field carries its help, choices and range (an `options.Option`); `make_config` checks every value against
them, for YAML files, flags and code alike, and `splitprune train` builds its flags from them. To add a
setting, add one field:

    new_setting: int | None = option(None, "what it does", ge=1, default_text="what None means")
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from splitprune.errors import UserError
from splitprune.options import NO_LEGACY, Option, check_value, field_specs, option, show

METHODS = ("sl", "ca", "deprune", "prune", "anybudget")
NESTED_SAMPLINGS = ("sandwich", "random", "sandwich4")  # anybudget's server objective (objectives.NestedPrefixes)
LR_SCHEDULES = ("constant", "cosine")
EC_PRIORS = ("channel", "position")  # halves.ec_positions
ALL = "all"
# Names defined next to the code that uses them (which imports torch); tests/test_config.py keeps these in step.
MODEL_NAMES = ("vgg11_bn", "vgg11_bn_compact", "resnet18")                       # splitprune.models.sources
MODEL_KINDS = ("torchvision", "timm", "py")                                      # splitprune.models.sources
DATASET_NAMES = ("fashion-mnist", "mnist", "cifar10", "cifar100", "folder")      # splitprune.data.DATASETS
WIRE_DTYPE_NAMES = ("fp32", "fp16", "int8", "int4", "ec", "ec7", "ec3")          # compression.codec.WIRE_DTYPES
GRADIENT_DTYPE_NAMES = WIRE_DTYPE_NAMES[:4]  # ec codes values in [0, 1] with a model's frozen tables: uplink only

# Paper defaults per method (method.md §5): schedule, lr, momentum.
METHOD_DEFAULTS = {
    "sl": {"schedule": "all:22", "lr": 1e-2, "momentum": 0.0, "dtype_up": "fp32", "server_steps": 1},
    "ca": {"schedule": "{budget}:22", "lr": 1e-2, "momentum": 0.0, "dtype_up": "fp16", "server_steps": 1},
    "deprune": {"schedule": "4:15,all:7", "lr": 1e-2, "momentum": 0.0, "dtype_up": "fp16", "server_steps": 1},
    "prune": {"schedule": "32:10,4:10", "lr": 1e-3, "momentum": 0.9, "dtype_up": "fp16", "server_steps": 1},
    # budget: all; server_steps: docs/design.md (the shared server half is what falls short of training)
    "anybudget": {"schedule": "{budget}:22", "lr": 1e-2, "momentum": 0.0, "dtype_up": "fp16", "server_steps": 2},
}
DEFAULT_BUDGET = 4  # every method's --budget but anybudget's (all channels)
SEEDING = 2         # how a fresh run draws its initial weights (RunConfig.seeding)
CALIBRATION = 512   # training images whose BatchNorm statistics replace the running ones before an evaluation


def _per_method(key: str) -> str:
    return "per method: " + ", ".join(f"{m} {show(d[key])}" for m, d in METHOD_DEFAULTS.items())


@dataclass
class RunConfig:
    method: str = option("deprune", "sl: plain split learning; ca: a fixed budget; deprune: a tight budget, then "
                         "relaxed; prune: from a trained model (--from) to smaller budgets; anybudget: one model "
                         "whose first B channels serve every budget B (from scratch, or from a trained model: --from)",
                         choices=METHODS)
    model: str = option("vgg11_bn_compact", f"the network: a built-in backbone ({', '.join(MODEL_NAMES)}), "
                        "torchvision:NAME, timm:NAME or py:package.module:factory (your own function returning an "
                        "nn.Module)", metavar="SOURCE")
    split: str = option("conv5", "the layer after which the network is cut, e.g. conv5 (the paper's), layer2 or "
                        "features.6 (`splitprune models` lists a model's valid cuts)", metavar="NAME")
    dataset: str = option("fashion-mnist", "image dataset (folder: class-per-folder images under --data-dir)",
                          choices=DATASET_NAMES)
    data_dir: str | None = option(None, "where the dataset's files are", default_text="the dataset's standard place",
                                  metavar="DIR", local=True)
    input_size: int = option(32, "model input size in pixels", ge=8, le=1024)
    in_channels: int | None = option(None, "model input channels", choices=(1, 3), default_text="the dataset's")
    budget: int | None = option(None, "ca's fixed channel budget B; anybudget's largest one (the prefix it sends); "
                                "train also takes 'auto' (per step, from the link: see --step-ms)",
                                ge=1, le=65535, default_text=f"{DEFAULT_BUDGET}; anybudget: all")
    schedule: str | None = option(None, "phases BUDGET:EPOCHS,... (BUDGET an integer or 'all'), e.g. 4:15,all:7",
                                  metavar="B:E,...", default_text=_per_method("schedule"))
    epochs: int | None = option(None, "sl/ca: epochs; deprune/prune: total, the schedule scaled to it",
                                ge=1, le=100000, default_text="the schedule's")
    dtype_up: str | None = option(None, "activation dtype on the uplink (ec: entropy-coded with the tables a "
                                  "trained model holds: evaluation and inference only)", choices=WIRE_DTYPE_NAMES,
                                  default_text=_per_method("dtype_up"))
    dtype_down: str = option("fp32", "gradient dtype on the downlink", choices=GRADIENT_DTYPE_NAMES)
    resolution: int = option(1, "resolution compression factor r of the encoder", ge=1, le=16)
    scaling: str = option("paper", "kept channels times their mask (paper) or kept as they are (binary)",
                          choices=("paper", "binary"))
    batch_size: int = option(16, "training batch size", ge=1, le=4096)
    test_batch_size: int = option(256, "evaluation batch size", ge=1, le=4096)
    lr: float | None = option(None, "SGD learning rate", gt=0, le=10, default_text=_per_method("lr"))
    momentum: float | None = option(None, "SGD momentum", ge=0, lt=1, default_text=_per_method("momentum"))
    lr_schedule: str = option("constant", "constant (the paper's) or cosine: each phase decays its lr to ~0",
                              choices=LR_SCHEDULES)
    weight_decay: float = option(5e-4, "SGD weight decay", ge=0, lt=1)
    budget_eps: float = option(1000.0, "budget loss weight eps", ge=0, le=1e6)
    budget_delta: float = option(0.01, "budget loss sharpness delta", gt=0, le=1)
    gate_init: float = option(15.0, "gate logits start at GATE_INIT * U(0,1)", ge=0, le=100)
    bn_momentum: float = option(0.03, "momentum of the encoder's BatchNorm running statistics", gt=0, le=1)
    bn_eps: float = option(1e-4, "eps of the encoder's BatchNorm", gt=0, le=1)
    reset_threshold: float = option(0.9, "deprune reset: gates with logits below this reopen at U(0, RESET_LOW)",
                                    ge=-100, le=100)
    reset_low: float = option(3.0, "deprune reset: the reopened logits are U(0, RESET_LOW)", ge=0, le=100)
    reset_high: float = option(15.0, "deprune reset: the kept logits are set to RESET_HIGH", ge=0, le=100)
    augment: bool | None = option(None, "CIFAR-style augmentation", default_text="the dataset's")
    seed: int = option(0, "random seed", ge=0, le=2**31 - 1)
    train_subset: int | None = option(None, "use N training images (seeded, stratified)", ge=1,
                                      default_text="all")
    test_subset: int | None = option(None, "use N test images", ge=1, default_text="all")
    from_checkpoint: str | None = option(None, "start from this trained checkpoint or run folder (prune needs one)",
                                         flag="--from", metavar="CHECKPOINT", default_text="none: train from scratch")
    threads: int | None = option(None, "torch CPU threads", ge=1, le=1024, default_text="torch's, all cores",
                                 local=True)
    accelerator: str = option("cpu", "where both halves compute in-process (the wire is the same)",
                              choices=("cpu", "cuda"), local=True)
    tensorboard: bool = option(False, "also log to OUT/tensorboard", local=True)
    extra: dict = field(default_factory=dict, metadata={"option": Option("settings of benchmark baselines", flag="")})
    validation_size: int = option(0, "hold out N training images for validation (class-stratified, a fixed draw "
                                  "for every seed; the training subset comes from the rest); 0: none", ge=0,
                                  le=10_000_000, added=True)
    rate_lambda: float = option(0.0, "weight of the uplink's rate (bits per sample on dtype ec's grid under a learned "
                                "prior, --ec-prior) in the device's loss", ge=0, le=100, added=True)
    ec_prior: str = option("channel", "dtype ec's tables and rate prior: one per channel, or per channel and position "
                           "of the cut (fewer bytes where its layout is fixed)", choices=EC_PRIORS, added=True)
    train_grid: int = option(0, "round the values sent to dtype ecL's grid (L = 3, 7, 15) in training and evaluation: "
                             "the server learns on what ecL sends; 0: off", choices=(0, 3, 7, 15), added=True)
    nested: str = option("sandwich", "anybudget: the prefixes the server trains on per step: sandwich (1, all it "
                         "received, one random ladder budget between), sandwich4 (two between) or random (one ladder "
                         "budget: plain nested dropout)", choices=NESTED_SAMPLINGS, added=True)
    rung_decoder: bool = option(False, "anybudget: a decoder deconvolution per budget rung, not only its "
                                "BatchNorms (the device half and the wire unchanged)", added=True)
    seeding: int = option(SEEDING, "how initial weights are drawn: 2: each half from a random stream of its own, "
                          "seeded from (seed, side), so a side builds only its own half; 1: both halves from one "
                          "stream (runs made before it, which can be resumed and loaded, not started anew)",
                          choices=(1, 2), legacy=1)
    bn_calibration: int = option(CALIBRATION, "training images whose BatchNorm statistics, both halves', replace the "
                                 "running ones before each evaluation: statistics of the weights evaluated (precise "
                                 "BN), which a short run at a constant lr needs; 0: the running statistics, as the "
                                 "paper evaluates", ge=0, le=1_000_000, legacy=0)
    server_steps: int | None = option(None, "optimizer steps the server half takes per training batch it receives; "
                                      "the extra ones run its objective again on the same activations (server "
                                      "compute, no traffic, the device's gradient from the first)", ge=1, le=4,
                                      default_text=_per_method("server_steps"), added=True)

    weights: str | None = option(None, "start from these weights of the whole model (a .pth/.pt state_dict, read "
                                 "without unpickling, or .safetensors); a head that does not fit the data's classes "
                                 "starts fresh", metavar="FILE", default_text="none: random initial weights", local=True)
    weights_sha256: str | None = option(None, "the SHA-256 of --weights (set from the file; a run, its resume and its "
                                        "server must agree on it)", flag="", added=True)
    mean: str | None = option(None, "per-channel input mean the images are normalised by, e.g. 0.485,0.456,0.406",
                              metavar="M[,M,M]", default_text="the dataset's", added=True)
    std: str | None = option(None, "per-channel input standard deviation, e.g. 0.229,0.224,0.225", metavar="S[,S,S]",
                             default_text="the dataset's", added=True)

    def __post_init__(self) -> None:
        if self.budget is None and self.method != "anybudget":
            self.budget = DEFAULT_BUDGET
        if self.dtype_up is None and self.method in METHOD_DEFAULTS:
            self.dtype_up = METHOD_DEFAULTS[self.method]["dtype_up"]
        if self.server_steps is None and self.method == "anybudget":
            # resolved, so in the fingerprint: any-budget runs made with one step are other runs; left None
            # for the methods whose default is the one step every run made before the field existed
            self.server_steps = METHOD_DEFAULTS[self.method]["server_steps"]

    def normalisation(self) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
        """(mean, std) from --mean/--std; None where the dataset's are used."""
        return tuple(_floats(self.mean, "mean")) if self.mean else None, \
            tuple(_floats(self.std, "std")) if self.std else None

    def lr_value(self) -> float:
        return self.lr if self.lr is not None else METHOD_DEFAULTS[self.method]["lr"]

    def server_steps_value(self) -> int:
        return self.server_steps if self.server_steps is not None else METHOD_DEFAULTS[self.method]["server_steps"]

    def momentum_value(self) -> float:
        return self.momentum if self.momentum is not None else METHOD_DEFAULTS[self.method]["momentum"]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that shapes the model and its training (not where data lives)."""
        return hashlib.sha256(json.dumps(model_fields(self.to_dict()), sort_keys=True).encode()).hexdigest()[:16]


def model_fields(values: dict) -> dict:
    """The values that decide what a run computes: the local ones (data_dir, threads) left out, fields added
    later left out at their default, and fields with a legacy value left out at it, so that runs made before
    them keep their fingerprints."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    skip = {name for name, (spec, _, _) in field_specs(RunConfig).items()
            if spec.local or (spec.added and values.get(name, defaults[name]) == defaults[name])
            or (spec.legacy is not NO_LEGACY and values.get(name, spec.legacy) == spec.legacy)}
    return {k: v for k, v in values.items() if k not in skip}


def stored_config(values: dict) -> RunConfig:
    """The RunConfig of a config saved by `RunConfig.to_dict` (a checkpoint's meta, a summary): a field it lacks
    was added since, and takes the value runs had before it (its legacy value) instead of today's default."""
    legacy = {name: spec.legacy for name, (spec, _, _) in field_specs(RunConfig).items()
              if spec.legacy is not NO_LEGACY and name not in values}
    return make_config({**values, **legacy})


# ---------------------------------------------------------------------------------------------- schedules
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


def schedule_phases(cfg: RunConfig) -> list[Phase]:
    """The phases a run goes through, before the cut's channel count is known ('all' stays None)."""
    if cfg.schedule:
        phases = parse_schedule(cfg.schedule)
        return _scale(phases, cfg.epochs) if cfg.epochs is not None else phases
    budget = ALL if cfg.budget is None else cfg.budget
    phases = parse_schedule(METHOD_DEFAULTS[cfg.method]["schedule"].format(budget=budget))
    if cfg.epochs is None:
        return phases
    return [Phase(phases[0].budget, cfg.epochs)] if len(phases) == 1 else _scale(phases, cfg.epochs)


def _check_schedule(cfg: RunConfig) -> None:
    phases = schedule_phases(cfg)
    budgets = [math.inf if p.budget is None else p.budget for p in phases]
    if cfg.method == "sl" and any(p.budget is not None for p in phases):
        raise UserError("method sl sends every channel: its schedule can only use 'all'")
    if cfg.method == "deprune" and budgets != sorted(budgets):
        raise UserError(f"deprune relaxes its budget phase by phase, but schedule {cfg.schedule!r} tightens it; "
                        "for a schedule that tightens, use --method prune")
    if cfg.method == "prune" and budgets != sorted(budgets, reverse=True):
        raise UserError(f"prune tightens its budget phase by phase, but schedule {cfg.schedule!r} relaxes it; "
                        "for a schedule that relaxes, use --method deprune")


def resolve_schedule(cfg: RunConfig, channels: int) -> list[Phase]:
    """The phases a run goes through, with budgets checked against the cut's channel count."""
    if cfg.method not in METHODS:
        raise UserError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHODS)}")
    _check_schedule(cfg)
    phases = schedule_phases(cfg)
    for p in phases:
        if p.budget is not None and p.budget > channels:
            raise UserError(f"budget {p.budget} exceeds the {channels} channels at the cut")
    return [Phase(None if p.budget == channels else p.budget, p.epochs) for p in phases]


# ---------------------------------------------------------------------------------------------- building
class _YamlLoader(yaml.SafeLoader):
    """Safe YAML that also reads 1e-2 as a number (YAML 1.1 wants 1.0e-2)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def load_yaml(path: str) -> dict:
    try:
        data = yaml.load(Path(path).read_text(), Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"config file {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UserError(f"config file {path} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


def make_config(values: dict) -> RunConfig:
    """Build a RunConfig from a dict: unknown keys, wrong types and out-of-range values are one clear message."""
    unknown = sorted(set(values) - set(field_specs(RunConfig)))
    if unknown:
        raise UserError(f"unknown config option(s): {', '.join(unknown)}")
    cfg = RunConfig(**{name: check_value(RunConfig, name, value) for name, value in values.items()})
    _validate(cfg)
    return cfg


def _floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--{name} must be 1 or 3 numbers separated by commas (e.g. 0.5,0.5,0.5): {text!r}") from None
    if len(values) not in (1, 3) or not all(math.isfinite(v) for v in values):
        raise UserError(f"--{name} must be 1 or 3 finite numbers separated by commas, got {text!r}")
    if name == "std" and min(values) <= 0:
        raise UserError(f"--std values must be positive, got {text!r}")
    return values


def _validate(cfg: RunConfig) -> None:
    """What no single field decides (nothing here reads a file or imports a model)."""
    from_source_text(cfg.model)
    cfg.normalisation()
    if cfg.weights_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", cfg.weights_sha256):
        raise UserError("weights_sha256 must be 64 lowercase hexadecimal digits")
    if cfg.method == "prune" and not cfg.from_checkpoint:
        raise UserError("method prune needs --from CHECKPOINT (a trained model)")
    if cfg.nested != "sandwich" and cfg.method != "anybudget":
        raise UserError(f"--nested {cfg.nested} applies to method anybudget only")
    if cfg.rung_decoder and cfg.method != "anybudget":
        raise UserError("--rung-decoder applies to method anybudget only")
    if cfg.reset_low > cfg.reset_high:
        raise UserError(f"reset_low ({cfg.reset_low:g}) must not exceed reset_high ({cfg.reset_high:g})")
    _check_schedule(cfg)


def from_source_text(text: str) -> None:
    """A --model text must name a built-in backbone or KIND:NAME (what it names is checked when it is built)."""
    kind, sep, name = text.partition(":")
    if text in MODEL_NAMES or (sep and kind in MODEL_KINDS and name and len(text) <= 200):
        return
    import difflib

    close = difflib.get_close_matches(text, MODEL_NAMES, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise UserError(f"model must be a built-in backbone ({', '.join(MODEL_NAMES)}), torchvision:NAME, timm:NAME or "
                    f"py:package.module:factory, got {text!r}{hint}")
