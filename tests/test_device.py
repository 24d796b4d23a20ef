"""splitprune-device: the PyTorch-free device package against a real `splitprune serve` on loopback."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from splitprune.bench.core.processes import ServeSubprocess, free_port
from splitprune.cli import main
from splitprune.compression import ChannelCodec
from splitprune.export import kept_indices, load_workers, sample_inputs
from splitprune.training.checkpoint import read_meta, write_checkpoint
from splitprune.training.server_worker import LocalLink
from splitprune.wire.codec import WIRE_DTYPES

DEVICE_DIR = Path(__file__).resolve().parent.parent / "device"
sys.path.insert(0, str(DEVICE_DIR))  # the device package, as its wheel would install it

from splitprune_device.cli import main as device_main  # noqa: E402
from splitprune_device.model import DeviceModel  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def server(exported, tmp_path_factory):
    run, _ = exported
    proc = ServeSubprocess(free_port(), "--model", str(run),
                         log_path=tmp_path_factory.mktemp("serve") / "serve.log").start()
    yield proc
    proc.stop()


def workers(run):
    """The PyTorch device and server halves of the run, in this process."""
    device, server, cfg, _, _ = load_workers(str(run))
    return device, server, cfg


def batch_file(tmp_path, count: int = 8) -> tuple[Path, np.ndarray]:
    from splitprune.data import load_dataset

    test = load_dataset("fashion-mnist", None, train=False)
    path = tmp_path / "batch.npz"
    np.savez(path, images=test.images[:count, :, :, 0], labels=test.labels[:count])
    return path, test.images[:count]


def test_device_model_sends_what_the_pytorch_device_sends(exported):
    run, out = exported
    device, _, cfg = workers(run)
    model = DeviceModel(out)
    x, _, _ = sample_inputs(cfg, 1, 4)
    with torch.no_grad():
        z = device.half.eval()(x)
        for budget in model.budgets:
            for dtype in ("fp32", "fp16", "int8", "int4", model.manifest["codec"]["dtype_up"]):
                device.codec, model.dtype = ChannelCodec(dtype, model.tables), WIRE_DTYPES[dtype]
                kept, message = device._encode(z, kept_indices(device.half, budget))
                assert model.encode(kept.numpy(), budget).SerializeToString() == message.SerializeToString()


def test_device_cli_predicts_like_pytorch_and_reports_stages(exported, server, tmp_path, capsys):
    run, out = exported
    path, images = batch_file(tmp_path)
    report = tmp_path / "report.json"
    rc = device_main(["infer", "--server", server.address, "--model", str(out), "--budget", "1", "--out", str(report),
                      "--no-stream", str(path)])   # unary: the payload counted per Infer call
    text = capsys.readouterr().out
    assert rc == 0, text
    r = json.loads(report.read_text())
    assert r["images"] == r["requests"] == 8 and r["budgets"] == [1] and r["threads"] == 1
    assert set(r["latency_ms"]) == {"preprocess", "device", "encode", "round_trip", "server", "total"}
    assert all(r["latency_ms"][s]["p50"] > 0 for s in r["latency_ms"])
    assert r["latency_ms"]["round_trip"]["p50"] < r["latency_ms"]["total"]["p50"]
    assert "device compute (onnx)" in text and "accuracy" in text
    # the PyTorch device half through the same server half (in-process) predicts the same, for the same bytes
    device, server_worker, _ = workers(run)
    link, up = LocalLink(server_worker), 0
    for i in range(8):
        x = torch.from_numpy(DeviceModel(out).prepare(images[i:i + 1]))
        predicted, sent, _ = device.predict(x, link, 1)
        assert int(predicted[0]) == r["predictions"][i]
        up += sent
    assert r["payload_bytes_up"] == up


def test_device_auto_budget_streams_with_the_shared_controller(exported, server, tmp_path, capsys):
    """--budget auto: splitprune.adaptive's loop and controller, the exported budgets x uplink dtypes."""
    _, out = exported
    path, _ = batch_file(tmp_path, 6)
    log, report = tmp_path / "log.json", tmp_path / "auto.json"
    rc = device_main(["infer", "--server", server.address, "--model", str(out), "--budget", "auto", "--latency-ms",
                      "5000", "--every", "0", "--log", str(log), "--out", str(report), "--no-stream", str(path)])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc, summary = json.loads(log.read_text()), json.loads(report.read_text())
    options = {(o["budget"], o["dtype"]): o for o in doc["options"]}
    assert {b for b, _ in options} == {1, 2} and {d for _, d in options} == {"fp16", "int8"}
    rows = doc["rows"]
    assert len(rows) == summary["requests"] == 6 and summary["share_within_target"] == 1.0
    assert rows[0]["budget"] == 1 and rows[-1]["budget"] == 2          # starts small, climbs on a fast link
    for r in rows:   # each option was sized by encoding exactly as the request was
        assert r["bytes_up"] == options[(r["budget"], r["dtype"])]["bytes_up"]
    assert 0 <= summary["accuracy"] <= 1 and "6 requests" in text


@pytest.mark.parametrize("more", [["--no-stream"], []], ids=["unary", "stream"])
def test_device_auto_budget_hedges_through_the_shared_loop(exported, server, tmp_path, capsys, more):
    """--hedge on a fast link: every request above the smallest option sends a hedge first; the main answers
    in time, so no hedge answer is used, and its bytes are counted apart."""
    _, out = exported
    path, _ = batch_file(tmp_path, 6)
    log, report = tmp_path / "log.json", tmp_path / "auto.json"
    rc = device_main(["infer", "--server", server.address, "--model", str(out), "--budget", "auto", "--latency-ms",
                      "5000", "--every", "0", "--hedge", *more, "--log", str(log), "--out", str(report), str(path)])
    text = capsys.readouterr().out
    assert rc == 0, text
    doc, summary = json.loads(log.read_text()), json.loads(report.read_text())
    rows, smallest = doc["rows"], (doc["options"][0]["budget"], doc["options"][0]["dtype"])
    hedged = [r for r in rows if (r["budget"], r["dtype"]) != smallest]
    assert hedged and summary["hedges"] == len(hedged) and summary["hedged_answers"] == 0
    assert all(r["hedge_bytes_up"] > 0 and r["hedge_bytes_down"] >= 0 and r["bytes_down"] > 0 for r in hedged)
    assert summary["hedge_bytes_up"] == sum(r["hedge_bytes_up"] for r in rows) and summary["share_within_target"] == 1
    assert all(r["correct"] in (0, 1) for r in rows) and "hedges: " in text


def test_device_cli_refuses_bad_input_with_one_clear_message(exported, server, tmp_path, capsys):
    run, out = exported
    path, _ = batch_file(tmp_path, 2)

    def refused(args, message):
        assert device_main(["infer", "--server", server.address, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err

    colour = tmp_path / "colour.npy"  # any size is resized (tests/test_your_model.py); a channel count is not
    np.save(colour, np.zeros((1, 40, 40, 4), np.uint8))
    refused(["--model", str(out), str(colour)], "expected images [N,H,W] or [N,H,W,C] (C = 1 or 3)")
    refused(["--model", str(out), "--budget", "2", "--batch-size", "0", str(path)], "at least 1")
    refused(["--model", str(out), "--budget", "3", str(path)], "budget 3 was not exported")
    refused(["--model", str(out), "--budget", "auto", str(path)], "--budget auto needs")
    refused(["--model", str(tmp_path), str(path)], "manifest.json is missing")
    # a manifest that is not the one these files were exported with (another model's, or mixed up)
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(out / "device_b2.onnx", mixed / "device_b1.onnx")
    refused(["--model", str(mixed), str(path)], "is not the file this manifest was exported with")
    # a model the server does not host
    other = tmp_path / "other"
    shutil.copytree(out, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "0123456789abcdef"}))
    refused(["--model", str(other), str(path)], "UNKNOWN_MODEL")


def test_device_refuses_a_server_whose_half_differs_from_the_export(exported, tmp_path, capsys):
    run, out = exported
    changed = tmp_path / "changed" / "checkpoint"
    meta = read_meta(run)
    tensors = load_file(str(Path(meta["_folder"]) / "model.safetensors"))
    name = sorted(k for k in tensors if k.startswith("server.") and tensors[k].is_floating_point())[0]
    tensors[name] = tensors[name] + 0.01  # same config and fingerprint, other weights: "trained further"
    write_checkpoint(changed, tensors, {k: v for k, v in meta.items() if k not in ("_folder", "format", "seal")})
    proc = ServeSubprocess(free_port(), "--model", str(changed.parent)).start()
    try:
        path, _ = batch_file(tmp_path, 1)
        assert device_main(["infer", "--server", proc.address, "--model", str(out), str(path)]) == 2
        assert "is not the one this device half was exported with" in capsys.readouterr().err
    finally:
        proc.stop()
    assert device_main(["infer", "--server", proc.address, "--model", str(out), "--connect-timeout", "1",
                        str(path)]) == 2
    assert "cannot reach the server" in capsys.readouterr().err


def test_device_package_installs_without_torch_and_infers(exported, server, tmp_path):
    """A fresh virtualenv with only the device wheel (dependencies from the package registry): no torch in it,
    and one inference end to end against the real server."""
    _, out = exported
    wheels, venv = tmp_path / "wheels", tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(DEVICE_DIR)], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                              *map(str, wheels.glob("*.whl"))], capture_output=True, text=True)
    if install.returncode and "onnxruntime" in install.stderr and "No matching distribution" in install.stderr:
        pytest.skip(f"onnxruntime has no wheel for this platform/Python: {install.stderr.strip().splitlines()[-1]}")
    assert install.returncode == 0, install.stderr
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode != 0
    path, _ = batch_file(tmp_path, 4)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing from the repository
    start = time.monotonic()   # the two inferences, not the wheel build and the install (their time is pip's)
    res = subprocess.run([str(venv / "bin" / "splitprune-device"), "infer", "--server", server.address,
                          "--model", str(out), str(path)], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "accuracy" in res.stdout and "uplink + server + downlink" in res.stdout
    res = subprocess.run([str(venv / "bin" / "splitprune-device"), "infer", "--server", server.address, "--model",
                          str(out), "--budget", "auto", "--latency-ms", "5000", "--every", "0", str(path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "4 requests, 100.0% within the target" in res.stdout     # the controller shipped without torch
    assert time.monotonic() - start < 90   # a stall guard: two short runs of 4 images each


def test_device_over_tls_with_a_token(exported, tmp_path, capsys):
    from splitprune.bench.core.certificates import make_certificates

    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    run, out = exported
    certs = make_certificates(tmp_path / "certs")
    proc = ServeSubprocess(free_port(), "--model", str(run), "--tls-cert", certs.server_cert, "--tls-key",
                         certs.server_key, "--token", "s3cret", "--session-port", "0").start()
    try:
        path, _ = batch_file(tmp_path, 2)
        base = ["infer", "--server", proc.address, "--model", str(out), "--tls-ca", certs.ca, str(path)]
        for more in ([], ["--tcp-session"]):   # an InferStream, and a session on the TLS session port
            assert device_main([*base, "--token", "s3cret", *more]) == 0
            assert "accuracy" in capsys.readouterr().out
            assert device_main([*base, "--token", "wrong", *more]) == 2
            assert "UNAUTHENTICATED" in capsys.readouterr().err
    finally:
        proc.stop()


def test_input_files_are_read_as_uint8_batches(tmp_path, monkeypatch):
    from PIL import Image

    from splitprune.errors import UserError
    from splitprune_device.images import read_inputs

    a = (np.arange(28 * 28) % 256).astype(np.uint8).reshape(28, 28)
    rgb = np.stack([a, a[::-1], a.T], -1)
    (tmp_path / "a.pgm").write_bytes(b"P5\n# a comment\n28 28\n255\n" + a.tobytes())
    (tmp_path / "a.ppm").write_bytes(b"P6 28 28 255\n" + rgb.tobytes())
    Image.fromarray(a).save(tmp_path / "a.png")
    np.savez(tmp_path / "a.npz", images=np.stack([a, a]), labels=np.array([3, 4]))
    for name, expected in [("a.pgm", a[None, ..., None]), ("a.png", a[None, ..., None]), ("a.ppm", rgb[None])]:
        images, labels = read_inputs(tmp_path / name)
        assert np.array_equal(images, expected) and labels is None
    images, labels = read_inputs(tmp_path / "a.npz")
    assert images.shape == (2, 28, 28, 1) and labels.tolist() == [3, 4]
    images, _ = read_inputs(FASHION / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10000, 28, 28, 1)
    monkeypatch.setitem(sys.modules, "PIL", None)  # a device without Pillow
    with pytest.raises(UserError, match=r"needs Pillow: pip install 'splitprune-device\[images\]'"):
        read_inputs(tmp_path / "a.png")
    (tmp_path / "bad.npy").write_bytes(b"junk")
    with pytest.raises(UserError, match="cannot read"):
        read_inputs(tmp_path / "bad.npy")


def test_device_sends_entropy_coded_activations_to_a_real_server(exported, server, tmp_path, capsys):
    """Exported with --dtype-up ec: the device codes with the manifest's frozen tables (numpy + constriction), the
    server decodes with the checkpoint's, and both predict what the int4-grid PyTorch path predicts."""
    run, out = exported
    ec_out = tmp_path / "ec"
    assert main(["export", "--checkpoint", str(run), "--out", str(ec_out), "--budget", "1,2", "--check-images",
                 "16", "--dtype-up", "ec"]) == 0
    path, images = batch_file(tmp_path)
    reports = {}
    for name, folder, more in (("fp16", out, ["--no-stream"]), ("ec", ec_out, ["--no-stream"]), ("stream", ec_out, [])):
        reports[name] = tmp_path / f"{name}.json"
        assert device_main(["infer", "--server", server.address, "--model", str(folder), "--budget", "2", *more,
                            "--out", str(reports[name]), str(path)]) == 0
    capsys.readouterr()
    fp16, ec, stream = (json.loads(reports[n].read_text()) for n in ("fp16", "ec", "stream"))
    assert ec["payload_bytes_up"] < fp16["payload_bytes_up"]
    # one InferStream session: the same answers, the header said once, the server's time still reported
    assert stream["predictions"] == ec["predictions"] and stream["message_bytes_up"] < ec["message_bytes_up"] / 2
    assert stream["latency_ms"]["server"]["p50"] > 0
    device, server_worker, _ = workers(run)
    device.codec = ChannelCodec("ec", DeviceModel(ec_out).tables)
    link = LocalLink(server_worker)
    for i in range(8):
        predicted, _, _ = device.predict(torch.from_numpy(DeviceModel(ec_out).prepare(images[i:i + 1])), link, 2)
        assert int(predicted[0]) == ec["predictions"][i]


def test_a_model_trained_with_the_position_prior_exports_its_tables_to_the_device_encoder(tmp_path):
    """Trained with --ec-prior position: [C, H*W, L+1] tables in the checkpoint and the manifest, the exported
    device half codes with them as the PyTorch device does, and the server decodes the device's string."""
    from splitprune.compression.codec import decode_tensor
    from splitprune.compression.tables import read_tables
    from splitprune.manifest import INPUT_NAME, onnx_session, read_manifest
    from splitprune.proto import pb
    from splitprune.training.checkpoint import read_tensors
    from splitprune.wire.codec import encode_values

    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--method", "ca", "--budget", "2", "--epochs", "1", "--train-subset", "48",
                 "--test-subset", "16", "--threads", "1", "--quiet", "--rate-lambda", "1", "--ec-prior", "position",
                 "--out", str(run)]) == 0
    meta = read_meta(run)
    channels, h, w = meta["wire_shape"]
    tables = read_tables(meta, channels)
    assert all(t.shape == (channels, h * w, levels + 1) for levels, t in tables.items())
    assert read_tensors(run / "checkpoint")["device.prior.logits"].shape == (channels, h * w, 16)
    assert main(["eval", "--checkpoint", str(run), "--dtype-up", "ec7", "--test-subset", "32", "--out",
                 str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["bytes_per_sample"] > 0
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--budget", "1,2", "--check-images", "16",
                 "--dtype-up", "ec7"]) == 0
    model = DeviceModel(out)
    assert np.array_equal(model.tables, tables[7])
    device, server, cfg, _, _ = load_workers(str(run))
    device.codec = ChannelCodec("ec7", tables)
    x, _, _ = sample_inputs(cfg, 1, 8)
    for budget in (1, 2):
        with torch.no_grad():
            kept, message = device._encode(device.half(x), device.kept_channels(budget))
        onnx = onnx_session(str(out / read_manifest(out)["budgets"][str(budget)]["file"]))
        sent = model.encode(onnx.run(None, {INPUT_NAME: x.numpy()})[0], budget)
        expected = encode_values(kept.numpy(), model.kept(budget), channels, pb.EC, False, tables[7])
        assert expected == message and sent.tables == message.tables and sent.shape == message.shape
        decoded = decode_tensor(sent, server.spec)   # the device's string decodes on the server's tables
        assert decoded.values.shape == kept.shape
