"""An exported device half: the manifest, one onnxruntime session per budget, the uplink message."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from splitprune.errors import UserError
from splitprune.inputs import normalise_images
from splitprune.manifest import INPUT_NAME, OUTPUT_NAME, onnx_session, read_manifest
from splitprune.proto import pb
from splitprune.wire.codec import check_dtype_name, encode_values
from splitprune.wire.entropy import check_tables, tables_digest


def manifest_tables(manifest: dict, channels: int) -> np.ndarray | None:
    """The frozen entropy tables a manifest ships (dtype ec), checked against their digest."""
    entry = manifest["codec"].get("ec_tables")
    if entry is None:
        return None
    try:
        tables = check_tables(np.asarray(entry["tables"], dtype=np.int64), channels)
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"the manifest's entropy tables are invalid: {exc}") from None
    if tables_digest(tables) != entry.get("digest"):
        raise UserError("the manifest's entropy tables do not match their digest")
    return tables


class DeviceModel:
    """The device half of one exported model, limited to `threads` CPU threads (1: a weak device)."""

    def __init__(self, folder: str | Path, threads: int = 1) -> None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        self.manifest = read_manifest(folder)
        self.folder, self.threads = Path(folder), threads
        self.channels = int(self.manifest["cut_shape"][0])
        self.dtype = check_dtype_name(self.manifest["codec"]["dtype_up"])
        self.tables = manifest_tables(self.manifest, self.channels)  # entropy tables (dtype ec), if exported
        self._sessions: dict[int, object] = {}

    @property
    def budgets(self) -> list[int]:
        return sorted(int(b) for b in self.manifest["budgets"])

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    def kept(self, budget: int) -> np.ndarray | None:
        """Indices of the channels that travel at `budget` (None: all of them)."""
        channels = self._entry(budget)["channels"]
        return None if channels is None else np.asarray(channels, dtype=np.int64)

    def _entry(self, budget: int) -> dict:
        entry = self.manifest["budgets"].get(str(budget))
        if entry is None:
            raise UserError(f"budget {budget} was not exported to {self.folder}; exported: "
                            f"{', '.join(map(str, self.budgets))} (export it with `splitprune export --budget`)")
        return entry

    def session(self, budget: int):
        if budget not in self._sessions:
            path = self.folder / self._entry(budget)["file"]
            try:
                sess = onnx_session(str(path), self.threads)
            except Exception as exc:  # onnxruntime raises its own exception types on a damaged file
                raise UserError(f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}") from None
            self._check_graph(sess, budget)
            self._sessions[budget] = sess
        return self._sessions[budget]

    def _check_graph(self, sess, budget: int) -> None:
        spec, wire = self.manifest["input"], self.manifest["wire_shape"]
        inputs, outputs = sess.get_inputs(), sess.get_outputs()
        want_in = [spec["in_channels"], spec["size"], spec["size"]]
        want_out = [budget, *wire[1:]]
        if ([i.name for i in inputs] != [INPUT_NAME] or [o.name for o in outputs] != [OUTPUT_NAME]
                or list(inputs[0].shape[1:]) != want_in or list(outputs[0].shape[1:]) != want_out):
            raise UserError(f"{self._entry(budget)['file']} takes {inputs[0].shape} and gives {outputs[0].shape}; "
                            f"its manifest says [N, {', '.join(map(str, want_in))}] -> "
                            f"[N, {', '.join(map(str, want_out))}]: the file belongs to another model")

    def prepare(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,C] -> the normalised float32 model input [N,C,S,S]."""
        spec = self.manifest["input"]
        return normalise_images(images, spec["size"], spec["in_channels"], spec["mean"], spec["std"])

    def run(self, x: np.ndarray, budget: int) -> np.ndarray:
        """The kept channels, gate-scaled, [N, budget, H', W'] float32: what the uplink encodes."""
        return self.session(budget).run(None, {INPUT_NAME: x})[0]

    def encode(self, kept: np.ndarray, budget: int, dtype: str | None = None) -> pb.EncodedTensor:
        """The uplink tensor, in the exported dtype or in `dtype` (`--budget auto` chooses it per request);
        an any-budget model's kept channels travel as a prefix length."""
        wire = self.dtype if dtype is None else check_dtype_name(dtype)
        return encode_values(kept, self.kept(budget), self.channels, wire,
                             bool(self.manifest["codec"].get("prefix", False)), self.tables)
