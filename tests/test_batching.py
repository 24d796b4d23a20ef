"""Batched server steps (serve --batch-window-ms / --batch-train) against real servers on loopback: stacked
inference equals one-at-a-time, a stacked training step equals the union step done by hand, a bad request
fails alone, and a retried step is answered from memory."""
import threading

import grpc
import pytest
import torch
import torch.nn.functional as F

from splitprune.client.connect import RemoteError, connect
from splitprune.client.inference import InferenceClient
from splitprune.compression import ChannelCodec, encode_labels
from splitprune.config import make_config
from splitprune.data import make_loaders
from splitprune.errors import ProtocolError, UserError
from splitprune.proto import pb
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.training.checkpoint import module_tensors, weights_digest
from splitprune.training.setup import build_device_worker, build_server_worker
from splitprune.training.stacked import Request, evaluate_stacked, train_stacked
from splitprune.wire.refusals import BadTensor

PHASE = pb.PhaseRequest(phase=0, budget=4, lr=0.05, momentum=0.9, weight_decay=5e-4)


def config(**overrides):
    return make_config({"method": "ca", "budget": 4, "model": "vgg11_bn_compact", "dataset": "fashion-mnist",
                        "epochs": 1, "batch_size": 16, "test_batch_size": 16, "threads": 1, "seed": 0, **overrides})


@pytest.fixture(scope="module")
def images():
    train, _, _ = make_loaders("fashion-mnist", None, 8, config().input_size, 1, 0, train_subset=32, augment=False)
    return [batch for batch in train]


DEVICE_HALVES = {}


def device_half(cfg):
    if cfg.fingerprint() not in DEVICE_HALVES:
        DEVICE_HALVES[cfg.fingerprint()] = build_device_worker(cfg, 10, 1)[0].half.eval()
    return DEVICE_HALVES[cfg.fingerprint()]


def encoded(cfg, x, channels, codec=None):
    """Real images through the device half; the given kept channels (None: all), in the config's dtype."""
    with torch.no_grad():
        z = device_half(cfg)(x)
    kept = z if channels is None else z[:, list(channels)]
    return ChannelCodec(codec or cfg.dtype_up).compress(kept, None if channels is None else torch.tensor(channels),
                                                      z.shape[1])


def concurrently(calls):
    """Run every call in its own thread at once; their results (or exceptions) in order."""
    out = [None] * len(calls)

    def run(i):
        try:
            out[i] = calls[i]()
        except Exception as exc:  # noqa: BLE001
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


def trainer_session(cfg, address, client_id):
    endpoint = connect(cfg, address, client_id=client_id, fresh_start=True)
    endpoint.start_phase(PHASE.SerializeToString())
    return endpoint


def test_batch_options_are_checked(capsys):
    from splitprune.cli import main

    with pytest.raises(UserError, match="--batch-window-ms"):
        ServeConfig(batch_train=True)
    assert main(["serve", "--batch-window-ms", "-1"]) == 2
    assert "--batch-window-ms" in capsys.readouterr().err


def test_stacked_inference_equals_one_at_a_time_and_a_bad_request_fails_alone(images):
    cfg = config()
    alone = start_app(ServeConfig(listen="127.0.0.1:0"))
    stacked = start_app(ServeConfig(listen="127.0.0.1:0", batch_window_ms=2000, batch_max_samples=16))
    try:
        for handle in (alone, stacked):  # the half appears with a training session (same seed: same weights)
            trainer_session(cfg, handle.address, "owner").close()
        channel_sets = [(0, 1, 2, 3), (5, 6, 7, 8), (1, 3, 5, 7), (0, 1, 2, 3)]
        requests = [pb.EvalRequest(request_id=i + 1, activations=encoded(cfg, images[i][0][:n], channel_sets[i]))
                    .SerializeToString() for i, n in enumerate((1, 2, 4, 8))]  # 15 samples, different channels
        bad = pb.EvalRequest(request_id=9, activations=encoded(cfg, images[0][0][:1], (0, 1, 2, 3)))
        bad.activations.data = bad.activations.data[:-2]  # one value short: a bad tensor, claiming 1 sample
        clients = [InferenceClient(h.address, cfg.fingerprint()) for h in (alone, stacked)]
        try:
            expected = [pb.EvalReply.FromString(clients[0].infer(r, 4)) for r in requests]
            got = concurrently([lambda r=r: clients[1].infer(r, 4) for r in requests]
                               + [lambda: clients[1].infer(bad.SerializeToString(), 4)])
        finally:
            for c in clients:
                c.close()
        assert isinstance(got[-1], RemoteError) and got[-1].code == grpc.StatusCode.INVALID_ARGUMENT
        for want, reply in zip(expected, got[:-1]):
            assert pb.EvalReply.FromString(reply) == want  # same request id, same predictions
        assert stacked.service.batching.counts() == {"eval": (1, 5)}  # the 16-sample cap closed one batch of all 5
    finally:
        alone.stop(grace=0.5)
        stacked.stop(grace=0.5)


def test_stacked_inference_of_an_anybudget_model_normalises_each_prefix_by_its_own_budget(images):
    cfg = config(method="anybudget", budget=None)
    worker = build_server_worker(cfg, 10, 1)[0]
    x = images[0][0]
    with torch.no_grad():
        z = device_half(cfg)(x)
    requests = [pb.EvalRequest(request_id=k + 1, activations=ChannelCodec("fp16").compress(
        z[:, :k], None if k == 512 else torch.arange(k), 512, prefix=True)) for k in (1, 4, 512, 4)]
    with torch.no_grad():
        worker.half.layers.classifier.weight.mul_(30)
        bn = worker.half.decoder.bn
        for seed in range(20):  # distinct decoder statistics per rung, as training leaves them, that make the
            gen = torch.Generator().manual_seed(seed)  # budgets predict differently (else the check shows nothing)
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=gen))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=gen) ** 4 + 1e-3)
            alone = [worker.evaluate(r) for r in requests]
            if len({r.predictions.SerializeToString() for r in alone[:3]}) > 1:
                break
    assert len({r.predictions.SerializeToString() for r in alone[:3]}) > 1   # the budgets predict differently here
    stacked = evaluate_stacked(worker, [Request(r) for r in requests])
    assert stacked == alone


def test_stacked_steps_of_an_anybudget_half_run_alone_with_its_nested_objective(images):
    cfg = config(method="anybudget", budget=None)
    stacked, alone = (build_server_worker(cfg, 10, 1)[0] for _ in range(2))
    for worker in (stacked, alone):
        worker.start_phase(pb.PhaseRequest(phase=0, budget=512, lr=PHASE.lr, momentum=PHASE.momentum))
    with torch.no_grad():
        zs = [device_half(cfg)(images[i][0]) for i in range(2)]
    requests = [_step(i + 1, ChannelCodec("fp16").compress(z[:, :k], torch.arange(k), 512, prefix=True), images[i][1])
                for i, (z, k) in enumerate(zip(zs, (8, 32)))]
    got, want = train_stacked(stacked, [Request(r) for r in requests]), [alone.train(r) for r in requests]
    assert got[0].server_us == got[1].server_us > 0   # the time of the whole call, both steps run alone in it
    assert [timeless(r) for r in got] == [timeless(r) for r in want]
    assert weights_digest(module_tensors("s", stacked.half), "s.") == weights_digest(module_tensors("s", alone.half), "s.")


def timeless(reply: pb.TrainReply) -> pb.TrainReply:
    """The reply but its server_us: two runs of one step share every other field."""
    out = pb.TrainReply()
    out.CopyFrom(reply)
    out.ClearField("server_us")
    return out


def _step(step_id, activations, y):
    return pb.TrainRequest(step_id=step_id, activations=activations, labels=encode_labels(y))


def test_stacked_step_gives_each_client_its_slice_of_the_union_step(images):
    """Two clients (4 samples each, different kept channels) in one stacked step. Compared exactly:
    (1) each client's gradient == its rows of d(mean loss over the 8 samples)/d(input), computed here by hand
    on a fresh server half (decode, scatter, concatenate, forward, backward), restricted to its channels;
    (2) the same slices come out of ServerWorker.train given ONE request holding the union (8 samples, the
    8 channels of both, zeros where a client sent none), i.e. a lone step on the union batch;
    (3) the server half's weights after the step equal both references'; (4) a retry returns the stored reply."""
    cfg = config()
    (xa, ya), (xb, yb) = (images[0][0][:4], images[0][1][:4]), (images[1][0][:4], images[1][1][:4])
    reqs = [_step(1, encoded(cfg, xa, (0, 2, 4, 6)), ya), _step(1, encoded(cfg, xb, (1, 3, 5, 7)), yb)]
    handle = start_app(ServeConfig(listen="127.0.0.1:0", batch_window_ms=2000, batch_max_samples=8, batch_train=True))
    try:
        endpoints = [trainer_session(cfg, handle.address, name) for name in ("a", "b")]
        try:
            replies = concurrently([lambda e=e, r=r: e.train(r.SerializeToString()) for e, r in zip(endpoints, reqs)])
            retry = endpoints[0].train(reqs[0].SerializeToString())
        finally:
            for e in endpoints:
                e.close()
        info = InferenceClient(handle.address, cfg.fingerprint())
        try:
            served = info.describe().weights_sha256
        finally:
            info.close()
        assert handle.service.counters["steps"] == 2 and handle.service.counters["retried_steps"] == 1
        (hosted,) = handle.service.halves.values()
        state = {k: v.clone() for k, v in hosted.state_tensors().items()}
    finally:
        handle.stop(grace=0.5)
    assert retry == replies[0]  # the stored reply, byte for byte, and not applied twice (weights below)
    got = [pb.TrainReply.FromString(r) for r in replies]
    assert got[0].server_us == got[1].server_us > 0   # each reply carries the time of the stacked step

    by_hand, _ = build_server_worker(cfg, 10, 1)
    by_hand.start_phase(PHASE)
    decoded = [ChannelCodec.decompress(r.activations) for r in reqs]
    leaves = [d.values.clone().requires_grad_() for d in decoded]
    dense = torch.cat([torch.zeros(4, d.num_channels, *d.values.shape[2:]).index_copy(1, d.channels, v)
                       for d, v in zip(decoded, leaves)])
    with by_hand.rng.active():
        by_hand.half.train()
        loss = F.cross_entropy(by_hand.half(dense), torch.cat([ya, yb]))
        by_hand.optimizer.zero_grad()
        loss.backward()
        by_hand.optimizer.step()

    union_worker, _ = build_server_worker(cfg, 10, 1)
    union_worker.start_phase(pb.PhaseRequest(phase=0, budget=8, lr=PHASE.lr, momentum=PHASE.momentum,
                                             weight_decay=PHASE.weight_decay))
    union = ChannelCodec("fp32").compress(dense.detach()[:, :8], torch.arange(8), dense.shape[1])
    union_grad = ChannelCodec.decompress(union_worker.train(_step(1, union, torch.cat([ya, yb]))).gradient).values

    for i, (reply, d, leaf) in enumerate(zip(got, decoded, leaves)):
        assert reply.step_id == 1
        gradient = ChannelCodec.decompress(reply.gradient)
        assert gradient.channels.tolist() == d.channels.tolist()
        codec = ChannelCodec(cfg.dtype_down)
        assert torch.equal(gradient.values, ChannelCodec.decompress(codec.compress(leaf.grad, d.channels, d.num_channels)).values)
        own_union = union_grad[4 * i:4 * i + 4][:, d.channels]
        assert torch.equal(gradient.values, ChannelCodec.decompress(codec.compress(own_union, d.channels, d.num_channels)).values)
    assert weights_digest(module_tensors("server", by_hand.half)) == weights_digest(
        module_tensors("server", union_worker.half))
    # The served half: equal up to the order of the weight-gradient sums, which the server's own thread may
    # split differently from this one (seen once in CI under load); the gradients sent back are exact above.
    reference = module_tensors("server", union_worker.half)
    assert weights_digest(module_tensors("server", union_worker.half)) == served or all(
        torch.allclose(state[k].float(), reference[k].float(), rtol=0, atol=1e-6) for k in reference)


def test_a_bad_step_in_a_stack_fails_alone(images):
    """Three clients in one window; c's labels are malformed: c alone is refused, a and b are stacked."""
    cfg = config()
    x, y = images[0]
    reqs = [_step(1, encoded(cfg, x[2 * i:2 * i + 2], channels), y[2 * i:2 * i + 2])
            for i, channels in enumerate([(0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 2, 3)])]
    reqs[2].labels.data = b"\xff\xff"  # class 255 of 10
    handle = start_app(ServeConfig(listen="127.0.0.1:0", batch_window_ms=2000, batch_max_samples=6, batch_train=True))
    try:
        endpoints = [trainer_session(cfg, handle.address, name) for name in "abc"]
        try:
            got = concurrently([lambda e=e, r=r: e.train(r.SerializeToString()) for e, r in zip(endpoints, reqs)])
        finally:
            for e in endpoints:
                e.close()
        assert handle.service.batching.counts() == {"train": (1, 3)}
        assert handle.service.counters["steps"] == 2
    finally:
        handle.stop(grace=0.5)
    assert isinstance(got[2], RemoteError) and got[2].reason == "BAD_TENSOR", got[2]
    for reply, req in zip(got[:2], reqs):
        gradient = ChannelCodec.decompress(pb.TrainReply.FromString(reply).gradient)
        assert gradient.values.shape[0] == 2 and bool(torch.isfinite(gradient.values).all())


def _diverging_worker(cfg):
    """A real server half whose decoder weights are scaled by 1e10: requests of ordinary values still
    train, one of values near 1e30 overflows to Inf in the forward."""
    worker, _ = build_server_worker(cfg, 10, 1)
    with torch.no_grad():
        worker.half.decoder.deconv.weight.mul_(1e10)
    worker.start_phase(PHASE)
    return worker


def test_a_diverging_step_undoes_the_stack_and_the_others_run_alone(images):
    """With batch norm over the union, one sample's Inf makes every slice NaN: the stacked step is undone
    and every request runs alone through ServerWorker.train, in order. Compared exactly with a worker
    that ran them one at a time: replies, refusal, weights and buffers afterwards."""
    cfg = config(dtype_up="fp32")
    x, y = images[0]
    first = encoded(cfg, x[:2], (0, 1, 2, 3))
    noise = torch.randn(2, 4, *first.shape[2:], generator=torch.Generator().manual_seed(0)).clamp(-3, 3)
    huge = ChannelCodec("fp32").compress(noise * 3e29, torch.arange(4), first.shape[1])
    reqs = [_step(1, first, y[:2]), _step(1, huge, y[2:4]), _step(1, encoded(cfg, x[4:6], (4, 5, 6, 7)), y[4:6])]
    stacked = _diverging_worker(cfg)
    got = train_stacked(stacked, [Request(r) for r in reqs])
    alone = _diverging_worker(cfg)
    want = []
    for r in reqs:
        try:
            want.append(alone.train(r))
        except ProtocolError as exc:
            want.append(exc)
    assert isinstance(got[1], BadTensor) and isinstance(want[1], ProtocolError)
    assert timeless(got[0]) == timeless(want[0]) and timeless(got[2]) == timeless(want[2])
    assert got[0].server_us == got[2].server_us > 0   # the whole call's time: the undone stack, then both alone
    # the same weights and batch-norm statistics: a refused step's forward is undone alone or in a stack,
    # so both equal a worker that only ever saw the two valid steps
    valid_only = _diverging_worker(cfg)
    for r in (reqs[0], reqs[2]):
        valid_only.train(r)
    theirs = valid_only.half.state_dict()
    for worker in (stacked, alone):
        assert all(torch.equal(t, theirs[name]) for name, t in worker.half.state_dict().items())
    assert all(bool(torch.isfinite(b).all()) for b in alone.half.buffers())


def test_scale_report_merges_rows_of_other_layouts(tmp_path):
    """The hook for other layouts (e.g. 2 replicas): their rows join the saved ones in every output."""
    from splitprune.bench.systems import scale_report as scale

    def row(mode, samples_per_s, replicas=1, repeat=0):
        return {"workload": "infer-1", "clients": 8, "mode": mode, "repeat": repeat, "samples_per_s": samples_per_s,
                "requests_per_s": samples_per_s, "p50_ms": 10.0, "p99_ms": 20.0, "failed": 0, "client_cpu": 0.1,
                "server_cpu": 0.5, "samples_per_cpu_s": 2 * samples_per_s, "replicas": replicas}

    meta = {"scale_command": "splitprune bench scale", "uptime_before": "", "uptime_after": "", "profile": "quick",
            "window_ms": 2.0, "clients_are": "threads", "accelerator": "cpu"}
    first = scale.report(tmp_path, [row("alone", 100), row("alone", 110, repeat=1), row("batched", 170),
                                    row("batched", 180, repeat=1)], meta)
    assert ": holds:" in first["verdict"]  # slowest batched 170 / fastest alone 110 = 1.55x
    merged = scale.merge_rows(tmp_path, [row("alone", 190, replicas=2)])
    assert [(s["mode"], s["replicas"]) for s in merged["summary"]] == [("alone", 1), ("alone", 2), ("batched", 1)]
    assert "| 2 |" in (tmp_path / "scale.md").read_text() and (tmp_path / "scale.png").exists()
