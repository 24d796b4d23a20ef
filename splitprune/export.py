"""Export the device half of a trained checkpoint as ONNX, one file per budget, plus a JSON manifest.

At a given budget B the device half is a fixed function: backbone layers up to the cut, the encoder
convolution restricted to the B kept channels, and the gate scaling of those channels as constants
(sigmoid(p_c) and, under "paper" scaling, mask_c). Its output is exactly what the uplink codec encodes
([N, B, H', W'], float32), so the device needs no gate logic, only the channel indices of the manifest.

Every file is checked before anything is written: onnxruntime runs it on real test images and its
output is compared with the PyTorch device half; beyond the tolerance the export is refused.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from splitprune.compression import channel_mask, keep_channels, select_top_b
from splitprune.errors import UserError
from splitprune.files import replace_folder
from splitprune.manifest import (INPUT_NAME, MANIFEST_FILE, MANIFEST_FORMAT, OUTPUT_NAME, TOLERANCE,
                                 check_export_folder, onnx_file, onnx_session)
from splitprune.training.device_worker import DeviceWorker
from splitprune.training.halves import DeviceHalf

OPSET = 18


class FoldedDeviceHalf(nn.Module):
    """The device half at one budget: only the kept encoder channels are computed, gates are constants."""

    def __init__(self, half: DeviceHalf, channels: torch.Tensor | None, scaling: str) -> None:
        super().__init__()
        enc = half.encoder
        idx = torch.arange(enc.conv.out_channels) if channels is None else channels
        conv = nn.Conv2d(enc.conv.in_channels, len(idx), enc.conv.kernel_size, enc.conv.stride, enc.conv.padding)
        conv.weight.data.copy_(enc.conv.weight.detach()[idx])
        conv.bias.data.copy_(enc.conv.bias.detach()[idx])
        bn = nn.BatchNorm2d(len(idx), eps=enc.bn.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).data.copy_(getattr(enc.bn, name).detach()[idx])
        self.layers, self.conv, self.bn = half.layers, conv, bn
        logits = half.gate_logits.detach().reshape(-1)
        self.register_buffer("gate", torch.sigmoid(logits)[idx].view(1, -1, 1, 1))
        mask = channel_mask(logits)[idx] if scaling == "paper" else None
        self.register_buffer("mask", None if mask is None else mask.view(1, -1, 1, 1))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # same operations in the same order as DeviceWorker: sigmoid(bn(conv)) * gate, then * mask
        kept = torch.sigmoid(self.bn(self.conv(self.layers(x)))) * self.gate
        return kept if self.mask is None else kept * self.mask


@dataclass
class ExportedBudget:
    budget: int
    channels: list[int] | None   # kept channel indices, ascending; None = all C
    onnx: bytes
    max_abs_diff: float
    identical_messages: int      # of the check images, encoded one per message, byte-identical to PyTorch's


def kept_indices(half: DeviceHalf, budget: int) -> torch.Tensor | None:
    """The channels a gated model keeps at `budget` (an any-budget model keeps 0..B-1: DeviceWorker.kept_channels)."""
    channels = half.gate_logits.numel()
    return None if budget >= channels else select_top_b(channel_mask(half.gate_logits), budget)


def to_onnx(module: nn.Module, example: torch.Tensor) -> bytes:
    """ONNX bytes with a dynamic batch dimension (torch's dynamo exporter; needs onnxscript)."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    if example.shape[0] < 2:  # torch.export specialises a dimension of size 1 (convnext's device part then fails)
        example = example.expand(2, *example.shape[1:]).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's progress lines and deprecation notices
        program = torch.onnx.export(module, (example,), dynamo=True, verbose=False, opset_version=OPSET,
                                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                    dynamic_shapes=({0: batch},))
    return program.model_proto.SerializeToString()


def export_budget(device: DeviceWorker, budget: int, dtype: int, images: torch.Tensor,
                  tolerance: float = TOLERANCE) -> ExportedBudget:
    """Export one budget and check it on `images` against the PyTorch device half (unfolded)."""
    from splitprune.wire.codec import encode_values

    half, scaling, prefix = device.half, device.scaling, device.selector.prefix
    half.eval()
    channels = device.kept_channels(budget)
    onnx_bytes = to_onnx(FoldedDeviceHalf(half, channels, scaling), images[:2])
    with torch.no_grad():
        reference = keep_channels(half(images), channels, channel_mask(half.gate_logits), scaling).numpy()
    got = onnx_session(onnx_bytes).run(None, {INPUT_NAME: images.numpy()})[0]
    if got.shape != reference.shape:
        raise UserError(f"budget {budget}: the ONNX device half gives shape {list(got.shape)}, "
                        f"PyTorch {list(reference.shape)}; nothing written")
    diff = float(np.abs(got - reference).max()) if got.size else 0.0
    if not diff <= tolerance:
        raise UserError(f"budget {budget}: the ONNX device half differs from PyTorch by up to {diff:.3g} on "
                        f"{len(images)} test images (tolerance {tolerance:g}); nothing written")
    num = half.gate_logits.numel()
    idx = None if channels is None else channels.numpy()
    tables = device.codec.tables
    same = sum(encode_values(got[i:i + 1], idx, num, dtype, prefix, tables).SerializeToString()
               == encode_values(reference[i:i + 1], idx, num, dtype, prefix, tables).SerializeToString()
               for i in range(len(images)))
    return ExportedBudget(budget, None if channels is None else channels.tolist(), onnx_bytes, diff, same)


def write_export(out: str | Path, manifest: dict, exported: list[ExportedBudget]) -> Path:
    """Write the ONNX files and the manifest aside, then swap the folder in: nothing half-written."""
    out = Path(out)
    check_export_folder(out)
    def fill(tmp: Path) -> None:
        for e in exported:
            (tmp / onnx_file(e.budget)).write_bytes(e.onnx)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))

    return replace_folder(out, fill)


def build_manifest(meta: dict, tensors: dict[str, torch.Tensor], input_spec: dict, exported: list[ExportedBudget],
                   check_images: int, tolerance: float, prefix: bool = False, dtype_up: str | None = None,
                   ec_tables: np.ndarray | None = None) -> dict:
    """`prefix`: the model sends its kept channels 0..B-1 as a prefix length (any-budget models); `dtype_up`:
    the device's uplink dtype (default: as trained); `ec_tables`: the entropy tables it codes with (ec*)."""
    from splitprune.compression.tables import table_entry

    from splitprune.training.checkpoint import weights_digest
    from splitprune.wire.envelopes import PROTOCOL_VERSION

    cfg = meta["config"]
    return {
        "format": MANIFEST_FORMAT,
        "protocol_version": PROTOCOL_VERSION,
        "fingerprint": meta["fingerprint"],
        "server_weights_sha256": weights_digest(tensors, "server."),  # = DescribeReply.weights_sha256
        "device_weights_sha256": weights_digest(tensors, "device."),
        "config": cfg,
        "model": cfg["model"], "split": cfg["split"], "dataset": cfg["dataset"],
        "num_classes": meta["num_classes"], "classes": input_spec.pop("classes"),
        "input": input_spec,
        "cut_shape": list(meta["cut_shape"]), "wire_shape": list(meta["wire_shape"]),
        "codec": {"dtype_up": dtype_up or cfg["dtype_up"], "resolution": cfg["resolution"], "scaling": cfg["scaling"],
                  **({"prefix": True} if prefix else {}),  # gated models' manifests as before
                  **({"ec_tables": table_entry(ec_tables)} if ec_tables is not None else {})},
        "trained_budget": meta["budget"],
        "onnx": {"input": INPUT_NAME, "output": OUTPUT_NAME, "opset": OPSET},
        "budgets": {str(e.budget): {"file": onnx_file(e.budget), "sha256": hashlib.sha256(e.onnx).hexdigest(),
                                    "channels": e.channels} for e in exported},
        "check": {"images": check_images, "tolerance": tolerance,
                  "max_abs_diff": {str(e.budget): e.max_abs_diff for e in exported},
                  "identical_messages": {str(e.budget): e.identical_messages for e in exported}},
        **({"budget_validation": meta["budget_validation"]} if "budget_validation" in meta else {}),
    }


def sample_inputs(cfg, in_channels: int, count: int | None) -> tuple[torch.Tensor, np.ndarray, dict]:
    """`count` real test images (None: all) as the model input, their labels, and the manifest's input spec."""
    from splitprune.data import CLASS_NAMES, DATASETS, load_dataset, subset
    from splitprune.data.transforms import BatchTransform, adapt_stats

    info = DATASETS[cfg.dataset]
    ds = subset(load_dataset(cfg.dataset, cfg.data_dir, train=False,
                             image_size=cfg.input_size if cfg.dataset == "folder" else None), count, cfg.seed)
    mean_set, std_set = cfg.normalisation()
    mean, std = adapt_stats(mean_set or info.mean, in_channels), adapt_stats(std_set or info.std, in_channels)
    images = BatchTransform(cfg.input_size, in_channels, mean, std, False)(torch.from_numpy(ds.images))
    spec = {"size": cfg.input_size, "in_channels": in_channels, "mean": list(mean), "std": list(std),
            "layout": "NCHW float32 = (uint8 / 255 - mean) / std, images centre-padded (up to 8 pixels smaller) or "
                      "resized (bilinear, antialiased) to size",
            "classes": ds.classes or CLASS_NAMES.get(cfg.dataset)}
    return images, ds.labels, spec


def load_workers(checkpoint: str, data_dir: str | None = None, dtype_up: str | None = None):
    """The PyTorch device and server workers of a trained checkpoint (eval mode), its config, meta and tensors."""
    from splitprune.training.setup import load_checkpoint

    loaded = load_checkpoint(checkpoint, data_dir=data_dir, dtype_up=dtype_up)
    return loaded.device, loaded.server, loaded.cfg, loaded.meta, loaded.tensors


def export_checkpoint(checkpoint: str, out: str, budgets: list[int] | None = None, data_dir: str | None = None,
                      check_images: int = 256, tolerance: float = TOLERANCE, dtype_up: str | None = None) -> dict:
    """Export the device half of `checkpoint` at `budgets` (default: the trained budget) into `out`, with the
    uplink dtype `dtype_up` (default: as trained)."""
    from splitprune.wire.codec import check_dtype_name

    if check_images < 1:
        raise UserError(f"--check-images must be at least 1, got {check_images}")
    if not tolerance >= 0:
        raise UserError(f"--tolerance must be 0 or more, got {tolerance}")
    check_export_folder(Path(out))  # before the work, not after
    device, _, cfg, meta, tensors = load_workers(checkpoint, data_dir, dtype_up)
    budgets = sorted(set(budgets or [int(meta["budget"])]))
    images, _, spec = sample_inputs(cfg, meta["in_channels"], check_images)
    dtype = check_dtype_name(cfg.dtype_up)
    exported = [export_budget(device, b, dtype, images, tolerance) for b in budgets]
    manifest = build_manifest(meta, tensors, spec, exported, len(images), tolerance, device.selector.prefix,
                              cfg.dtype_up, device.codec.tables)
    write_export(out, manifest, exported)
    return manifest
