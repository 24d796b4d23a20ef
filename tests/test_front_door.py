"""The front door, as a new user meets it: every command's bad flags refused before anything slow is loaded, no
file left behind by a command that fails, clear messages where a server is not the one a user thinks, and the
main job's pieces (the thread setting on a busy machine, runs compared on the same axes)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitprune.cli import main
from splitprune.cli.common import idle_cores

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> tuple[int, str, bool]:
    """(exit code, stderr, whether torch was imported) of `splitprune ARGV` in a fresh interpreter."""
    code = ("import sys\nfrom splitprune.cli import main\nrc = main(%r)\nprint('torch' in sys.modules)\nsys.exit(rc)"
            % list(argv))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    return done.returncode, done.stderr, done.stdout.strip().splitlines()[-1] == "True"


def _free_port() -> int:
    from splitprune.bench.core.processes import free_port

    return free_port()


def test_bad_flags_are_refused_before_torch_is_loaded(tmp_path):
    for argv, message in ((["serve", "--max-sessions", "0"], "--max-sessions must be"),
                          (["serve", "--batch-train"], "--batch-window-ms"),
                          (["export", "--checkpoint", str(tmp_path), "--out", "/proc/splitprune-no/x"], "--out"),
                          (["train", "--method", "ca", "--epochs", "0", "--out", str(tmp_path / "r")], "--epochs"),
                          (["train", "--method", "ca", "--budget", "auto", "--step-ms", "-5", "--server",
                            "127.0.0.1:1", "--out", str(tmp_path / "r")], "--step-ms must be a positive")):
        rc, err, torch_loaded = _run(*argv)
        assert rc == 2 and message in err and "Traceback" not in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and not torch_loaded, argv
    assert not (tmp_path / "r").exists()


def test_eval_scores_the_images_the_run_was_evaluated_on_and_writes_only_where_told(exported, tmp_path, capsys):
    run, _ = exported  # trained with --test-subset 16
    before = sorted(p.name for p in (run / "checkpoint").iterdir())
    assert main(["eval", "--checkpoint", str(run), "--quiet"]) == 0
    assert "on 16 images" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoint").iterdir()) == before   # nothing written there
    assert main(["eval", "--checkpoint", str(run), "--quiet", "--test-subset", "32", "--out",
                 str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["test_samples"] == 32


def test_infer_checks_its_budget_before_data_model_or_connection(exported, capsys):
    run, _ = exported
    # nothing listens on the port: a budget refused first proves the check comes before the connection
    assert main(["infer", "--checkpoint", str(run), "--server", f"127.0.0.1:{_free_port()}", "--budget", "0"]) == 2
    err = capsys.readouterr().err
    assert "--budget 0" in err and "cannot reach" not in err


def test_auto_budget_needs_a_server_and_says_so(tmp_path, capsys):
    out = tmp_path / "auto"
    assert main(["train", "--method", "ca", "--budget", "auto", "--step-ms", "200", "--epochs", "1",
                 "--train-subset", "16", "--out", str(out)]) == 2
    assert "needs --server" in capsys.readouterr().err and not out.exists()


def test_a_failed_connection_leaves_nothing_in_the_run_folder(tmp_path, capsys):
    out = tmp_path / "remote"
    assert main(["train", "--method", "ca", "--epochs", "1", "--train-subset", "16", "--quiet", "--out", str(out),
                 "--server", f"127.0.0.1:{_free_port()}", "--connect-timeout", "1"]) == 2
    assert "cannot reach the server" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


def test_pull_from_a_server_that_never_hosted_the_run_says_so_and_builds_nothing(tmp_path, capsys):
    from splitprune.server.app import start_app
    from splitprune.server.config import ServeConfig

    trained_on = start_app(ServeConfig(listen="127.0.0.1:0"))
    run = tmp_path / "run"
    try:
        assert main(["train", "--method", "ca", "--epochs", "1", "--train-subset", "16", "--test-subset", "16",
                     "--threads", "1", "--quiet", "--out", str(run), "--server", trained_on.address]) == 0
    finally:
        trained_on.stop(grace=0.5)
    other = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        capsys.readouterr()
        assert main(["pull", "--server", other.address, "--checkpoint", str(run), "--out", str(tmp_path / "w")]) == 2
        err = capsys.readouterr().err
        assert "holds no checkpoint of this run" in err and "is it the server the run trained on" in err
        assert not other.service.halves  # the failed pull built no half
    finally:
        other.stop(grace=0.5)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("load,cores,threads", [(0.0, 2, 2), (0.4, 2, 2), (1.0, 2, 1), (1.9, 2, 1), (5.0, 2, 1),
                                                (3.2, 8, 5)])
def test_the_main_job_trains_on_the_cores_other_processes_leave_idle(load, cores, threads):
    assert idle_cores(load, cores) == threads


def test_runs_are_compared_on_the_same_axes(exported, tmp_path):
    run, _ = exported
    assert main(["plot", str(run), str(run), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 10_000
    assert main(["plot", str(run), str(tmp_path / "no-run")]) == 2
