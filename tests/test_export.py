"""`splitprune export`: the ONNX device half equals PyTorch's, the manifest is complete, bad input is refused."""
import json

import numpy as np
import pytest
import torch

from splitprune.cli import main
from splitprune.compression import ChannelCodec
from splitprune.compression.tables import read_tables
from splitprune.errors import UserError
from splitprune.export import FoldedDeviceHalf, export_checkpoint, kept_indices, load_workers, sample_inputs
from splitprune.manifest import INPUT_NAME, onnx_session, read_manifest
from splitprune.training.checkpoint import read_meta, read_tensors, weights_digest
from splitprune.wire.codec import WIRE_DTYPES, encode_values


def device_worker(run):
    device, _, cfg, meta, _ = load_workers(str(run))
    return device, cfg, meta


def test_onnx_device_half_matches_pytorch_and_the_manifest_is_complete(exported):
    run, out = exported
    m = read_manifest(out)
    meta = read_meta(run)
    assert m["fingerprint"] == meta["fingerprint"] and m["protocol_version"] == 1
    assert m["server_weights_sha256"] == weights_digest(read_tensors(meta["_folder"]))
    assert m["input"] == {**m["input"], "size": 32, "in_channels": 1, "mean": [0.286], "std": [0.353]}
    assert m["wire_shape"] == meta["wire_shape"] and m["codec"]["dtype_up"] == "fp16"
    assert sorted(m["budgets"]) == ["1", "2"] and m["trained_budget"] == 2
    device, cfg, _ = device_worker(run)
    x, _, _ = sample_inputs(cfg, 1, 64)  # more images than the export checked
    for budget in (1, 2):
        channels = kept_indices(device.half, budget)
        assert m["budgets"][str(budget)]["channels"] == channels.tolist()
        with torch.no_grad():
            z = device.half(x)
            reference, message = device._encode(z, channels)
            # the folding itself is exact: same operations, same order
            assert torch.equal(FoldedDeviceHalf(device.half, channels, cfg.scaling)(x), reference)
        got = onnx_session(str(out / m["budgets"][str(budget)]["file"])).run(None, {INPUT_NAME: x.numpy()})[0]
        assert got.shape == (64, budget, 4, 4)
        assert np.abs(got - reference.numpy()).max() <= m["check"]["tolerance"]
        assert m["check"]["max_abs_diff"][str(budget)] <= m["check"]["tolerance"]


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES))
def test_numpy_codec_is_byte_identical_to_the_pytorch_device_at_every_budget(exported, dtype):
    """What the device package sends (numpy, indices from the manifest) == what DeviceWorker sends."""
    run, _ = exported
    device, cfg, _ = device_worker(run)
    meta = read_meta(run)
    device.codec = ChannelCodec(dtype, read_tables(meta, meta["wire_shape"][0]))  # ec*: the model's tables
    tables = device.codec.tables
    x, _, _ = sample_inputs(cfg, 1, 8)
    with torch.no_grad():
        z = device.half(x)
        channels = device.channels
        for budget in range(1, channels + 1):
            torch_channels = kept_indices(device.half, budget)
            kept, message = device._encode(z, torch_channels)
            indices = None if torch_channels is None else np.asarray(torch_channels.tolist())
            for batch in (kept[:1], kept):  # one sample, and a batch
                ours = encode_values(batch.numpy(), indices, channels, WIRE_DTYPES[dtype], False, tables)
                assert ours.SerializeToString() == device.codec.compress(batch, torch_channels,
                                                                         channels).SerializeToString()
            assert encode_values(kept.numpy(), indices, channels, WIRE_DTYPES[dtype], False, tables) == message
            if budget in (1, 7, channels):  # the exported function gives the very values that are encoded
                assert torch.equal(FoldedDeviceHalf(device.half, torch_channels, cfg.scaling)(x), kept)


def test_refused_export_writes_nothing_and_says_by_how_much(exported, tmp_path):
    run, out = exported
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match=r"differs from PyTorch by up to [0-9.e-]+ .*tolerance 1e-12\); nothing written"):
        export_checkpoint(str(run), str(out), [1], check_images=8, tolerance=1e-12)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier export is untouched
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError):
        export_checkpoint(str(run), str(fresh), [1], check_images=8, tolerance=1e-12)
    assert not fresh.exists() and not (tmp_path / "fresh.tmp").exists()


def test_export_cli_refuses_bad_input(exported, tmp_path, capsys):
    run, _ = exported
    cases = [
        (["--budget", "3"], "trained for budget 2"),
        (["--budget", "1,,2"], "separated by commas"),
        (["--check-images", "0"], "at least 1"),
        (["--tolerance", "-1"], "0 or more"),
    ]
    for extra, message in cases:
        assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "e"), *extra]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "busy"), "--check-images", "4"]) == 2
    assert "not an export folder" in capsys.readouterr().err
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "e")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_manifest_reader_refuses_a_manifest_that_does_not_fit_its_files(exported, tmp_path):
    _, out = exported
    bad = tmp_path / "bad"
    bad.mkdir()
    m = json.loads((out / "manifest.json").read_text())
    for name in ("device_b1.onnx", "device_b2.onnx"):
        (bad / name).write_bytes((out / name).read_bytes())
    (bad / "device_b1.onnx").write_bytes((out / "device_b2.onnx").read_bytes())  # another budget's file
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="not the file this manifest was exported with"):
        read_manifest(bad)
    for change, message in [({"format": "x"}, "not a splitprune device-model manifest"),
                            ({"budgets": {"1": {**m["budgets"]["1"], "channels": [5, 3]}}}, "ascending"),
                            ({"input": {**m["input"], "std": [0.0]}}, "std"),
                            ({"cut_shape": [512, 4]}, "cut_shape")]:
        (bad / "manifest.json").write_text(json.dumps({**m, **change}))
        with pytest.raises(UserError, match=message):
            read_manifest(bad, verify_files=False)


def test_export_at_resolution_factor_2_and_int4(tmp_path):
    """The folded encoder keeps the strided geometry: a 512x3x3 wire tensor, int4 (odd value count) uplink."""
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--method", "ca", "--budget", "3", "--resolution", "2", "--dtype-up", "int4", "--epochs",
                 "1", "--train-subset", "16", "--test-subset", "16", "--threads", "1", "--quiet",
                 "--out", str(run)]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--check-images", "16"]) == 0
    m = read_manifest(out)
    assert m["wire_shape"] == [512, 3, 3] and m["codec"] == {"dtype_up": "int4", "resolution": 2, "scaling": "paper"}
    for dtype, levels in (("ec", 15), ("ec3", 3)):  # the tables counted at the end of training, for the dtype
        assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / dtype), "--check-images", "16",
                     "--dtype-up", dtype]) == 0
        ec = read_manifest(tmp_path / dtype)
        assert ec["codec"]["dtype_up"] == dtype and ec["check"]["identical_messages"]["3"] == 16
        assert ec["codec"]["ec_tables"]["levels"] == levels and len(ec["codec"]["ec_tables"]["tables"]) == 512
    device, cfg, _ = device_worker(run)
    x, _, _ = sample_inputs(cfg, 1, 16)
    channels = kept_indices(device.half, 3)
    with torch.no_grad():
        kept, message = device._encode(device.half(x), channels)
    got = onnx_session(str(out / "device_b3.onnx")).run(None, {INPUT_NAME: x.numpy()})[0]
    assert got.shape == (16, 3, 3, 3) and np.abs(got - kept.numpy()).max() <= m["check"]["tolerance"]
    assert encode_values(kept.numpy(), np.asarray(m["budgets"]["3"]["channels"]), 512, WIRE_DTYPES["int4"]) == message
