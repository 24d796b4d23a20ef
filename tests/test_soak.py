"""The soak benchmark, briefly: concurrent clients against a real server process, failures and RSS recorded."""
import json

from splitprune.bench.systems.soak import soak
from splitprune.cli import main


def test_soak_runs_clients_against_a_real_server_and_writes_its_results(tmp_path):
    out = tmp_path / "soak"
    summary = soak(clients=2, minutes=0.3, out=out, sample_s=2.0, images_per_epoch=32)  # epochs of 2 steps
    result = json.loads((out / "soak.json").read_text())
    assert result["clients"] == 2 and result["failed_requests"] == 0, result["errors"]
    assert result["steps"] == summary["steps"] > 0 and all(n > 0 for n in result["steps_per_client"])
    assert result["checkpoints"] > 0 and result["evaluations"] > 0
    assert result["server_rss_mb_max"] > 50 and result["server_exit_code"] == 0
    assert len(result["samples"]) >= 3 and result["samples"][-1]["steps"] == result["steps"]
    for name in ("soak.csv", "soak.png", "soak.md", "command.txt"):
        assert (out / name).stat().st_size > 0
    assert "splitprune bench soak --profile quick --clients 2 --minutes 0.3" in (out / "command.txt").read_text()


def test_soak_is_a_bench_suite_with_its_own_options(capsys):
    assert main(["bench", "step", "--clients", "2"]) == 2
    assert "options of the soak suite" in capsys.readouterr().err
    assert main(["bench", "soak", "--clients", "0", "--minutes", "1"]) == 2
    assert "--clients >= 1" in capsys.readouterr().err
