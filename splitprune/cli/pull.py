"""`splitprune pull`: fetch a remote run's server half from its server into a complete model folder.

A run trained with `--server` keeps only the device half in its folder (the server saves its half where
it runs). This is the explicit, counted transfer of the server half, as the run's checkpoint names it
(step id and digest), into a folder that `splitprune eval` and `splitprune infer` take like any other.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from splitprune.cli.train import add_remote_flags
from splitprune.errors import UserError


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="fetch a remote run's server half into a complete model folder",
                              description=__doc__)
    add_remote_flags(p, "the `splitprune serve` server of the run")
    p.add_argument("--checkpoint", required=True,
                   help="the run folder (or a checkpoint folder of it, e.g. RUN/models/budget_4)")
    p.add_argument("--out", required=True, help="new folder for the complete model (must not exist or be empty)")
    p.set_defaults(run=run)


def pull(checkpoint: str, server: str, out: str, token: str | None = None, tls=None, measure: bool = False) -> dict:
    """Write `out`: the checkpoint's device half and the server half fetched from `server`; returns the traffic."""
    from splitprune.config import make_config
    from splitprune.training.checkpoint import read_meta, read_tensors, write_checkpoint
    from splitprune.transport.accounting import totals
    from splitprune.transport.channel import Connection
    from splitprune.transport.client import make_hello
    from splitprune.transport.remote import RemoteServer
    from splitprune.transport.protocol import state_from_bytes

    meta = read_meta(checkpoint)
    identity = meta.get("server_half")
    if not identity:
        raise UserError(f"{meta['_folder']} already holds the whole model (it was trained in-process): "
                        "nothing to pull")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise UserError(f"--out {out} exists and is not empty: give a new folder")
    cfg = make_config(meta["config"])
    hello = make_hello(cfg, identity["client_id"], False, int(meta["num_classes"]), int(meta["in_channels"]))
    hello.resume_step_id, hello.resume_state_sha256 = int(identity["step_id"]), identity["state_sha256"]
    endpoint = RemoteServer(Connection(server, token, tls, measure), hello)  # the server restores that save
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
    meta["pulled"] = {**identity, "from": server, "bytes_up": up, "bytes_down": down, "transport": traffic}
    write_checkpoint(target, model, meta, state)
    return meta["pulled"]


def run(args: argparse.Namespace) -> int:
    from splitprune.transport.client import tls_from_args, token_from_args

    pulled = pull(args.checkpoint, args.server, args.out, token_from_args(args), tls_from_args(args),
                  args.measure_socket)
    how = "on the socket" if pulled["transport"]["counted"] == "socket" else "in encoded messages"
    print(f"pulled the server half (step {pulled['step_id']}, digest {pulled['state_sha256'][:12]}) from "
          f"{pulled['from']}: {pulled['bytes_down'] / 1e6:.3f} MB down, {pulled['bytes_up'] / 1e6:.3f} MB up {how}")
    print(f"complete model: {args.out} (splitprune eval --checkpoint {args.out})")
    return 0
