"""The user's weights for a whole model: read without unpickling anything, checked against the model's own
tensors before anything is built, and loaded into one part at a time.

A `.safetensors` file, or a `.pth`/`.pt`/`.bin` state_dict read with `torch.load(weights_only=True)` (a bare
state_dict, or one under "state_dict" / "model" / "model_state_dict" as training scripts save it; the "module."
prefix of DataParallel is dropped). The head (the Linear the output comes from) may not fit the data's class count:
it then starts fresh, and says so; any other missing, unexpected or misshapen tensor is refused, naming the first
few.
"""
from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from splitprune.errors import UserError

SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
NESTED = ("state_dict", "model", "model_state_dict", "module")
_OPTIONAL = ("num_batches_tracked",)  # a BatchNorm counter some exports leave out; nothing computes with it


@dataclass(frozen=True)
class Weights:
    tensors: dict[str, torch.Tensor]
    fresh: tuple[str, ...]   # the model's keys the file does not fill (a replaced head): they keep their init
    note: str | None         # what is said about them


def file_digest(path: str | Path) -> str:
    """SHA-256 of a weights file; UserError if it cannot be read."""
    path = Path(path)
    _check_file(path)
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError as exc:
        raise UserError(f"--weights {path} cannot be read: {exc.strerror or exc}") from None
    return digest.hexdigest()


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    if path.suffix not in SUFFIXES:
        raise UserError(f"--weights {path}: expected a {', '.join(SUFFIXES)} file (a state_dict)")


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in `path`, every value a tensor; nothing in it is unpickled."""
    path = Path(path)
    _check_file(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"--weights {path} cannot be read as a state_dict (only tensors, no pickled objects): "
                        f"{first[:300]}") from None
    if isinstance(state, dict):
        for key in NESTED:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise UserError(f"--weights {path} holds no state_dict (a mapping of tensor names to tensors)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"--weights {path}: {len(bad)} entries are not tensors (e.g. {str(bad[0])[:60]!r}); "
                        "save model.state_dict()")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def match(state: dict[str, torch.Tensor], model: nn.Module, head: str | None, path: str) -> Weights:
    """`state` checked against `model`'s tensors (a skeleton is enough: only names and shapes are compared)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    head_keys = {k for k in expected if head is not None and k.startswith(head + ".")}
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    wrong_head = [k for k in wrong if k in head_keys]
    wrong = [k for k in wrong if k not in head_keys]
    missing = [k for k in expected if k not in state and k not in head_keys and not k.endswith(_OPTIONAL)]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if wrong:
        problems.append("shapes differ: " + ", ".join(
            f"{k} {list(state[k].shape)} in the file, {list(expected[k])} in the model" for k in wrong[:3]))
    if missing:
        problems.append(f"{len(missing)} tensors missing: " + ", ".join(missing[:4]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors: " + ", ".join(unexpected[:4]))
    if problems:
        raise UserError(f"--weights {path} do not fit the model: " + "; ".join(problems))
    fresh = tuple(sorted({k for k in head_keys if k not in state or k in wrong_head}))
    note = None
    if fresh:
        key = next((k for k in wrong_head if k.endswith("weight")), None)
        was = f" ({state[key].shape[0]} outputs in the file)" if key else ""
        note = (f"--weights: the head {head}{was} does not fit the data's {expected[fresh[0]][0]} classes: it starts "
                "from fresh random weights")
    kept = {k: v for k, v in state.items() if k not in fresh}
    return Weights(kept, fresh, note)


def load_part(part: nn.Module, weights: Weights) -> None:
    """Copy the file's tensors into `part` (whose keys are the whole model's); the fresh ones keep their init."""
    own = part.state_dict()
    subset = {k: v for k, v in weights.tensors.items() if k in own}
    absent = [k for k in own if k not in subset and k not in weights.fresh and not k.endswith(_OPTIONAL)]
    if absent:
        raise UserError(f"--weights lack {len(absent)} tensors of this part (e.g. {absent[0]})")
    with torch.no_grad():
        for key, value in subset.items():
            own[key].copy_(value.to(own[key].dtype))
