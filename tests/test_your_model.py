"""Your model, your weights: torchvision and py: models (random weights, small inputs) cut by name through the
whole path — cuts listed from the graph, in-process and remote training, resume, evaluation, ONNX export, a weights
file round trip — and every bad input refused with one clear message before anything is written."""
import json
from pathlib import Path

import pytest
import torch

from splitprune.cli import main
from splitprune.config import make_config
from splitprune.data import make_loaders
from splitprune.models import build_whole, file_digest
from splitprune.training.evaluation import evaluate
from splitprune.training.server_worker import LocalLink
from splitprune.training.setup import build_workers

TV = ["--model", "torchvision:resnet18", "--split", "layer2"]
SMALL = ["--train-subset", "48", "--test-subset", "32", "--threads", "1", "--quiet", "--bn-calibration", "32"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _settled(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm statistics and an affine transform that a trained network could have."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=gen) * 0.4 - 0.2)
    return model.eval()


def test_models_lists_the_valid_cuts_of_a_torchvision_model_from_its_graph(capsys):
    assert main(["models", "--model", "torchvision:resnet50", "--input-size", "64"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "512 x 8 x 8" in rows["layer2"] and "131,072" in rows["layer2"]  # fp32 bytes per sample
    assert "layer3.5" not in rows and "layer3" in rows  # the last block of a stage is the stage
    assert not any(name.startswith("layer2.0.") for name in rows)  # inside a residual block: no cut
    assert "fc" not in rows and "not a feature map" not in rows["avgpool"]


def test_a_torchvision_model_trains_resumes_evaluates_and_exports(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "export"
    assert main(["train", *TV, "--method", "ca", "--budget", "2", "--epochs", "1", *SMALL, "--out", str(run)]) == 0
    first = json.loads((run / "summary.json").read_text())
    assert first["model"] == "torchvision:resnet18" and first["cut_shape"] == [128, 4, 4]
    assert main(["train", *TV, "--method", "ca", "--budget", "2", "--epochs", "2", *SMALL, "--out", str(run)]) == 2
    assert "another configuration (epochs 1 there, 2 here)" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run), "--quiet"]) == 0
    assert f"{100 * first['final_test_accuracy']:.2f}%" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(run), "--out", str(out), "--check-images", "16"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["cut_shape"] == [128, 4, 4] and (out / "device_b2.onnx").exists()


def test_a_run_from_a_model_source_resumes_to_the_same_result(tmp_path, monkeypatch):
    from splitprune.training.checkpoint import read_tensors
    from splitprune.training.trainer import Trainer

    cfg = make_config({"model": "torchvision:mobilenet_v3_small", "split": "features.3", "method": "ca", "budget": 2,
                       "train_subset": 32, "test_subset": 16, "epochs": 2, "input_size": 32, "bn_calibration": 16})
    full = Trainer(cfg, tmp_path / "full", show_progress=False).run()
    original = Trainer._run_epoch
    calls = {"n": 0}

    def stop_in_the_second_epoch(self, phase):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self, phase)

    monkeypatch.setattr(Trainer, "_run_epoch", stop_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "cut", show_progress=False).run()
    monkeypatch.setattr(Trainer, "_run_epoch", original)
    resumed = Trainer(cfg, tmp_path / "cut", show_progress=False).run()
    assert resumed["final_test_accuracy"] == full["final_test_accuracy"]
    a, b = read_tensors(tmp_path / "cut" / "checkpoint"), read_tensors(tmp_path / "full" / "checkpoint")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_server_builds_a_model_source_only_when_it_allows_it(tmp_path, capsys):
    from splitprune.server.app import start_app
    from splitprune.server.config import ServeConfig

    refusing = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        assert main(["train", *TV, "--method", "ca", "--epochs", "1", *SMALL, "--out", str(tmp_path / "no"),
                     "--server", refusing.address]) == 2
        assert "--allow-model torchvision:resnet18" in capsys.readouterr().err
        assert not refusing.service.halves
    finally:
        refusing.stop(grace=0.5)
    allowing = start_app(ServeConfig(listen="127.0.0.1:0", allow_model=("torchvision:*",)))
    try:
        assert main(["train", *TV, "--method", "ca", "--epochs", "1", *SMALL, "--out", str(tmp_path / "yes"),
                     "--server", allowing.address]) == 0
    finally:
        allowing.stop(grace=0.5)


def test_a_py_factory_with_its_own_head_gets_one_for_the_data(tmp_path, capsys):
    assert main(["train", "--model", "py:factories:fixed_head", "--split", "2", "--method", "ca", "--budget", "4",
                 "--epochs", "1", *SMALL, "--out", str(tmp_path / "run")]) == 0
    assert "head 8 gives 5 outputs; the data has 10 classes" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["cut_shape"] == [8, 32, 32]


def _weights_file(tmp_path: Path, suffix: str) -> Path:
    torch.manual_seed(3)
    whole = _settled(build_whole("torchvision:resnet18", 10, 3))
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in whole.state_dict().items()}, str(path))
    else:
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in whole.state_dict().items()}}, path)
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_weights_file_starts_the_split_model_where_the_loaded_model_is(tmp_path, suffix):
    path = _weights_file(tmp_path, suffix)
    from splitprune.models import load_weights

    loaded = load_weights("torchvision:resnet18", 10, 3, str(path))
    whole = build_whole("torchvision:resnet18", 10, 3)
    whole.load_state_dict(loaded.tensors)
    whole.eval()
    cfg = make_config({"model": "torchvision:resnet18", "split": "layer2", "method": "ca", "budget": 2,
                       "dtype_up": "fp32", "weights": str(path), "weights_sha256": file_digest(path)})
    device, server, geometry = build_workers(cfg, 10, 3)
    device.half.eval()
    server.half.eval()
    _, test, _ = make_loaders("fashion-mnist", None, 64, 32, 3, 0, 1, 256)
    x = torch.cat([x for x, _ in test])
    with torch.no_grad():
        expected = whole(x).argmax(1)
        z = device.half(x)
        got = server.half(z).argmax(1)
    assert (got == expected).float().mean() >= 0.99
    result = evaluate(device, LocalLink(server), test, geometry.channels)  # every channel, through the codec
    labels = torch.cat([y for _, y in test])
    assert abs(result.accuracy - float((expected == labels).float().mean())) <= 0.01


def test_the_pass_through_bottleneck_fits_itself_to_the_first_training_batch():
    from splitprune.compression.bottleneck import Decoder, GatedEncoder

    encoder, decoder = GatedEncoder(6), Decoder(6, relu=True)
    encoder.start_as_identity()
    decoder.start_as_identity()
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(16, 6, 5, 5, generator=gen) * 1.5 + torch.linspace(-1, 2, 6).view(1, 6, 1, 1))
    for mode in ("eval", "train", "train", "eval"):
        getattr(encoder, mode)()
        getattr(decoder, mode)()
        with torch.no_grad():
            y = decoder(encoder(x))
        assert (y - x).abs().max() <= 0.02 * x.abs().max(), mode
    assert not encoder.fit_pending and not decoder.fit_pending


def test_the_python_api_splits_a_model_in_a_plain_training_loop():
    import splitprune

    torch.manual_seed(0)
    model = _settled(build_whole("torchvision:resnet18", 10, 3))
    device, server = splitprune.split(model, at="layer2", input_size=32, dtype="fp32")
    device.eval()
    server.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(server(device(x), device.channels()).argmax(1), model(x).argmax(1))
        assert torch.equal(server.decompress(device.compress(x)).argmax(1), model(x).argmax(1))
    device, server = splitprune.split(model, at="layer2", input_size=32, budget=4)
    device.train()
    server.train()
    optimizer = torch.optim.SGD([*device.parameters(), *server.parameters()], lr=0.01)
    loss = torch.nn.functional.cross_entropy(server(device(x), device.channels()), torch.arange(4))
    (loss + device.budget_loss()).backward()
    optimizer.step()
    assert len(device.compress(x[:1])) < 4 * 4 * 4 * 2 + 64


def _state_file(tmp_path: Path, state: dict, name: str = "w.pth") -> str:
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    whole = build_whole("torchvision:resnet18", 10, 3)
    state = whole.state_dict()
    renamed = {k.replace("layer1.", "stage1."): v for k, v in state.items()}
    misshapen = {**state, "conv1.weight": torch.zeros(64, 3, 5, 5)}
    torch.save(whole, tmp_path / "pickled.pth")
    return [
        (["--model", "torchvision:resnet1"], "did you mean resnet18"),
        (["--model", "torchvision:resnet18", "--split", "layer2.0.conv1"], "more than one tensor crosses"),
        (["--model", "torchvision:resnet18", "--split", "layer9"], "valid cuts near it: layer4, layer3"),
        ([*TV, "--weights", _state_file(tmp_path, renamed, "renamed.pth")], "unexpected tensors: stage1.0.conv1.weight"),
        ([*TV, "--weights", _state_file(tmp_path, misshapen, "shape.pth")], "conv1.weight [64, 3, 5, 5] in the file"),
        ([*TV, "--weights", str(tmp_path / "pickled.pth")], "cannot be read as a state_dict"),
        ([*TV, "--weights", str(tmp_path / "absent.pth")], "no such file"),
        (["--model", "torchvision:alexnet", "--split", "features.5", "--input-size", "16"],
         "smallest input size that works is"),
        (["--model", "py:factories:raises", "--split", "0"], "raised RuntimeError: no GPU found"),
        (["--model", "py:factories:not_a_module", "--split", "0"], "returned a dict, not a torch.nn.Module"),
        (["--model", "py:factories:untraceable", "--split", "conv"], "cannot be traced"),
        (["--model", "py:factories:conv_head", "--split", "1"], "gives 7 outputs but the data has 10 classes"),
        (["--model", "py:factories:tokens", "--split", "block"], "not a feature map"),
        (["--model", "py:factories:nothing", "--split", "0"], "has no function nothing"),
    ]


def test_bad_models_cuts_and_weights_are_one_clear_message_and_leave_nothing(tmp_path, capsys):
    for argv, message in bad_inputs(tmp_path):
        out = tmp_path / "run"
        capsys.readouterr()
        assert main(["train", "--method", "ca", "--epochs", "1", *SMALL, *argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert not out.exists() or not any(out.iterdir()), argv


@pytest.mark.parametrize("size", [64, 20])
def test_the_device_package_prepares_images_as_training_did_at_any_size(size):
    from splitprune.data import load_dataset
    from splitprune.data.transforms import BatchTransform
    from splitprune.inputs import normalise_images

    images = load_dataset("fashion-mnist", None, train=False).images[:4]
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    torch_side = BatchTransform(size, 3, mean, std, False)(torch.from_numpy(images)).numpy()
    numpy_side = normalise_images(images, size, 3, mean, std)
    assert numpy_side.shape == torch_side.shape == (4, 3, size, size)
    assert abs(numpy_side - torch_side).max() < 1e-5 * max(1.0, abs(torch_side).max())


def test_tracing_a_model_leaves_other_threads_forward_passes_alone():
    import threading

    from splitprune.models import graph

    busy = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    x = torch.randn(2, 3, 8, 8)
    expected = busy(x)
    stop, errors, calls = threading.Event(), [], [0]

    def step():
        while not stop.is_set():
            try:
                assert torch.equal(busy(x), expected)
                calls[0] += 1
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                errors.append(exc)
                return

    worker = threading.Thread(target=step)
    worker.start()
    try:
        for _ in range(20):
            graph.trace(build_whole("torchvision:resnet18", 10, 3))
    finally:
        stop.set()
        worker.join()
    assert not errors and calls[0] > 0, errors
