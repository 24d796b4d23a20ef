"""Each half is built alone, from a random stream of its own: the device side never allocates the server half
(nor the server the device half), a half is the same whether built alone or with the other, and fingerprints
say which way a run's weights were drawn."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode

from splitprune.config import make_config, stored_config
from splitprune.errors import UserError
from splitprune.models import materialize, vgg
from splitprune.training.setup import build_device_worker, build_server_worker, build_workers
from splitprune.training.trainer import Trainer

SMALL = dict(model="vgg11_bn_compact", dataset="fashion-mnist", method="ca", budget=4, epochs=1, train_subset=32,
             test_subset=16, batch_size=16, test_batch_size=16, threads=1)


class CountAllocations(TorchDispatchMode):
    """Bytes of real (not fake, not meta) tensor storage that ops create while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and not isinstance(out, FakeTensor) and not out.is_meta \
                and not func._schema.is_mutable and not any(isinstance(a, torch.Tensor) and a is out for a in args):
            self.bytes += out.untyped_storage().nbytes()
        return out


def _state(module: nn.Module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_the_device_side_never_allocates_the_server_half():
    # vgg11_bn's server half is the 120M-parameter head (about 480 MB); its device half at conv5 ~8 MB
    cfg = make_config({**SMALL, "model": "vgg11_bn"})
    with CountAllocations() as device_side:
        device, _ = build_device_worker(cfg, 10, 1)
    device_bytes = sum(t.numel() * t.element_size() for t in device.half.state_dict().values())
    assert device_bytes < 20e6
    assert device_side.bytes < 3 * device_bytes, f"{device_side.bytes / 1e6:.0f} MB allocated on the device side"
    with CountAllocations() as whole:  # the counter sees a whole model built for real
        vgg.vgg11_bn_compact(10, 1)
    assert whole.bytes > 30e6


def test_a_half_is_the_same_built_alone_or_with_the_other():
    for method in ("ca", "anybudget"):
        cfg = make_config({**SMALL, "method": method})
        device, server, _ = build_workers(cfg, 10, 1)
        alone_device, _ = build_device_worker(cfg, 10, 1)
        alone_server, _ = build_server_worker(cfg, 10, 1)
        for a, b in ((device.half, alone_device.half), (server.half, alone_server.half)):
            sa, sb = _state(a), _state(b)
            assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), method


def test_seeds_and_sides_give_different_streams():
    first = _state(build_server_worker(make_config(SMALL), 10, 1)[0].half)
    other_seed = _state(build_server_worker(make_config({**SMALL, "seed": 1}), 10, 1)[0].half)
    key = next(k for k in first if k.endswith("weight") and first[k].dim() > 1)
    assert not torch.equal(first[key], other_seed[key])
    device = build_device_worker(make_config(SMALL), 10, 1)[0].half
    # the same layer sizes drawn on both sides would be the same numbers if the sides shared a stream
    assert not torch.equal(device.encoder.conv.weight.flatten()[:64],
                           build_server_worker(make_config(SMALL), 10, 1)[0].half.decoder.deconv.weight.flatten()[:64])


def test_replaying_a_whole_model_gives_its_constructors_weights():
    model, recording = materialize.record(lambda: vgg.vgg11_bn_compact(10, 3))
    torch.manual_seed(7)
    replayed = _state(materialize.materialize(model, recording))
    torch.manual_seed(7)
    built = _state(vgg.vgg11_bn_compact(10, 3))
    assert replayed.keys() == built.keys() and all(torch.equal(replayed[k], built[k]) for k in built)


class ComputedScale(nn.Module):
    """A parameter computed from another tensor (as layer scales often are): not replayable alone."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4) * 1e-3)
        self.second = nn.Linear(4, 2)


def test_a_model_that_cannot_be_replayed_is_built_whole_and_cut():
    with pytest.raises(materialize.NotReplayable, match="computed by"):
        model, recording = materialize.record(ComputedScale)
        materialize.materialize(model, recording)
    torch.manual_seed(3)
    part = materialize.build_part(ComputedScale, lambda m: nn.ModuleList([m.first, m.second]))
    torch.manual_seed(3)
    whole = ComputedScale()
    assert torch.equal(part[0].weight, whole.first.weight) and torch.equal(part[1].weight, whole.second.weight)


def test_fingerprints_say_how_the_weights_were_drawn():
    old = {k: v for k, v in make_config(SMALL).to_dict().items() if k != "seeding"}  # a config saved before
    assert stored_config(old).seeding == 1 and make_config(old).seeding == 2
    assert stored_config(old).fingerprint() == make_config({**SMALL, "seeding": 1}).fingerprint()
    assert make_config({}).fingerprint() != make_config({"seeding": 1}).fingerprint()
    before = {"seeding": 1, "bn_calibration": 0}  # what the fields added since read as in a config saved before them
    assert make_config(before).fingerprint() == "86ead5b3205d0e80"  # published before seeding existed


def test_a_new_run_with_the_old_seeding_is_refused_and_an_old_run_says_how_to_resume(tmp_path):
    with pytest.raises(UserError, match="--seeding 1 is kept to resume"):
        Trainer(make_config({**SMALL, "seeding": 1}), tmp_path / "new", show_progress=False)
    run = tmp_path / "old"
    Trainer(make_config(SMALL), run, show_progress=False).run()
    meta_path = run / "checkpoint" / "meta.json"
    import json

    from splitprune.training.checkpoint import SEAL_KEY, seal

    meta = json.loads(meta_path.read_text())
    meta["config"].pop("seeding")  # as a run saved before the field existed
    meta["fingerprint"] = stored_config(meta["config"]).fingerprint()
    meta[SEAL_KEY] = seal(run / "checkpoint" / "model.safetensors", meta)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="resume it with --seeding 1"):
        Trainer(make_config(SMALL), run, show_progress=False).run()
