"""Where the server keeps its halves on disk: live saves and server-side checkpoints.

- `DIR/halves/<fingerprint>/`: the whole hosted half (weights, optimizer, random state, the current
  phase, each client's last step id, digest and reply), saved periodically and on shutdown, loaded on
  start, so that clients reconnect and continue where they were.
- `DIR/checkpoints/<fingerprint>/<sha256(client_id)>/<step_id>-<digest>.safetensors` (+ `.json`): the
  half's state (the very file FetchState streams) saved on a client's CheckpointRequest, named by its step
  id and digest (a phase start changes the half without a step: two saves can share a step id). The
  newest KEEP_CHECKPOINTS per half and client are kept, and besides them the newest KEEP_MODELS that the
  client asked to keep (the models a run names, e.g. prune's per budget). A client resumes from one with
  Hello.resume_step_id and its digest.

Every file is written aside and renamed into place, so a crash leaves the previous version intact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from splitprune.config import stored_config
from splitprune.errors import ProtocolError, UserError
from splitprune.proto import pb
from splitprune.server.hosting import ClientRecord, HostedHalf
from splitprune.server.validation import check_phase_number
from splitprune.training.checkpoint import read_meta, read_tensors, state_from_bytes, write_checkpoint

log = logging.getLogger("splitprune.serve")
HALF_KIND = "splitprune-server-half/1"
KEEP_CHECKPOINTS = 2          # per half and client
KEEP_MODELS = 16              # checkpoints a client asked to keep, per half and client
KEEP_CHECKPOINT_CLIENTS = 64  # per half: the clients whose checkpoints were written longest ago go first
_FP_RE = re.compile(r"^[0-9a-f]{16}$")
_PHASE_FIELDS = ("phase", "budget", "lr", "momentum", "weight_decay")


@dataclass(frozen=True)
class SavedCheckpoint:
    step_id: int
    version: int
    sha256: str
    size: int


def _phase_dict(req: pb.PhaseRequest | None) -> dict | None:
    return None if req is None else {name: getattr(req, name) for name in _PHASE_FIELDS}


def _phase_req(values: dict | None, cfg, channels: int) -> pb.PhaseRequest | None:
    if not values:
        return None
    req = pb.PhaseRequest(**{k: values[k] for k in _PHASE_FIELDS})
    check_phase_number(req.phase, cfg, channels)
    return req


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class HalfStore:
    """Saving and loading hosted halves under one folder."""

    def __init__(self, root: Path, checkpoints: Path | None = None) -> None:
        """`checkpoints`: where the clients' checkpoints go when not under root (a tier's shared folder)."""
        self.root = root
        self.checkpoints = checkpoints or root / "checkpoints"
        self._write_lock = threading.Lock()  # one checkpoint write at a time (never under a half's mutex)
        self._save_lock = threading.Lock()   # one live save at a time: two would share a temporary folder

    # ---------------------------------------------------------------- live saves
    def save(self, half: HostedHalf) -> bool:
        """Write a changed half atomically: a consistent snapshot taken under its mutex between updates."""
        with half.mutex:
            if half.version == half.saved_version:
                return False
            state = half.state_tensors()
            meta, replies = self._meta(half)
            version = half.version
        model = {k: v for k, v in state.items() if k.startswith("server.")}
        rest = {**{k: v for k, v in state.items() if not k.startswith("server.")}, **replies}
        with self._save_lock:
            if version <= half.saved_version:  # a newer snapshot was written meanwhile
                return False
            write_checkpoint(self.root / "halves" / half.fingerprint, model, meta, rest)
            half.saved_version = version
        return True

    @staticmethod
    def _meta(half: HostedHalf) -> tuple[dict, dict[str, torch.Tensor]]:
        clients, replies = [], {}
        for i, (cid, rec) in enumerate(sorted(half.clients.items())):
            entry = {"client_id": cid, "last_step": rec.last_step, "digest": rec.digest.hex(), "reply": None}
            if rec.reply:
                entry["reply"] = f"reply.{i}"
                replies[entry["reply"]] = torch.frombuffer(bytearray(rec.reply), dtype=torch.uint8)
            clients.append(entry)
        meta = {"kind": HALF_KIND, "config": half.cfg.to_dict(), "fingerprint": half.fingerprint,
                "num_classes": half.num_classes, "in_channels": half.in_channels,
                "cut_shape": list(half.geometry.cut_shape), "wire_shape": list(half.geometry.wire_shape),
                "budget": half.budget, "phase": _phase_dict(half.phase_req), "version": half.version,
                "clients": clients}
        return meta, replies

    def load_all(self, **options) -> list[HostedHalf]:
        root = self.root / "halves"
        if not root.is_dir():
            return []
        halves = []
        names = {p.name.removesuffix(".old") for p in root.iterdir() if p.is_dir() and not p.name.endswith(".tmp")}
        for name in sorted(n for n in names if _FP_RE.match(n)):
            folder = root / name
            if not (folder / "meta.json").exists() and (root / f"{name}.old" / "meta.json").exists():
                shutil.move(str(root / f"{name}.old"), str(folder))  # a save was cut between its two renames
            try:
                half = self._load(folder, **options)
            except (UserError, ProtocolError, KeyError, TypeError, ValueError) as exc:
                raise UserError(f"cannot resume the server half in {folder}: {exc}") from None
            halves.append(half)
            log.info("resumed server half %s from %s (version %d, %d clients)", half.fingerprint, folder,
                     half.version, len(half.clients))
        return halves

    @staticmethod
    def _load(folder: Path, **options) -> HostedHalf:
        meta = read_meta(folder)
        if meta.get("kind") != HALF_KIND:
            raise UserError(f"{folder} is not a server-half checkpoint")
        half = HostedHalf(stored_config(meta["config"]), int(meta["num_classes"]), int(meta["in_channels"]),
                          source=str(folder), initial=False, **options)
        state = read_tensors(meta["_folder"], "state.safetensors")
        tensors = {**read_tensors(meta["_folder"]), **state}
        half.load_state(tensors, _phase_req(meta.get("phase"), half.cfg, half.channels))
        for entry in meta.get("clients", []):
            reply = state.get(entry["reply"]) if entry.get("reply") else None
            half.clients[entry["client_id"]] = ClientRecord(
                int(entry["last_step"]), bytes.fromhex(entry.get("digest", "")),
                reply.numpy().tobytes() if reply is not None else b"")
        half.version = half.saved_version = int(meta.get("version", 1))
        return half

    # ---------------------------------------------------------------- server-side checkpoints
    def _client_folder(self, fingerprint: str, client_id: str) -> Path:
        # hashed: a client id may be "..", and the folder name must not depend on what the id holds
        return self.checkpoints / fingerprint / hashlib.sha256(client_id.encode()).hexdigest()[:32]

    def save_checkpoint(self, fingerprint: str, client_id: str, step_id: int, version: int, data: bytes,
                        phase: pb.PhaseRequest | None, keep: bool = False) -> SavedCheckpoint:
        """A state file (taken under the half's mutex by the caller) written where the server runs."""
        digest = hashlib.sha256(data).hexdigest()
        folder = self._client_folder(fingerprint, client_id)
        stem = f"{step_id}-{digest[:16]}"
        with self._write_lock:
            folder.mkdir(parents=True, exist_ok=True)
            keep = keep or self._read_meta(folder / f"{stem}.json").get("keep", False)  # saved twice: kept if once
            meta = {"client_id": client_id, "step_id": step_id, "version": version, "state_sha256": digest,
                    "state_bytes": len(data), "phase": _phase_dict(phase), "keep": keep, "saved_ns": time.time_ns()}
            _write_atomically(folder / f"{stem}.safetensors", data)
            _write_atomically(folder / f"{stem}.json", json.dumps(meta, indent=2).encode())
            self._prune(folder)
            self._prune_clients(folder.parent)
        return SavedCheckpoint(step_id, version, digest, len(data))

    @staticmethod
    def _read_meta(path: Path) -> dict:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return {}
        return meta if isinstance(meta, dict) else {}

    @classmethod
    def _saved(cls, folder: Path, pattern: str = "*.json") -> list[tuple[int, Path, dict]]:
        """(save time, path without suffix, meta) of the checkpoints in a client's folder, oldest first."""
        found = []
        for path in folder.glob(pattern):
            meta = cls._read_meta(path)
            found.append((int(meta.get("saved_ns", 0)), path.with_suffix(""), meta))
        return sorted(found, key=lambda item: item[0])

    @classmethod
    def _prune(cls, folder: Path) -> None:
        saved = cls._saved(folder)
        rotating = [stem for _, stem, meta in saved if not meta.get("keep")]
        kept = [stem for _, stem, meta in saved if meta.get("keep")]
        for old in rotating[:-KEEP_CHECKPOINTS] + kept[:-KEEP_MODELS]:
            for suffix in (".json", ".safetensors"):
                old.with_suffix(suffix).unlink(missing_ok=True)

    @staticmethod
    def _prune_clients(folder: Path) -> None:
        clients = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
        for old in clients[:-KEEP_CHECKPOINT_CLIENTS]:
            shutil.rmtree(old, ignore_errors=True)

    def has_checkpoint(self, fingerprint: str, client_id: str, step_id: int, sha256: str) -> bool:
        """Whether a checkpoint of that client at that step (with that digest) was saved (nothing is read)."""
        pattern = f"{step_id}-{sha256[:16]}.json" if sha256 else f"{step_id}-*.json"
        return any(self._client_folder(fingerprint, client_id).glob(pattern))

    def read_checkpoint(self, half: HostedHalf, client_id: str, step_id: int,
                        sha256: str) -> tuple[dict[str, torch.Tensor], pb.PhaseRequest | None, str] | None:
        """(state tensors, phase in force, digest) of the checkpoint saved at step_id, or None if there is
        none with that digest (an empty digest accepts the one saved at that step)."""
        folder = self._client_folder(half.fingerprint, client_id)
        pattern = f"{step_id}-{sha256[:16]}.json" if sha256 else f"{step_id}-*.json"
        saved = self._saved(folder, pattern)
        if not saved:
            return None
        _, stem, meta = saved[-1]  # the newest saved at that step (with that digest)
        try:
            data = stem.with_suffix(".safetensors").read_bytes()
        except OSError:
            return None
        digest = hashlib.sha256(data).hexdigest()
        if digest != meta.get("state_sha256") or (sha256 and sha256 != digest):
            return None
        tensors = state_from_bytes(data)
        return tensors, _phase_req(meta.get("phase"), half.cfg, half.channels), digest

