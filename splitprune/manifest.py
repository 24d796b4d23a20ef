"""An exported device half (`splitprune export`) without torch: its manifest, and how its ONNX files are run.

An export folder holds `manifest.json` and one ONNX file per budget. `splitprune.export` writes it;
the device package `splitprune-device` reads it with `read_manifest`, which refuses anything
inconsistent with one clear message (a UserError) before a model is loaded. Both run the ONNX files
through `onnx_session`.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from splitprune.errors import UserError
from splitprune.files import check_out_folder

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "splitprune-device-model/1"
INPUT_NAME, OUTPUT_NAME = "images", "kept"  # the ONNX graph's input and output
MAX_MANIFEST_BYTES = 8 << 20  # room for the largest entropy tables (wire.entropy.MAX_ENTRIES, a line each)
TOLERANCE = 1e-5  # largest |onnx - torch| accepted on the encoder output at export (values in [0, 1])
_REQUIRED = ("protocol_version", "fingerprint", "server_weights_sha256", "num_classes", "input", "cut_shape",
             "wire_shape", "codec", "budgets")


def onnx_file(budget: int) -> str:
    return f"device_b{budget}.onnx"


def check_export_folder(out: Path) -> None:
    """An export's --out: writable, and new, empty or holding an earlier export (it is replaced whole)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST_FILE).exists())):
        raise UserError(f"--out {out} exists and is not an export folder: choose a new or empty folder")
    check_out_folder(out)
    check_out_folder(out.parent)  # the new folder is written next to it, then swapped in


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _positive_ints(value, count: int, what: str) -> list[int]:
    if not (isinstance(value, list) and len(value) == count
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise UserError(f"manifest: {what} must be {count} positive integers, got {value!r}")
    return value


def check_budget_entry(budget: str, entry, channels: int) -> None:
    if not budget.isdigit() or not 1 <= int(budget) <= channels:
        raise UserError(f"manifest: budget {budget!r} is not in 1..{channels}")
    if not isinstance(entry, dict) or entry.get("file") != onnx_file(int(budget)):
        raise UserError(f"manifest: budget {budget} must name the file {onnx_file(int(budget))}")
    kept = entry.get("channels")
    if kept is None:
        if int(budget) != channels:
            raise UserError(f"manifest: budget {budget} of {channels} channels lists no channel indices")
        return
    if not (isinstance(kept, list) and len(kept) == int(budget) and all(type(c) is int for c in kept)
            and all(0 <= a < b for a, b in zip(kept, kept[1:] + [channels]))):
        raise UserError(f"manifest: budget {budget} needs {budget} ascending channel indices below {channels}")


def read_manifest(folder: str | Path, verify_files: bool = True) -> dict:
    """The validated manifest of an export folder; with `verify_files`, every ONNX file's SHA-256 is checked
    (a file from another export is refused)."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"no exported model at {folder}: {MANIFEST_FILE} is missing (make one with `splitprune export`)")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes: not a manifest")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a splitprune device-model manifest (format {MANIFEST_FORMAT})")
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}")
    channels = _positive_ints(manifest["cut_shape"], 3, "cut_shape")[0]
    _positive_ints(manifest["wire_shape"], 3, "wire_shape")
    spec = manifest["input"]
    if not isinstance(spec, dict) or spec.get("in_channels") not in (1, 3):
        raise UserError(f"{path}: input.in_channels must be 1 or 3")
    _positive_ints([spec.get("size")], 1, "input.size")
    for key in ("mean", "std"):
        values = spec.get(key)
        if not (isinstance(values, list) and len(values) == spec["in_channels"]
                and all(isinstance(v, (int, float)) for v in values)) or (key == "std" and min(values) <= 0):
            raise UserError(f"{path}: input.{key} must be {spec['in_channels']} numbers (std > 0)")
    if not isinstance(manifest["budgets"], dict) or not manifest["budgets"]:
        raise UserError(f"{path} lists no exported budgets")
    for budget, entry in manifest["budgets"].items():
        check_budget_entry(budget, entry, channels)
        onnx = folder / entry["file"]
        if verify_files and (not onnx.is_file() or file_sha256(onnx) != entry.get("sha256")):
            raise UserError(f"{onnx} is missing or is not the file this manifest was exported with (another "
                            "model's or export's file?): export again into an empty folder")
    manifest["_folder"] = str(folder)
    return manifest


def onnx_session(model: bytes | str, threads: int = 1):
    """An onnxruntime CPU session on `threads` threads, run sequentially (threads=1: the weak-device setting)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
