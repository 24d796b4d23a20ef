"""Test support: a remote run checked against an in-process one, the prefixes of a sandwich step.
(Throw-away TLS certificates: splitprune.bench.core.certificates.)"""
from __future__ import annotations

from pathlib import Path


def assert_remote_equals_local(cfg, folder: Path) -> dict:
    """Train `cfg` in-process (FOLDER/local) and against a real server on loopback (FOLDER/remote); assert the two
    runs' summaries (but times and transport) are identical, and the tensors of the remote checkpoint (the device
    half: the server keeps its own) equal the local one's; return the local run's tensors (both halves)."""
    import torch
    from safetensors.torch import load_file

    from splitprune.client.connect import connect
    from splitprune.server.app import start_app
    from splitprune.server.config import ServeConfig
    from splitprune.training.trainer import Trainer

    local = Trainer(cfg, folder / "local", show_progress=False).run()
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_sessions=4))
    try:
        endpoint = connect(cfg, handle.address, out=str(folder / "remote"))
        try:
            remote = Trainer(cfg, folder / "remote", endpoint=endpoint, show_progress=False).run()
        finally:
            endpoint.close()
    finally:
        handle.stop(grace=0.5)
    strip = ("wall_seconds", "train_seconds", "transport")
    assert {k: v for k, v in remote.items() if k not in strip} == {k: v for k, v in local.items() if k not in strip}
    a, b = (load_file(str(folder / run / "checkpoint" / "model.safetensors")) for run in ("local", "remote"))
    assert all(torch.equal(a[k], b[k]) for k in b), set(a) ^ set(b)
    return a


def sandwich_step(half, channels: int = 512) -> list[int]:
    """One any-budget objective's backward on random activations through server `half` (the draws of RngStream(2));
    returns the ladder rungs the step trained, in order."""
    import torch

    from splitprune.compression.codec import Decoded
    from splitprune.compression.rungs import rung
    from splitprune.training.objectives import NestedPrefixes
    from splitprune.training.rng import RngStream

    torch.manual_seed(0)
    values, labels = torch.rand(4, channels, 4, 4), torch.randint(10, (4,))
    with RngStream(2).active():
        budgets = NestedPrefixes().budgets(channels)
    with RngStream(2).active():
        loss, _ = NestedPrefixes()(half, Decoded(values, torch.arange(channels), channels), values, labels)
    loss.backward()
    return sorted(rung(b, channels) for b in budgets)
