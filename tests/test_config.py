"""RunConfig: one place checks every field's type and range, for YAML, flags and code alike."""
import dataclasses
import math

import pytest

from splitprune.config import DATASET_NAMES, MODEL_NAMES, WIRE_DTYPE_NAMES, RunConfig, load_yaml, make_config
from splitprune.errors import UserError
from splitprune.options import Option, field_specs, parse_text

BAD_VALUES = [  # (field, value): each must be refused with a message naming the field
    ("weight_decay", "abc"), ("gate_init", "x"), ("epochs", "3"), ("test_batch_size", 0), ("momentum", -1.0),
    ("momentum", 1.0), ("threads", 0), ("epochs", 0), ("epochs", -2), ("lr", math.nan), ("lr", 0), ("lr", "0.1"),
    ("batch_size", True), ("batch_size", 2.0), ("method", "fedavg"), ("dtype_up", "fp8"), ("dtype_down", None),
    ("in_channels", 2), ("seed", -1), ("bn_momentum", 0.0), ("bn_eps", math.inf), ("budget", 0), ("augment", "yes"),
    ("split", 5), ("model", "vgg16"), ("dataset", "imagenet"), ("train_subset", 0), ("resolution", 0),
    ("input_size", 4), ("scaling", "none"), ("lr_schedule", "linear"), ("accelerator", "tpu"), ("extra", [1]),
    ("tensorboard", 1), ("budget_delta", 0.0), ("reset_low", -1.0),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_a_bad_value_is_one_clear_message_naming_the_field(name, value):
    with pytest.raises(UserError) as err:
        make_config({name: value})
    message = str(err.value)
    assert message.startswith(f"{name} must be ") and "\n" not in message
    assert repr(value) in message or "empty" in message


def test_every_field_has_its_help_and_a_type_the_checks_know():
    for f in dataclasses.fields(RunConfig):
        spec = f.metadata.get("option")
        assert isinstance(spec, Option) and len(spec.help) > 10, f"{f.name}: declare it with option(...)"
        assert field_specs(RunConfig)[f.name][1] in (int, float, str, bool, dict), f.name


def test_default_config_passes_its_own_checks_and_keeps_its_fingerprint():
    """Fingerprints decide resume and server sessions: the same values hash as before the metadata rewrite, and
    runs saved before `seeding` existed (their weights drawn with seeding 1) keep theirs."""
    old = {"seeding": 1, "bn_calibration": 0}   # the legacy values of the fields added since
    assert make_config(old).fingerprint() == "86ead5b3205d0e80"
    assert make_config({**old, "method": "ca", "budget": 8, "lr": 0.05, "data_dir": "/x", "threads": 2}).fingerprint() \
        == "70a0af6a61913621"
    assert make_config({**old, "method": "sl", "epochs": 3, "extra": {"a": 1}}).fingerprint() == "4ae9598d884235cb"
    assert make_config({"bn_calibration": 0}).fingerprint() == "34132f8187494e1c"  # each half from its own stream


def test_integers_widen_to_floats_but_not_the_reverse():
    cfg = make_config({"lr": 1, "weight_decay": 0})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.weight_decay, float)
    with pytest.raises(UserError):
        make_config({"epochs": 2.0})


def test_flag_text_is_parsed_then_checked_like_any_value():
    assert parse_text(RunConfig, "epochs", "3") == 3
    assert parse_text(RunConfig, "lr", "1e-3") == 1e-3
    for name, text in [("epochs", "two"), ("epochs", "0"), ("momentum", "-1"), ("threads", "0"),
                       ("dtype_up", "fp8"), ("lr", "nan")]:
        with pytest.raises(UserError, match=f"^{name} must be "):
            parse_text(RunConfig, name, text)


def test_yaml_values_are_checked_and_1e_minus_2_is_a_number(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("lr: 1e-2\nweight-decay: 0\nschedule: 4:3,all:1\n")
    cfg = make_config(load_yaml(str(good)))
    assert cfg.lr == 0.01 and cfg.weight_decay == 0.0 and cfg.schedule == "4:3,all:1"
    bad = tmp_path / "bad.yaml"
    bad.write_text('epochs: "two"\n')
    with pytest.raises(UserError, match="^epochs must be an integer >= 1"):
        make_config(load_yaml(str(bad)))
    (tmp_path / "list.yaml").write_text("- epochs\n")
    with pytest.raises(UserError, match="mapping"):
        load_yaml(str(tmp_path / "list.yaml"))


@pytest.mark.parametrize("values,match", [
    ({"method": "deprune", "schedule": "all:2,4:3"}, "deprune relaxes"),
    ({"method": "deprune", "schedule": "8:2,4:3"}, "deprune relaxes"),
    ({"method": "prune", "from_checkpoint": "x", "schedule": "4:2,32:2"}, "prune tightens"),
    ({"method": "sl", "schedule": "4:2"}, "sl sends every channel"),
    ({"method": "prune"}, "needs --from"),
    ({"method": "deprune", "epochs": 1}, "fewer than the schedule's 2 phases"),
    ({"reset_low": 20.0}, "reset_low"),
])
def test_settings_that_contradict_each_other_are_refused(values, match):
    with pytest.raises(UserError, match=match):
        make_config(values)


def test_relaxing_and_tightening_schedules_are_accepted_under_their_own_method():
    assert make_config({"method": "deprune", "schedule": "4:3,all:1"}).schedule == "4:3,all:1"
    assert make_config({"method": "deprune", "schedule": "4:15,16:7"}).schedule == "4:15,16:7"
    assert make_config({"method": "prune", "from_checkpoint": "x", "schedule": "64:1,32:1,4:1"}).method == "prune"


def test_name_lists_match_the_modules_that_use_them():
    from splitprune.compression.codec import WIRE_DTYPES
    from splitprune.data import DATASETS
    from splitprune.models import list_models

    assert MODEL_NAMES == tuple(list_models())
    assert DATASET_NAMES == tuple(DATASETS)
    assert WIRE_DTYPE_NAMES == tuple(WIRE_DTYPES)


def test_a_short_run_at_a_constant_lr_is_told_why_test_accuracy_lags():
    from splitprune.training.evaluation import short_run_warning

    uncalibrated = {"bn_calibration": 0}
    assert "BatchNorm running statistics" in short_run_warning(make_config(uncalibrated), 57)
    assert short_run_warning(make_config(uncalibrated), 5000) is None
    assert short_run_warning(make_config({**uncalibrated, "lr_schedule": "cosine"}), 57) is None
    assert short_run_warning(make_config({}), 57) is None  # calibrated before every evaluation: nothing lags
