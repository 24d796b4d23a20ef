"""Tenant isolation (issue 25 item 1): a run's result does not depend on what other runs do at the same time in
the same process — neither other in-process runs nor other clients of the same server. Every run here draws
random numbers at every step (any-budget training with random nested budgets), so a shared random state would
show."""
import threading

import torch

from splitprune.client.connect import connect
from splitprune.config import make_config
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.training.checkpoint import read_tensors
from splitprune.training.trainer import Trainer


def _config(seed: int):
    return make_config({"method": "anybudget", "nested": "random", "seed": seed, "train_subset": 48,
                        "test_subset": 16, "batch_size": 8, "epochs": 1, "threads": 1, "bn_calibration": 8})


def _run(seed: int, out, server: str | None = None) -> dict:
    cfg = _config(seed)
    endpoint = connect(cfg, server, out=str(out)) if server else None
    summary = Trainer(cfg, out, endpoint=endpoint, show_progress=False).run()
    device = {k: v for k, v in read_tensors(out / "checkpoint").items() if k.startswith("device.")}
    return {"accuracy": summary["final_test_accuracy"], "device": device}


def _together(runs: list) -> list[dict]:
    """Run the callables at once, one thread each; their results in order."""
    results: list = [None] * len(runs)

    def go(i):
        try:
            results[i] = runs[i]()
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(runs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(isinstance(r, Exception) for r in results), results
    return results


def _same(a: dict, b: dict) -> bool:
    return a["accuracy"] == b["accuracy"] and a["device"].keys() == b["device"].keys() and all(
        torch.equal(a["device"][k], b["device"][k]) for k in a["device"])


def test_a_run_ends_the_same_alone_and_beside_other_tenants(tmp_path):
    alone = _run(0, tmp_path / "alone")
    beside = _together([lambda: _run(0, tmp_path / "a"), lambda: _run(1, tmp_path / "b"),
                        lambda: _run(2, tmp_path / "c")])[0]
    assert _same(alone, beside)
    # a fresh server each time: clients of one configuration share its server half (split learning's many devices)
    handle = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        remote_alone = _run(0, tmp_path / "r_alone", handle.address)
    finally:
        handle.stop(grace=0.5)
    handle = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        remote_beside = _together([lambda: _run(0, tmp_path / "ra", handle.address),
                                   lambda: _run(1, tmp_path / "rb", handle.address),
                                   lambda: _run(2, tmp_path / "rc", handle.address)])[0]
    finally:
        handle.stop(grace=0.5)
    assert _same(remote_alone, remote_beside)
    assert _same(remote_alone, alone)  # and a remote run is the in-process run
