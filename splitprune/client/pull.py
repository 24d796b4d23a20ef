"""Fetch a remote run's server half from its server into a complete model folder (`splitprune pull`).

A run trained with `--server` keeps only the device half in its folder (the server saves its half where
it runs). This is the explicit, counted transfer of the server half, as the run's checkpoint names it
(step id and digest), into a folder that `splitprune eval` and `splitprune infer` take like any other.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from splitprune.client.channel import Connection, RemoteError
from splitprune.client.config import ConnectConfig
from splitprune.client.connect import make_hello
from splitprune.client.remote import RemoteEndpoint
from splitprune.errors import UserError


def pull(checkpoint: str, server: ConnectConfig | str, out: str) -> dict:
    """Write `out`: the checkpoint's device half and the server half fetched from `server` (a ConnectConfig or
    HOST:PORT); returns what was pulled and the traffic it took."""
    server = ConnectConfig(server=server) if isinstance(server, str) else server
    from splitprune.config import stored_config
    from splitprune.training.checkpoint import read_meta, read_tensors, state_from_bytes, write_checkpoint
    from splitprune.wire.accounting import totals

    meta = read_meta(checkpoint)
    identity = meta.get("server_half")
    if not identity:
        raise UserError(f"{meta['_folder']} already holds the whole model (it was trained in-process): "
                        "nothing to pull")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {out} exists and is not empty: give a new folder")
    cfg = stored_config(meta["config"])
    hello = make_hello(cfg, identity["client_id"], False, int(meta["num_classes"]), int(meta["in_channels"]))
    hello.resume_step_id, hello.resume_state_sha256 = int(identity["step_id"]), identity["state_sha256"]
    try:
        endpoint = RemoteEndpoint(Connection(server), hello)  # the server restores that save
    except RemoteError as exc:
        if exc.reason != "NO_CHECKPOINT":
            raise
        raise UserError(f"the server at {server.server} holds no checkpoint of this run (client "
                        f"{identity['client_id']}, step {identity['step_id']}): is it the server the run trained on? "
                        "(a server keeps them across its restarts only with serve --checkpoint DIR)") from None
    try:
        _, data = endpoint.fetch_state()
    finally:
        endpoint.close()
    digest = hashlib.sha256(data).hexdigest()
    if digest != identity["state_sha256"]:
        raise UserError(f"the server sent a server half with digest {digest[:12]}, the checkpoint names "
                        f"{identity['state_sha256'][:12]}: it is not this run's (trained further by other clients?)")
    half = state_from_bytes(data)
    folder = meta.pop("_folder")
    model = {**read_tensors(folder), **{k: v for k, v in half.items() if k.startswith("server.")}}
    state = None
    if (Path(folder) / "state.safetensors").exists():  # a run's checkpoint: in-process resumable once pulled
        state = {**read_tensors(folder, "state.safetensors"),
                 **{k: v for k, v in half.items() if not k.startswith("server.")}}
    traffic = endpoint.transport_stats()
    up, down = totals(traffic)
    meta["server_half"] = None
    meta["pulled"] = {**identity, "from": server.server, "bytes_up": up, "bytes_down": down, "transport": traffic}
    write_checkpoint(target, model, meta, state)
    return meta["pulled"]
