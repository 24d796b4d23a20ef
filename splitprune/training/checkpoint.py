"""Checkpoints: safetensors for tensors, JSON for everything else; nothing is unpickled.

A checkpoint folder holds model.safetensors (device.* and server.* weights), meta.json (config, cut
geometry, classes, budget) and, for resumable runs, state.safetensors + progress inside meta.json
(optimizer buffers, random states, finished epochs). Folders are written aside and swapped in atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file
from safetensors.torch import save as st_save

from splitprune.errors import ProtocolError, UserError
from splitprune.files import replace_folder

MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.safetensors", "meta.json"
FORMAT = "splitprune-checkpoint/1"
LAYOUT = 2  # how the parts' tensors are named: 2: by the whole model's module paths (splitprune.models.graph)


def module_tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}


def load_module(prefix: str, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    start = prefix + "."
    own = {k[len(start):]: v for k, v in tensors.items() if k.startswith(start)}
    missing = set(module.state_dict()) - set(own)
    if missing:
        raise UserError(f"checkpoint lacks {len(missing)} {prefix} tensors (e.g. {sorted(missing)[0]}): "
                        "it was made for another model, split or resolution")
    try:
        module.load_state_dict(own)
    except RuntimeError as exc:
        raise UserError(f"checkpoint does not fit this model: {str(exc).splitlines()[0]}") from None


def optimizer_tensors(prefix: str, optimizer: torch.optim.Optimizer, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in module.named_parameters()}
    out = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                out[f"{prefix}.{names[id(p)]}"] = buf.detach().cpu().clone()
    return out


def load_optimizer(prefix: str, optimizer: torch.optim.Optimizer, module: torch.nn.Module,
                   tensors: dict[str, torch.Tensor]) -> None:
    params = dict(module.named_parameters())
    start = prefix + "."
    for key, value in tensors.items():
        if key.startswith(start) and key[len(start):] in params:
            param = params[key[len(start):]]
            optimizer.state[param]["momentum_buffer"] = value.to(param.device).clone()


def write_checkpoint(folder: str | Path, model: dict[str, torch.Tensor], meta: dict,
                     state: dict[str, torch.Tensor] | None = None) -> Path:
    def fill(tmp: Path) -> None:
        save_file(model, str(tmp / MODEL_FILE))
        if state is not None:
            save_file(state, str(tmp / STATE_FILE))
        sealed = {"format": FORMAT, "layout": LAYOUT, **meta, SEAL_KEY: seal(tmp / MODEL_FILE, meta)}
        (tmp / META_FILE).write_text(json.dumps(sealed, indent=2))

    return replace_folder(folder, fill)


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    if (folder / "checkpoint" / META_FILE).exists():  # a run directory was given
        folder = folder / "checkpoint"
    meta_path = folder / META_FILE
    if not meta_path.exists():
        raise UserError(f"no checkpoint at {folder}: expected {META_FILE} and {MODEL_FILE} there")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"checkpoint metadata {meta_path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{meta_path} is not a splitprune checkpoint (format {FORMAT})")
    meta["_folder"] = str(folder)
    check_seal(meta)
    return meta


def read_tensors(folder: str | Path, name: str = MODEL_FILE) -> dict[str, torch.Tensor]:
    path = Path(folder) / name
    if not path.exists():
        raise UserError(f"checkpoint file {path} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"checkpoint file {path} is damaged: {exc}") from None
    try:
        meta = json.loads((Path(folder) / META_FILE).read_text())
    except (OSError, ValueError):
        return tensors
    return upgrade_layout(tensors, meta) if isinstance(meta, dict) else tensors


def upgrade_layout(tensors: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint written before LAYOUT 2, named as today. Then a VGG server half numbered its
    layers from the cut (its features.0 was the model's features.N); today both parts keep the model's names."""
    config = meta.get("config") or {}
    if meta.get("layout", 1) >= LAYOUT or config.get("model") not in ("vgg11_bn", "vgg11_bn_compact"):
        return tensors
    from splitprune.models.vgg import CUTS

    if config.get("split") not in CUTS:
        return tensors
    offset = int(CUTS[config["split"]][0].rsplit(".", 1)[1]) + 1
    out = {}
    for key, value in tensors.items():
        for prefix in ("server.layers.features.", "opt.server.layers.features."):
            if key.startswith(prefix):
                index, _, rest = key[len(prefix):].partition(".")
                key = f"{prefix}{int(index) + offset}.{rest}"
                break
        out[key] = value
    return out


# ---------------------------------------------------------------- seal: meta.json bound to the weights it describes
SEAL_KEY = "seal"
SEALED_META = ("budget", "num_classes", "in_channels", "cut_shape", "wire_shape")


def seal(model_file: Path, meta: dict) -> str:
    """sha256 of the weights file together with what meta.json says about them: budget, shapes and the
    training configuration (not where the data lives). An edited budget no longer matches."""
    from splitprune.config import model_fields

    digest = hashlib.sha256()
    with open(model_file, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    described = {key: meta.get(key) for key in SEALED_META}
    described["config"] = model_fields(meta.get("config") or {})
    digest.update(json.dumps(described, sort_keys=True).encode())
    return digest.hexdigest()


def check_seal(meta: dict) -> None:
    """Refuse a checkpoint whose meta.json was edited (or whose weights were swapped) since it was saved.
    Checkpoints saved before seals existed carry none and are read as they are."""
    if SEAL_KEY not in meta:
        return
    model_file = Path(meta["_folder"]) / MODEL_FILE
    try:
        matches = seal(model_file, meta) == meta[SEAL_KEY]
    except OSError as exc:
        raise UserError(f"checkpoint file {model_file} cannot be read: {exc.strerror or exc}") from None
    if not matches:
        raise UserError(f"checkpoint {meta['_folder']}: {META_FILE} does not describe {MODEL_FILE} (edited after "
                        "saving, or files from two checkpoints); its budget and settings cannot be trusted")


def check_run_folder(cfg, out: str | Path) -> None:
    """A run folder `splitprune train` may use for `cfg`: new (and then --seeding is today's), or holding a run of
    the same configuration to resume; else one message saying what to do."""
    from dataclasses import replace

    from splitprune.config import SEEDING, stored_config

    if not (Path(out) / "checkpoint" / META_FILE).exists():
        if cfg.seeding != SEEDING:
            raise UserError(f"--seeding {cfg.seeding} is kept to resume and load runs made with it; a new run draws "
                            f"its weights with --seeding {SEEDING}")
        return
    meta = read_meta(Path(out) / "checkpoint")
    if meta.get("fingerprint") == cfg.fingerprint():
        return
    saved = stored_config(meta.get("config") or {})
    if replace(saved, seeding=cfg.seeding).fingerprint() == cfg.fingerprint():
        raise UserError(f"{out} holds a run whose weights were drawn with --seeding {saved.seeding}: resume it with "
                        f"--seeding {saved.seeding}")
    from splitprune.config import model_fields

    theirs, ours = model_fields(saved.to_dict()), model_fields(cfg.to_dict())
    differ = [k for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    what = ", ".join(f"{k} {_short(theirs.get(k))} there, {_short(ours.get(k))} here" for k in differ[:3])
    raise UserError(f"{out} holds a run with another configuration ({what}); pass another --out or remove that "
                    "folder to start afresh")


def _short(value) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 24 else text[:16] + "..."


def check_start_budget(checkpoint: str | Path, budget: int) -> None:
    """A run starting from `checkpoint` (prune) may keep at most the channels that model was trained to send."""
    trained = int(read_meta(checkpoint)["budget"])
    if budget > trained:
        raise UserError(f"checkpoint {checkpoint} was trained for budget {trained}: a first phase at budget {budget} "
                        f"would send channels it never learned to use; start at {trained} or fewer")


def parse_budget(text: str | None, trained: int, channels: int) -> int:
    if text is None:
        return trained
    if text == "all":
        budget = channels
    else:
        try:
            budget = int(text)
        except ValueError:
            raise UserError(f"--budget must be an integer or 'all', got {text!r}") from None
    if budget < 1 or budget > trained:
        raise UserError(f"--budget {text}: this model was trained for budget {trained}; "
                        f"evaluate it at 1..{trained} channels")
    return budget


# ---------------------------------------------------------------- state as bytes (transfers, digests)
def weights_digest(tensors: dict[str, torch.Tensor], prefix: str = "server.") -> str:
    """sha256 over the `prefix` tensors sorted by name: name NUL dtype NUL shape NUL raw-bytes, each."""
    h = hashlib.sha256()
    for name in sorted(k for k in tensors if k.startswith(prefix)):
        t = tensors[name].detach().contiguous().cpu()
        h.update(name.encode() + b"\0" + str(t.dtype).removeprefix("torch.").encode() + b"\0"
                 + ",".join(str(d) for d in t.shape).encode() + b"\0")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------- state transfer
def state_to_bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    return st_save({k: v.detach().contiguous().cpu() for k, v in tensors.items()})


def state_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    try:
        return st_load(bytes(data))
    except Exception as exc:  # safetensors raises SafetensorsError and others on garbage
        raise ProtocolError(f"state is not a valid safetensors file: {exc}") from None

