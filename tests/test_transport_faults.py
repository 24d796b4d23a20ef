"""Many clients and faults on a real loopback server: 8 concurrent trainers, a stalled and a dead client,
a client disconnecting mid-step, a server restarted with SIGTERM (resume) and one killed outright."""
import queue
import socket
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import load_file

from splitprune.config import make_config
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.training.setup import build_workers
from splitprune.training.trainer import Trainer
from splitprune.transport.client import RemoteError, connect, make_hello
from splitprune.transport.protocol import HELLO, PHASE, TRAIN, TRAIN_METHOD, frame, unframe
from splitprune.transport.server import start_server
from splitprune.transport.testing import ServerProcess, free_port

BASE = dict(model="vgg11_bn_compact", dataset="fashion-mnist", test_batch_size=32, batch_size=16, threads=1, seed=0)


def config(**overrides):
    return make_config({**BASE, "method": "ca", "epochs": 1, "train_subset": 32, "test_subset": 16, **overrides})


def _strip(summary):
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "train_seconds", "transport")}


def assert_same_run(local_dir, remote_dir, server_address):
    """The remote run's device checkpoint, completed with its server half pulled from the server, equals
    the in-process run's checkpoint."""
    from splitprune.cli import main

    whole = remote_dir.parent / f"{remote_dir.name}-pulled"
    assert main(["pull", "--server", server_address, "--checkpoint", str(remote_dir), "--out", str(whole)]) == 0
    for name in ("model.safetensors", "state.safetensors"):
        a, b = load_file(str(local_dir / "checkpoint" / name)), load_file(str(whole / name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


class RawStream:
    """A hand-driven Train stream: send bytes, read replies, cancel whenever."""

    def __init__(self, address, timeout=60):
        self.channel = grpc.insecure_channel(address)
        self.requests = queue.SimpleQueue()
        self.call = self.channel.stream_stream(TRAIN_METHOD)(iter(self.requests.get, None), timeout=timeout)

    def send(self, data):
        self.requests.put(data)

    def exchange(self, data):
        self.send(data)
        return next(self.call)

    def close(self):
        self.call.cancel()
        self.requests.put(None)
        self.channel.close()


# ---------------------------------------------------------------- many clients
def test_eight_concurrent_training_clients_share_one_server_half(tmp_path):
    handle = start_server("127.0.0.1:0", max_sessions=8)
    try:
        cfg = config()
        endpoints = [connect(cfg, handle.address, out=str(tmp_path / f"c{i}")) for i in range(8)]
        assert handle.servicer.attached() == 8
        with pytest.raises(RemoteError) as info:  # the ninth is over the limit
            connect(cfg, handle.address, client_id="ninth", fresh_start=False)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        summaries, errors = {}, []

        def run(i):
            try:
                summaries[i] = Trainer(cfg, tmp_path / f"c{i}", endpoint=endpoints[i], show_progress=False).run()
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        for e in endpoints:
            e.close()
        assert not errors, errors
        assert len(summaries) == 8 and all(s["epochs"] == 1 for s in summaries.values())
        half = handle.servicer.halves[cfg.fingerprint()]
        assert handle.servicer.counters["steps"] == 8 * 2  # 32 images / batch 16, each applied once
        assert len(half.clients) == 8 and all(r.last_step >= 2 for r in half.clients.values())
        assert all(bool(torch.isfinite(p).all()) for p in half.worker.half.parameters())
        assert all(s["transport"]["purposes"]["training"]["message_bytes_up"] > 0 for s in summaries.values())
    finally:
        handle.stop(grace=0.5)


def test_stalled_and_dead_clients_do_not_block_others(tmp_path):
    handle = start_server("127.0.0.1:0", idle_timeout_s=2.0)
    try:
        cfg = config()
        stalled = RawStream(handle.address)
        stalled.exchange(frame(HELLO, make_hello(cfg, "stalled", True, 10, 1).SerializeToString()))
        stalled.exchange(frame(PHASE, pb.PhaseRequest(phase=0, budget=4, lr=0.01, weight_decay=5e-4)
                               .SerializeToString()))
        dead = socket.create_connection(("127.0.0.1", handle.port))
        dead.sendall(b"PRI * HTTP/2.0\r\n")  # half a connection preface, then silence
        start = time.monotonic()
        endpoint = connect(cfg, handle.address, out=str(tmp_path / "busy"))
        summary = Trainer(cfg, tmp_path / "busy", endpoint=endpoint, show_progress=False).run()
        endpoint.close()
        assert summary["epochs"] == 1 and time.monotonic() - start < 60
        deadline = time.monotonic() + 10
        while handle.servicer.attached() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert handle.servicer.attached() == 0  # the stalled session was dropped after its idle timeout
        with pytest.raises(grpc.RpcError):
            stalled.exchange(frame(TRAIN, b""))
        stalled.close()
        dead.close()
    finally:
        handle.stop(grace=0.5)


def test_client_disconnecting_mid_step_leaves_the_model_consistent():
    handle = start_server("127.0.0.1:0")
    try:
        cfg = config(seed=11)
        phase = pb.PhaseRequest(phase=0, budget=4, lr=0.01, weight_decay=5e-4)
        values = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        from splitprune.compression import ChannelCodec, encode_labels

        request = pb.TrainRequest(step_id=1, activations=ChannelCodec("fp16").encode(values, torch.tensor([1, 5, 7, 9]), 512),
                                  labels=encode_labels(torch.arange(16) % 10))
        # what one application of that step does, in-process
        _, reference, _ = build_workers(cfg, 10, 1)
        reference.start_phase(phase)
        expected_reply = frame(TRAIN, reference.train(request).SerializeToString())
        expected = {k: v.clone() for k, v in reference.half.state_dict().items()}

        first = RawStream(handle.address)
        first.exchange(frame(HELLO, make_hello(cfg, "flaky", True, 10, 1).SerializeToString()))
        first.exchange(frame(PHASE, phase.SerializeToString()))
        half = handle.servicer.halves[cfg.fingerprint()]
        entered, finished = threading.Event(), threading.Event()
        original = half.worker.train

        def slow_train(req):
            entered.set()
            time.sleep(0.5)
            try:
                return original(req)
            finally:
                finished.set()

        half.worker.train = slow_train
        first.send(frame(TRAIN, request.SerializeToString()))
        assert entered.wait(30)
        first.close()  # the client vanishes while the server is inside the step
        assert finished.wait(30)
        deadline = time.monotonic() + 10
        while handle.servicer.attached() and time.monotonic() < deadline:
            time.sleep(0.05)
        half.worker.train = original
        state = half.worker.half.state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected)  # applied exactly once, completely
        assert half.clients["flaky"].last_step == 1

        again = RawStream(handle.address)  # the client comes back and retries the step it never got an answer to
        welcome = spb.Welcome.FromString(unframe(again.exchange(frame(HELLO, make_hello(cfg, "flaky", False, 10, 1)
                                                                      .SerializeToString())))[1])
        assert welcome.last_step_id == 1 and welcome.phase == 0
        assert again.exchange(frame(TRAIN, request.SerializeToString())) == expected_reply
        state = half.worker.half.state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected)  # not applied twice
        request.step_id = 2
        assert unframe(again.exchange(frame(TRAIN, request.SerializeToString())))[0] == TRAIN
        assert half.clients["flaky"].last_step == 2
        again.close()
    finally:
        handle.stop(grace=0.5)


# ---------------------------------------------------------------- server restarts
def _train_in_thread(cfg, out, endpoint):
    result = {}

    def run():
        try:
            result["summary"] = Trainer(cfg, out, endpoint=endpoint, show_progress=False).run()
        except Exception as exc:  # noqa: BLE001
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, result


def test_server_restart_with_sigterm_resumes_the_session_exactly(tmp_path):
    cfg = config(epochs=2, train_subset=64)
    local = Trainer(cfg, tmp_path / "local", show_progress=False).run()
    port = free_port()
    args = ("--checkpoint", str(tmp_path / "server"))
    server = ServerProcess(port, *args, log_path=tmp_path / "serve.log").start()
    endpoint = connect(cfg, server.address, out=str(tmp_path / "remote"), reconnect_s=90)
    try:
        thread, result = _train_in_thread(cfg, tmp_path / "remote", endpoint)
        deadline = time.monotonic() + 120
        while endpoint.last_step < 3 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert server.stop() == 0  # SIGTERM mid-training: the server saves its half and exits
        assert (tmp_path / "server" / "halves" / cfg.fingerprint() / "meta.json").exists()
        server = ServerProcess(port, *args, log_path=tmp_path / "serve.log").start()
        thread.join(timeout=300)
        assert "error" not in result, result.get("error")
        remote = result["summary"]
        endpoint.close()
        assert_same_run(tmp_path / "local", tmp_path / "remote", server.address)
    finally:
        endpoint.close()
        server.stop()
    assert "resumed server half" in server.log()
    assert remote["transport"]["reconnects"] >= 1
    assert _strip(remote) == _strip(local)


def test_killed_server_is_detected_and_a_rerun_resumes_from_the_checkpoint(tmp_path):
    cfg = config(epochs=3, train_subset=48)
    local = Trainer(cfg, tmp_path / "local", show_progress=False).run()
    port = free_port()
    args = ("--checkpoint", str(tmp_path / "server"), "--save-every", "1000")
    server = ServerProcess(port, *args, log_path=tmp_path / "serve.log").start()
    endpoint = connect(cfg, server.address, out=str(tmp_path / "remote"), reconnect_s=90)
    try:
        thread, result = _train_in_thread(cfg, tmp_path / "remote", endpoint)
        deadline = time.monotonic() + 120
        while not (tmp_path / "remote" / "checkpoint" / "meta.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()  # a crash: the server's unsaved steps are gone
        server = ServerProcess(port, *args, log_path=tmp_path / "serve.log").start()
        thread.join(timeout=300)
        assert isinstance(result.get("error"), RemoteError), result
        assert "lost training steps" in str(result["error"])
    finally:
        endpoint.close()
    try:  # the same command again: both halves resume from their own checkpoints (the server's on its disk)
        endpoint = connect(cfg, server.address, out=str(tmp_path / "remote"))
        remote = Trainer(cfg, tmp_path / "remote", endpoint=endpoint, show_progress=False).run()
        assert endpoint.transport_stats()["state_pushes"] == 0  # no server weights travelled
        endpoint.close()
        assert_same_run(tmp_path / "local", tmp_path / "remote", server.address)
    finally:
        server.stop()
    assert _strip(remote) == _strip(local)


def test_saved_server_remembers_steps_and_answers_a_retry_after_restart(tmp_path):
    """The last reply per client is part of the server's checkpoint: a step applied just before a restart,
    whose reply the client never got, is answered after the restart without being applied again."""
    cfg = config(seed=21)
    phase = frame(PHASE, pb.PhaseRequest(phase=0, budget=4, lr=0.01, weight_decay=5e-4).SerializeToString())
    from splitprune.compression import ChannelCodec, encode_labels

    def step(i):
        values = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(i))
        return frame(TRAIN, pb.TrainRequest(step_id=i, activations=ChannelCodec("fp16").encode(
            values, torch.tensor([0, 2, 4, 6]), 512), labels=encode_labels(torch.arange(8))).SerializeToString())

    hello = lambda fresh: frame(HELLO, make_hello(cfg, "saver", fresh, 10, 1).SerializeToString())  # noqa: E731
    first = start_server("127.0.0.1:0", checkpoint=str(tmp_path / "srv"), save_every_s=0.2)
    stream = RawStream(first.address)
    stream.exchange(hello(True))
    stream.exchange(phase)
    stream.exchange(step(1))
    saved = tmp_path / "srv" / "halves" / cfg.fingerprint() / "meta.json"
    deadline = time.monotonic() + 20
    while not (saved.exists() and '"last_step": 1' in saved.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert '"last_step": 1' in saved.read_text()  # a periodic save, while the server runs
    reply2 = stream.exchange(step(2))
    stream.close()
    first.stop(grace=0.5)
    weights = {k: v.clone() for k, v in first.servicer.halves[cfg.fingerprint()].worker.half.state_dict().items()}

    second = start_server("127.0.0.1:0", checkpoint=str(tmp_path / "srv"))
    try:
        half = second.servicer.halves[cfg.fingerprint()]
        assert all(torch.equal(half.worker.half.state_dict()[k], v) for k, v in weights.items())
        stream = RawStream(second.address)
        welcome = spb.Welcome.FromString(unframe(stream.exchange(hello(False)))[1])
        assert welcome.last_step_id == 2 and welcome.phase == 0
        assert stream.exchange(step(2)) == reply2  # from the saved reply, not applied again
        assert all(torch.equal(half.worker.half.state_dict()[k], v) for k, v in weights.items())
        assert second.servicer.counters["retried_steps"] == 1
        assert unframe(stream.exchange(step(3)))[0] == TRAIN
        stream.close()
    finally:
        second.stop(grace=0.5)
