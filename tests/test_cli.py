"""The command line as a new user meets it: real defaults in help, one-line errors, nothing half-written."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from splitprune.cli import SUBCOMMANDS, main
from splitprune.config import RunConfig
from splitprune.options import field_specs
from splitprune.training.checkpoint import read_meta

TINY_FLAGS = ["--train-subset", "64", "--test-subset", "32", "--batch-size", "16", "--test-batch-size", "32",
              "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def ca_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "ca4"
    assert main(["train", "--method", "ca", "--budget", "4", "--epochs", "1", *TINY_FLAGS, "--out", str(out)]) == 0
    return out


def _help(capsys, *command) -> str:
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    return re.sub(r"\s+", " ", capsys.readouterr().out)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_train_help_shows_the_real_defaults_once_each(capsys):
    text = _help(capsys, "train")
    for shown in ["(default: deprune)", "(default: vgg11_bn_compact)", "(default: conv5)", "(default: fashion-mnist)",
                  "(default: 16)", "(default: 256)", "per method: sl 0.01, ca 0.01, deprune 0.01, prune 0.001",
                  "per method: sl all:22, ca B:22, deprune 4:15,all:7, prune 32:10,4:10",
                  "per method: sl 0, ca 0, deprune 0, prune 0.9", "(default: 0.0005)", "(default: 0.03)"]:
        assert shown in text, shown
    assert "(default: None)" not in text
    for name in field_specs(RunConfig):
        flag = field_specs(RunConfig)[name][0].flag
        flag = "--" + name.replace("_", "-") if flag is None else flag
        if flag:  # every field has its flag, listed exactly once among the options
            assert len(re.findall(rf" {re.escape(flag)}[ ,]", text.split("options:")[1])) == 1, flag


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_no_help_text_says_none_or_an_empty_list(capsys, command):
    text = _help(capsys, command)
    assert "(default: None)" not in text and "None =" not in text and "(default: [])" not in text


def test_eval_help_says_what_is_as_trained(capsys):
    text = _help(capsys, "eval")
    assert ("--dtype-up {fp32,fp16,int8,int4,ec,ec7,ec3} activation dtype on the uplink (ec: entropy-coded with the "
            "tables a trained model holds: evaluation and inference only) (default: as trained)") in text
    assert "(default: None)" not in text


@pytest.mark.parametrize("flags,field", [
    (["--epochs", "0"], "--epochs must be"), (["--epochs", "-1"], "--epochs must be"),
    (["--momentum", "-1"], "--momentum must be"), (["--threads", "0"], "--threads must be"),
    (["--weight-decay", "abc"], "--weight-decay must be"), (["--gate-init", "x"], "--gate-init must be"),
    (["--test-batch-size", "0"], "--test-batch-size must be"),
    (["--method", "deprune", "--schedule", "all:2,4:3"], "deprune"), (["--dtype-up", "fp8"], "--dtype-up must be"),
    (["--lr", "inf"], "--lr must be"),
])
def test_a_bad_flag_is_one_line_exit_2_and_nothing_written(capsys, tmp_path, flags, field):
    out = tmp_path / "run"
    assert main(["train", *flags, "--out", str(out)]) == 2
    assert field in _error_line(capsys)  # named by the flag the user typed
    assert not out.exists()


def test_a_bad_yaml_value_is_one_line_exit_2_and_nothing_written(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text('epochs: "two"\n')
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    assert "epochs must be an integer" in _error_line(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", ["train", "eval"])
def test_an_unwritable_out_is_refused_before_any_work(capsys, tmp_path, ca_run, command):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    args = ["train", "--method", "ca", "--epochs", "1", *TINY_FLAGS] if command == "train" else \
        ["eval", "--checkpoint", str(ca_run), "--quiet"]
    bad = ["/proc/splitprune_no/x", str(a_file / "sub")] + ([str(a_file)] if command == "train" else [str(tmp_path)])
    for out in bad:
        assert main([*args, "--out", out]) == 2, out
        assert "--out" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_eval_refuses_a_meta_json_whose_budget_was_edited(capsys, ca_run, tmp_path):
    assert main(["eval", "--checkpoint", str(ca_run), "--quiet", "--test-subset", "64",
                 "--out", str(tmp_path / "ok.json")]) == 0
    assert json.loads((tmp_path / "ok.json").read_text())["budget"] == 4
    capsys.readouterr()
    edited = tmp_path / "edited"
    edited.mkdir()
    for f in (ca_run / "checkpoint").iterdir():
        (edited / f.name).write_bytes(f.read_bytes())
    meta = json.loads((edited / "meta.json").read_text())
    meta["budget"] = 64
    (edited / "meta.json").write_text(json.dumps(meta))
    assert main(["eval", "--checkpoint", str(edited), "--budget", "64", "--out", str(tmp_path / "bad.json")]) == 2
    assert "does not describe model.safetensors" in _error_line(capsys)
    assert not (tmp_path / "bad.json").exists()


def test_prune_refuses_to_start_above_the_budget_the_model_was_trained_for(capsys, ca_run, tmp_path):
    assert read_meta(ca_run)["budget"] == 4
    out = tmp_path / "prune"
    assert main(["train", "--method", "prune", "--from", str(ca_run), "--schedule", "32:1,4:1", *TINY_FLAGS,
                 "--out", str(out)]) == 2
    assert "trained for budget 4" in _error_line(capsys)
    assert not out.exists()


def test_plot_draws_a_run(capsys, ca_run, tmp_path):
    assert main(["plot", str(ca_run), "--out", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.csv" in _error_line(capsys)


@pytest.mark.parametrize("command", ["link", "train", "eval", "models", "bench", "plot"])
def test_help_does_not_import_torch(command):
    code = ("import sys\nfrom splitprune.cli import main\ntry:\n    main([%r, '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules)" % command)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_a_short_constant_lr_run_says_why_its_test_accuracy_lags(capsys, tmp_path):
    assert main(["train", "--method", "ca", "--epochs", "1", *TINY_FLAGS, "--bn-calibration", "0", "--out",
                 str(tmp_path / "run")]) == 0
    assert "warning: only 4 training steps at a constant lr, evaluated with the BatchNorm running statistics" \
        in capsys.readouterr().out
    # by default the statistics are calibrated before every evaluation: nothing lags, nothing to warn of
    assert main(["train", "--method", "ca", "--epochs", "1", *TINY_FLAGS, "--out", str(tmp_path / "run2")]) == 0
    assert "warning: only" not in capsys.readouterr().out
