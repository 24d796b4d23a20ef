from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from splitprune.cli import main
from splitprune.errors import UserError
from splitprune.models import build_part, check_server_input, cut_shape, list_cuts, list_models, resnet, vgg

BUILDERS = {"vgg11_bn": vgg.vgg11_bn, "vgg11_bn_compact": vgg.vgg11_bn_compact, "resnet18": resnet.resnet18}


@dataclass
class SplitModel:
    device: nn.Module
    server: nn.Module
    cut_shape: tuple[int, ...]


def build_split_model(name: str, split: str, num_classes: int, in_channels: int = 3,
                      input_size: int = 32) -> SplitModel:
    shape = cut_shape(name, split, in_channels, input_size)
    return SplitModel(build_part(name, split, num_classes, in_channels, "device"),
                      build_part(name, split, num_classes, in_channels, "server"), shape)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vgg_conv5() -> SplitModel:
    torch.manual_seed(0)
    return build_split_model("vgg11_bn", "conv5", num_classes=10)


def conv_bn_params(cin: int, cout: int) -> int:
    return cin * cout * 9 + cout + 2 * cout


def linear_params(fan_in: int, fan_out: int) -> int:
    return fan_in * fan_out + fan_out


def vgg11_features_params(in_channels: int) -> int:
    convs = [(in_channels, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    return sum(conv_bn_params(cin, cout) for cin, cout in convs)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def randomize_bn_stats(*modules: nn.Module) -> None:
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.2, 0.2)


def reference_full(name: str, split_model: SplitModel, num_classes: int, in_channels: int = 3) -> nn.Module:
    """The whole network built independently, holding the split model's tensors (keys must match exactly)."""
    with torch.device("meta"):
        full = BUILDERS[name](num_classes=num_classes, in_channels=in_channels)
    state = {**split_model.device.state_dict(), **split_model.server.state_dict()}
    full.load_state_dict(state, strict=True, assign=True)
    return full.eval()


def test_registry():
    assert list_models() == ["vgg11_bn", "vgg11_bn_compact", "resnet18"]
    named = {name: [c.name for c in list_cuts(name) if c.description] for name in list_models()}
    assert named["vgg11_bn"] == ["pool1", "pool2", "pool3", "conv5", "conv6", "pool4"]
    assert named["resnet18"] == ["stem", "layer1", "layer2", "layer3"]
    for name in list_models():
        for cut in list_cuts(name):
            assert "\n" not in cut.description, (name, cut)
    # the graph finds the built-in names' layers: conv5 is features.17, the 5th conv block's ReLU
    assert {c.name: c.layer for c in list_cuts("vgg11_bn")}["conv5"] == "features.17"
    assert cut_shape("vgg11_bn", "features.17") == cut_shape("vgg11_bn", "conv5")


def test_vgg11_bn_parameter_count(vgg_conv5: SplitModel):
    head = linear_params(512 * 7 * 7, 4096) + linear_params(4096, 4096) + linear_params(4096, 10)
    expected = vgg11_features_params(3) + head
    assert expected == 128_812_810
    assert n_params(vgg_conv5.device) + n_params(vgg_conv5.server) == expected
    device_convs = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512)]
    assert n_params(vgg_conv5.device) == sum(conv_bn_params(cin, cout) for cin, cout in device_convs)


def test_other_parameter_counts():
    with torch.device("meta"):
        compact = vgg.vgg11_bn_compact(num_classes=10, in_channels=1)
        r18 = resnet.resnet18(num_classes=10)
    assert n_params(compact) == vgg11_features_params(1) + linear_params(512, 10)
    assert n_params(r18) == 11_173_962


def test_vgg11_bn_architecture(vgg_conv5: SplitModel):
    convs = [m for part in (vgg_conv5.device, vgg_conv5.server) for m in part.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 256, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg_conv5.device.modules()) == 3
    assert sum(isinstance(m, nn.MaxPool2d) for m in vgg_conv5.server.modules()) == 2
    linears = [m for m in vgg_conv5.server.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(25088, 4096), (4096, 4096), (4096, 10)]
    assert sum(isinstance(m, nn.Dropout) for m in vgg_conv5.server.modules()) == 2
    assert torch.all(convs[0].bias == 0) and abs(float(linears[0].weight.detach().std()) - 0.01) < 1e-3


@pytest.mark.parametrize(
    "name, split, size, expected",
    [
        ("vgg11_bn", "conv5", 32, (512, 4, 4)),
        ("vgg11_bn", "pool2", 32, (128, 8, 8)),
        ("vgg11_bn", "conv5", 96, (512, 12, 12)),
        ("vgg11_bn", "pool1", 32, (64, 16, 16)),
        ("vgg11_bn", "pool3", 32, (256, 4, 4)),
        ("vgg11_bn", "conv6", 32, (512, 4, 4)),
        ("vgg11_bn", "pool4", 64, (512, 4, 4)),
        ("vgg11_bn_compact", "conv5", 32, (512, 4, 4)),
        ("resnet18", "stem", 32, (64, 32, 32)),
        ("resnet18", "layer1", 32, (64, 32, 32)),
        ("resnet18", "layer2", 32, (128, 16, 16)),
        ("resnet18", "layer3", 32, (256, 8, 8)),
        ("resnet18", "layer3", 96, (256, 24, 24)),
    ],
)
def test_cut_shape(name: str, split: str, size: int, expected: tuple[int, int, int]):
    assert cut_shape(name, split, input_size=size) == expected
    assert cut_shape(name, split, in_channels=1, input_size=size) == expected


def test_vgg11_bn_split_equals_full_forward(vgg_conv5: SplitModel):
    assert vgg_conv5.cut_shape == (512, 4, 4)
    assert isinstance(vgg_conv5.device, nn.Module) and isinstance(vgg_conv5.server, nn.Module)
    randomize_bn_stats(vgg_conv5.device, vgg_conv5.server)
    vgg_conv5.device.eval()
    vgg_conv5.server.eval()
    full = reference_full("vgg11_bn", vgg_conv5, num_classes=10)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cut = vgg_conv5.device(x)
        split_out = vgg_conv5.server(cut)
        full_out = full(x)
    assert cut.shape == (1, 512, 4, 4)
    assert split_out.shape == (1, 10)
    assert full_out.abs().max() > 0
    torch.testing.assert_close(split_out, full_out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "name, split, in_channels, size",
    [(name, split, 3, 32) for split in vgg.CUTS for name in ["vgg11_bn_compact"]]
    + [("resnet18", split, 3, 16) for split in resnet.CUTS]
    + [("vgg11_bn_compact", "conv5", 1, 32), ("resnet18", "layer2", 1, 16)],
)
def test_split_equals_full_forward(name: str, split: str, in_channels: int, size: int):
    torch.manual_seed(0)
    model = build_split_model(name, split, num_classes=7, in_channels=in_channels, input_size=size)
    randomize_bn_stats(model.device, model.server)
    model.device.eval()
    model.server.eval()
    full = reference_full(name, model, num_classes=7, in_channels=in_channels)
    x = torch.randn(2, in_channels, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cut = model.device(x)
        out = model.server(cut)
        expected = full(x)
    assert cut.shape[1:] == model.cut_shape == cut_shape(name, split, in_channels, size)
    assert out.shape == (2, 7)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_device_and_server_parameters_are_disjoint():
    model = build_split_model("resnet18", "layer2", num_classes=10)
    device_ids = {id(p) for p in model.device.parameters()}
    assert device_ids and not device_ids & {id(p) for p in model.server.parameters()}
    assert n_params(model.device) + n_params(model.server) == 11_173_962


def test_gradients_flow_through_the_cut():
    torch.manual_seed(0)
    model = build_split_model("vgg11_bn_compact", "pool2", num_classes=4, in_channels=1, input_size=32)
    x = torch.randn(2, 1, 32, 32)
    loss = nn.functional.cross_entropy(model.server(model.device(x)), torch.tensor([0, 3]))
    loss.backward()
    first_conv = next(m for m in model.device.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0


def test_unknown_model_lists_choices():
    with pytest.raises(UserError, match="vgg11_bn, vgg11_bn_compact, resnet18"):
        build_split_model("vgg16", "conv5", num_classes=10)
    with pytest.raises(UserError, match="got 'vgg11_b'; did you mean vgg11_bn"):
        list_cuts("vgg11_b")


def test_unknown_or_invalid_cuts_name_the_nearest_valid_ones():
    with pytest.raises(UserError, match="has no module 'conv9'"):
        build_split_model("vgg11_bn", "conv9", num_classes=10)
    with pytest.raises(UserError, match=r"resnet18 at 'layer2\.0\.conv1'.*more than one tensor crosses.*layer2\.0"):
        cut_shape("resnet18", "layer2.0.conv1")


@pytest.mark.parametrize("name, split, size", [("vgg11_bn", "conv5", 16), ("vgg11_bn_compact", "pool2", 8)])
def test_too_small_input(name: str, split: str, size: int):
    with pytest.raises(UserError, match=rf"{size}x{size} does not fit.*smallest input size that works is 32"):
        cut_shape(name, split, input_size=size)
    with pytest.raises(UserError, match="does not fit"):
        build_split_model(name, split, num_classes=10, input_size=size)
    assert cut_shape(name, split, input_size=32)


def test_resnet18_takes_tiny_inputs():
    assert cut_shape("resnet18", "layer3", input_size=1) == (256, 1, 1)


@pytest.mark.parametrize(
    "kwargs", [{"num_classes": 0}, {"num_classes": 10, "in_channels": 0}, {"num_classes": 10, "input_size": -4}]
)
def test_bad_sizes_raise_user_error(kwargs: dict):
    with pytest.raises(UserError, match="positive integer"):
        build_split_model("resnet18", "stem", **kwargs)


def test_check_server_input():
    model = build_split_model("vgg11_bn_compact", "conv5", num_classes=10)
    check_server_input(model.server, (512, 4, 4))
    assert model.server.training
    with pytest.raises(UserError, match="256 x 4 x 4"):
        check_server_input(model.server, (256, 4, 4))
    with pytest.raises(UserError, match="512 x 1 x 1"):
        check_server_input(model.server, (512, 1, 1))
    with pytest.raises(UserError, match="512 x 4"):
        check_server_input(model.server, (512, 4))
    assert model.server.training


def test_cli_models(capsys: pytest.CaptureFixture[str]):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        assert f"{name}: " in out
    assert "128,812,810 parameters" in out and "11,173,962 parameters" in out
    conv5_row = next(line for line in out.splitlines() if line.split()[:1] == ["conv5"])
    assert "(features.17)" in conv5_row and "512 x 4 x 4" in conv5_row and "32,768" in conv5_row
    assert "2,143,488" in conv5_row and "126,669,322" in conv5_row and "5th conv block" in conv5_row
    assert "n/a (too small)" not in out


def test_cli_models_too_small_and_errors(capsys: pytest.CaptureFixture[str]):
    assert main(["models", "--input-size", "16", "--in-channels", "1", "--model", "vgg11_bn_compact"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.split()[:1] in (["pool1"], ["conv5"])]
    assert len(rows) == 2 and all("n/a (too small)" in row for row in rows)
    assert "input 1 x 16 x 16" in out and "resnet18" not in out
    assert main(["models", "--model", "nope"]) == 2
    assert "vgg11_bn_compact" in capsys.readouterr().err
    assert main(["models", "--model", "torchvision:resnet1"]) == 2
    assert "did you mean resnet18" in capsys.readouterr().err
    assert main(["models", "--num-classes", "0"]) == 2
    assert "--num-classes" in capsys.readouterr().err
