"""Opening a training session on a `splitprune serve` server: the Hello, the client id, resume, flags.

`connect` returns a RemoteEndpoint (splitprune.client.remote), the Trainer's Endpoint.
"""
from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

from splitprune.client.channel import Connection, RemoteError
from splitprune.client.config import ConnectConfig
from splitprune.client.remote import RemoteEndpoint
from splitprune.compression.codec import WIRE_DTYPES
from splitprune.config import RunConfig, resolve_schedule
from splitprune.errors import UserError
from splitprune.proto import service_pb2 as spb
from splitprune.wire.envelopes import PROTOCOL_VERSION

__all__ = ["RemoteEndpoint", "RemoteError", "connect", "make_hello"]


def _num_classes(cfg: RunConfig) -> int:
    from splitprune.data import dataset_info, resolve_data_dir
    from splitprune.data.folder import folder_classes

    info = dataset_info(cfg.dataset)
    if info.num_classes:
        return info.num_classes
    classes = folder_classes(resolve_data_dir(info, cfg.data_dir))
    if len(classes) < 2:
        raise UserError(f"{cfg.dataset} data in {cfg.data_dir} has {len(classes)} class folders; need at least 2")
    return len(classes)


def max_budget(cfg: RunConfig) -> int:
    """Most channels any phase of the schedule sends (0 = all)."""
    phases = resolve_schedule(cfg, 65535)
    return 0 if any(p.budget is None for p in phases) else max(p.budget for p in phases)


CLIENT_ID_FILE = ".splitprune-client-id"


def client_id_for(out: str | None) -> str:
    """A stable id per run folder (kept in OUT/.splitprune-client-id once a session opened, `keep_client_id`),
    so a rerun resumes as the same client."""
    if out:
        try:
            text = (Path(out) / CLIENT_ID_FILE).read_text().strip()
            if text:
                return text
        except OSError:
            pass
    fresh = f"{socket.gethostname()[:40]}-{uuid.uuid4().hex[:16]}"
    return "".join(c if c.isalnum() or c in "._:-" else "-" for c in fresh)


def keep_client_id(out: str | None, client_id: str) -> None:
    """Remember the client id in the run folder: written only once the server took the session, so a command
    that fails to connect leaves nothing behind."""
    if out and not (Path(out) / CLIENT_ID_FILE).exists():
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / CLIENT_ID_FILE).write_text(client_id + "\n")


def make_hello(cfg: RunConfig, client_id: str, fresh_start: bool, num_classes: int | None = None,
               in_channels: int | None = None) -> spb.Hello:
    from splitprune.training.setup import input_channels

    return spb.Hello(protocol_version=PROTOCOL_VERSION, client_id=client_id, fingerprint=cfg.fingerprint(),
                     config_json=json.dumps(cfg.to_dict()), num_classes=num_classes or _num_classes(cfg),
                     in_channels=in_channels or input_channels(cfg), dtype_up=WIRE_DTYPES[cfg.dtype_up],
                     dtype_down=WIRE_DTYPES[cfg.dtype_down], max_budget=max_budget(cfg), fresh_start=fresh_start)


def saved_server_half(out: str | Path | None, cfg: RunConfig) -> dict | None:
    """Where a run folder's checkpoint says the server saved its half (None: no such checkpoint of `cfg`)."""
    from splitprune.training.checkpoint import read_meta

    if not out or not (Path(out) / "checkpoint" / "meta.json").exists():
        return None
    meta = read_meta(Path(out) / "checkpoint")
    identity = meta.get("server_half")
    if meta.get("fingerprint") != cfg.fingerprint() or not isinstance(identity, dict):
        return None  # the Trainer refuses another config's folder; an in-process one pushes its half
    return identity


def connect(cfg: RunConfig, config: ConnectConfig | str, *, out: str | None = None, client_id: str | None = None,
            fresh_start: bool | None = None) -> RemoteEndpoint:
    """Open a training session for `cfg` on the server `config` names (a ConnectConfig, or just HOST:PORT).
    Without `fresh_start`, it is inferred from `out`: a run folder holding a checkpoint resumes (the server
    restores the half that checkpoint names), anything else starts afresh."""
    if fresh_start is None:
        fresh_start = not (out and (Path(out) / "checkpoint" / "meta.json").exists())
    hello = make_hello(cfg, client_id or client_id_for(out), fresh_start)
    saved = None if fresh_start else saved_server_half(out, cfg)
    if saved:
        hello.resume_step_id, hello.resume_state_sha256 = int(saved["step_id"]), str(saved["state_sha256"])
    conn = Connection(config)
    try:
        endpoint = RemoteEndpoint(conn, hello)
    except BaseException:
        conn.close()
        raise
    keep_client_id(out, hello.client_id)
    if fresh_start and cfg.from_checkpoint:
        try:
            _push_pretrained(endpoint, cfg)
        except BaseException:
            endpoint.close()
            raise
    return endpoint


def _push_pretrained(endpoint: RemoteEndpoint, cfg: RunConfig) -> None:
    """prune starts from a trained model: its server half travels to the server before the first phase."""
    from splitprune.training.setup import read_pretrained

    tensors = {k: v for k, v in read_pretrained(cfg).items() if k.startswith("server.")}
    reply = endpoint.push_state(tensors, 0)
    if not reply.applied:
        raise RemoteError(f"cannot start from {cfg.from_checkpoint}: {reply.note}")
