"""Many clients and faults on a real loopback server: 8 concurrent trainers, a stalled and a dead client,
a client disconnecting mid-step, a server restarted with SIGTERM (resume) and one killed outright."""
import hashlib
import queue
import socket
import threading
import time

import grpc
import pytest
import torch
from safetensors.torch import load_file

from splitprune.bench.core.processes import ServeSubprocess, free_port
from splitprune.client.config import ConnectConfig
from splitprune.client.connect import RemoteError, connect, make_hello
from splitprune.config import make_config
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.training.setup import build_workers
from splitprune.training.trainer import Trainer
from splitprune.wire.envelopes import (CHECKPOINT, DESCRIBE_METHOD, ERROR_KEY, HELLO, PHASE, TRAIN, TRAIN_METHOD, frame,
                                       unframe)

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


def timeless(out: bytes) -> bytes:
    """A framed TrainReply without its server_us: a step computed again repeats every other field, bit for bit."""
    kind, payload = unframe(out)
    reply = pb.TrainReply.FromString(payload)
    assert kind == TRAIN and reply.server_us > 0
    reply.ClearField("server_us")
    return frame(kind, reply.SerializeToString())


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
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_sessions=8))
    try:
        cfg = config()
        endpoints = [connect(cfg, handle.address, out=str(tmp_path / f"c{i}")) for i in range(8)]
        assert handle.service.attached() == 8
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
        half = handle.service.halves[cfg.fingerprint()]
        assert handle.service.counters["steps"] == 8 * 2  # 32 images / batch 16, each applied once
        assert len(half.clients) == 8 and all(r.last_step >= 2 for r in half.clients.values())
        assert all(bool(torch.isfinite(p).all()) for p in half.worker.half.parameters())
        assert all(s["transport"]["purposes"]["training"]["message_bytes_up"] > 0 for s in summaries.values())
    finally:
        handle.stop(grace=0.5)


def test_stalled_and_dead_clients_do_not_block_others(tmp_path):
    handle = start_app(ServeConfig(listen="127.0.0.1:0", idle_timeout=2.0))
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
        while handle.service.attached() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert handle.service.attached() == 0  # the stalled session was dropped after its idle timeout
        with pytest.raises(grpc.RpcError):
            stalled.exchange(frame(TRAIN, b""))
        stalled.close()
        dead.close()
    finally:
        handle.stop(grace=0.5)


def test_client_disconnecting_mid_step_leaves_the_model_consistent():
    handle = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        cfg = config(seed=11)
        phase = pb.PhaseRequest(phase=0, budget=4, lr=0.01, weight_decay=5e-4)
        values = torch.randn(16, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        from splitprune.compression import ChannelCodec, encode_labels

        request = pb.TrainRequest(step_id=1, activations=ChannelCodec("fp16").compress(values, torch.tensor([1, 5, 7, 9]), 512),
                                  labels=encode_labels(torch.arange(16) % 10))
        # what one application of that step does, in-process
        _, reference, _ = build_workers(cfg, 10, 1)
        reference.start_phase(phase)
        expected_reply = frame(TRAIN, reference.train(request).SerializeToString())
        expected = {k: v.clone() for k, v in reference.half.state_dict().items()}

        first = RawStream(handle.address)
        first.exchange(frame(HELLO, make_hello(cfg, "flaky", True, 10, 1).SerializeToString()))
        first.exchange(frame(PHASE, phase.SerializeToString()))
        half = handle.service.halves[cfg.fingerprint()]
        entered, finished = threading.Event(), threading.Event()
        original = half.worker.train

        def slow_train(req, *session_limits):
            entered.set()
            time.sleep(0.5)
            try:
                return original(req, *session_limits)
            finally:
                finished.set()

        half.worker.train = slow_train
        first.send(frame(TRAIN, request.SerializeToString()))
        assert entered.wait(30)
        first.close()  # the client vanishes while the server is inside the step
        assert finished.wait(30)
        deadline = time.monotonic() + 10
        while handle.service.attached() and time.monotonic() < deadline:
            time.sleep(0.05)
        half.worker.train = original
        state = half.worker.half.state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in expected)  # applied exactly once, completely
        assert half.clients["flaky"].last_step == 1

        again = RawStream(handle.address)  # the client comes back and retries the step it never got an answer to
        welcome = spb.Welcome.FromString(unframe(again.exchange(frame(HELLO, make_hello(cfg, "flaky", False, 10, 1)
                                                                      .SerializeToString())))[1])
        assert welcome.last_step_id == 1 and welcome.phase == 0
        assert timeless(again.exchange(frame(TRAIN, request.SerializeToString()))) == timeless(expected_reply)
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
    server = ServeSubprocess(port, *args, log_path=tmp_path / "serve.log").start()
    endpoint = connect(cfg, ConnectConfig(server=server.address, reconnect=90), out=str(tmp_path / "remote"))
    try:
        thread, result = _train_in_thread(cfg, tmp_path / "remote", endpoint)
        deadline = time.monotonic() + 120
        while endpoint.last_step < 3 and time.monotonic() < deadline and thread.is_alive():
            time.sleep(0.02)
        assert server.stop() == 0  # SIGTERM mid-training: the server saves its half and exits
        assert (tmp_path / "server" / "halves" / cfg.fingerprint() / "meta.json").exists()
        server = ServeSubprocess(port, *args, log_path=tmp_path / "serve.log").start()
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
    server = ServeSubprocess(port, *args, log_path=tmp_path / "serve.log").start()
    endpoint = connect(cfg, ConnectConfig(server=server.address, reconnect=90), out=str(tmp_path / "remote"))
    try:
        thread, result = _train_in_thread(cfg, tmp_path / "remote", endpoint)
        deadline = time.monotonic() + 120
        while not (tmp_path / "remote" / "checkpoint" / "meta.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        server.kill()  # a crash: the server's unsaved steps are gone
        server = ServeSubprocess(port, *args, log_path=tmp_path / "serve.log").start()
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
        return frame(TRAIN, pb.TrainRequest(step_id=i, activations=ChannelCodec("fp16").compress(
            values, torch.tensor([0, 2, 4, 6]), 512), labels=encode_labels(torch.arange(8))).SerializeToString())

    hello = lambda fresh: frame(HELLO, make_hello(cfg, "saver", fresh, 10, 1).SerializeToString())  # noqa: E731
    first = start_app(ServeConfig(listen="127.0.0.1:0", checkpoint=str(tmp_path / "srv"), save_every=0.2))
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
    weights = {k: v.clone() for k, v in first.service.halves[cfg.fingerprint()].worker.half.state_dict().items()}

    second = start_app(ServeConfig(listen="127.0.0.1:0", checkpoint=str(tmp_path / "srv")))
    try:
        half = second.service.halves[cfg.fingerprint()]
        assert all(torch.equal(half.worker.half.state_dict()[k], v) for k, v in weights.items())
        stream = RawStream(second.address)
        welcome = spb.Welcome.FromString(unframe(stream.exchange(hello(False)))[1])
        assert welcome.last_step_id == 2 and welcome.phase == 0
        assert stream.exchange(step(2)) == reply2  # from the saved reply, not applied again
        assert all(torch.equal(half.worker.half.state_dict()[k], v) for k, v in weights.items())
        assert second.service.counters["retried_steps"] == 1
        assert unframe(stream.exchange(step(3)))[0] == TRAIN
        stream.close()
    finally:
        second.stop(grace=0.5)


# ---------------------------------------------------------------- server-side checkpoints (raw protocol)
def _step(i, n=8, codec="fp16", channels=(0, 2, 4, 6)):
    from splitprune.compression import ChannelCodec, encode_labels

    values = torch.randn(n, len(channels), 4, 4, generator=torch.Generator().manual_seed(i))
    tensor = ChannelCodec(codec).compress(values, torch.tensor(channels), 512)
    return frame(TRAIN, pb.TrainRequest(step_id=i, activations=tensor, labels=encode_labels(torch.arange(n) % 10))
                 .SerializeToString())


def _checkpoint(stream, step_id):
    kind, body = unframe(stream.exchange(frame(CHECKPOINT, spb.CheckpointRequest(step_id=step_id).SerializeToString())))
    assert kind == CHECKPOINT
    return spb.CheckpointReply.FromString(body)


def _hello(cfg, client_id, fresh=False, resume=0, sha=""):
    hello = make_hello(cfg, client_id, fresh, 10, 1)
    hello.resume_step_id, hello.resume_state_sha256 = resume, sha
    return frame(HELLO, hello.SerializeToString())


def _welcome(stream, hello):
    kind, body = unframe(stream.exchange(hello))
    assert kind == HELLO
    return spb.Welcome.FromString(body)


def _refusal(address, messages):
    stream = RawStream(address, timeout=30)
    try:
        for m in messages:
            stream.exchange(m)
    except grpc.RpcError as exc:
        return exc.code(), dict(exc.trailing_metadata() or ()).get(ERROR_KEY), exc.details()
    finally:
        stream.close()
    raise AssertionError("not refused")


PHASE_0 = frame(PHASE, pb.PhaseRequest(phase=0, budget=4, lr=0.01, momentum=0.9, weight_decay=5e-4).SerializeToString())


def test_server_side_checkpoint_resumes_exactly_after_a_client_and_a_server_crash(tmp_path):
    cfg = config(seed=31, momentum=0.9)
    port = free_port()
    args = ("--checkpoint", str(tmp_path / "srv"), "--save-every", "1000")
    server = ServeSubprocess(port, *args, log_path=tmp_path / "serve.log").start()
    try:
        stream = RawStream(server.address)
        assert _welcome(stream, _hello(cfg, "dev", fresh=True)).last_step_id == 0
        stream.exchange(PHASE_0)
        for i in (1, 2):
            stream.exchange(_step(i))
        saved = _checkpoint(stream, 2)
        assert saved.step_id == 2 and saved.state_bytes > 0 and len(saved.state_sha256) == 64
        files = list((tmp_path / "srv" / "checkpoints" / cfg.fingerprint()).rglob("2-*.safetensors"))
        assert len(files) == 1 and hashlib.sha256(files[0].read_bytes()).hexdigest() == saved.state_sha256
        expected = [timeless(stream.exchange(_step(i))) for i in (3, 4)]  # what the run does after its checkpoint
        stream.close()

        # the client crashes and comes back from its own checkpoint at step 2: same replies, bit for bit but the time
        again = RawStream(server.address)
        welcome = _welcome(again, _hello(cfg, "dev", resume=2, sha=saved.state_sha256))
        assert welcome.state_sha256 == saved.state_sha256 and welcome.last_step_id == 2 and welcome.phase == 0
        again.exchange(PHASE_0)
        assert [timeless(again.exchange(_step(i))) for i in (3, 4)] == expected
        again.close()

        server.kill()  # the server crashes: checkpoints were written when asked, not at shutdown
        server = ServeSubprocess(port, *args, log_path=tmp_path / "serve.log").start()
        third = RawStream(server.address)
        assert _welcome(third, _hello(cfg, "dev", resume=2, sha=saved.state_sha256)).state_sha256 == saved.state_sha256
        third.exchange(PHASE_0)
        assert [timeless(third.exchange(_step(i))) for i in (3, 4)] == expected
        assert _checkpoint(third, 4).step_id == 4  # checkpoints at 4 and 6: the one at 2 is pruned
        third.exchange(_step(5))
        third.exchange(_step(6))
        assert _checkpoint(third, 6).step_id == 6
        with pytest.raises(grpc.RpcError) as stale:  # a checkpoint behind the steps already applied
            _checkpoint(third, 5)
        assert dict(stale.value.trailing_metadata())[ERROR_KEY] == "STEP_OUT_OF_ORDER"
        third.close()

        for resume, sha in ((2, saved.state_sha256), (3, ""), (4, "0" * 64)):
            code, reason, details = _refusal(server.address, [_hello(cfg, "dev", resume=resume, sha=sha)])
            assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "NO_CHECKPOINT"), details
            assert f"at step {resume}" in details
        code, reason, _ = _refusal(server.address, [_hello(cfg, "dev", fresh=True, resume=4)])
        assert reason == "BAD_HANDSHAKE"
    finally:
        server.stop()


def test_checkpoints_without_a_folder_last_as_long_as_the_server(tmp_path):
    cfg = config(seed=32)
    handle = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        stream = RawStream(handle.address)
        _welcome(stream, _hello(cfg, "tmp", fresh=True))
        stream.exchange(PHASE_0)
        stream.exchange(_step(1))
        saved = _checkpoint(stream, 1)
        expected = timeless(stream.exchange(_step(2)))
        # another client joins the half: a resume then keeps the shared half (no digest in the Welcome)
        other = RawStream(handle.address)
        _welcome(other, _hello(cfg, "other"))
        stream.close()
        shared = RawStream(handle.address)
        welcome = _welcome(shared, _hello(cfg, "tmp", resume=1, sha=saved.state_sha256))
        assert welcome.state_sha256 == "" and welcome.last_step_id == 1 and welcome.attached_clients == 2
        shared.close()
        other.close()
        deadline = time.monotonic() + 10
        while handle.service.attached() and time.monotonic() < deadline:
            time.sleep(0.05)
        alone = RawStream(handle.address)
        assert _welcome(alone, _hello(cfg, "tmp", resume=1, sha=saved.state_sha256)).state_sha256 == saved.state_sha256
        alone.exchange(PHASE_0)
        assert timeless(alone.exchange(_step(2))) == expected
        alone.close()
        folder = handle.service.store.root
        assert folder.is_dir()
    finally:
        handle.stop(grace=0.5)
    assert not folder.exists()  # a temporary folder: gone with the server
    code, reason, details = None, None, ""
    handle = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        code, reason, details = _refusal(handle.address, [_hello(cfg, "tmp", resume=1, sha=saved.state_sha256)])
    finally:
        handle.stop(grace=0.5)
    assert reason == "NO_CHECKPOINT" and "--checkpoint" in details


# ---------------------------------------------------------------- hostile input: memory and authentication
def _peak_rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="reads peak RSS from /proc")
def test_a_small_message_cannot_make_the_server_allocate_more_than_its_bound(tmp_path):
    """serve --max-request-mb M: the largest batch is sized so that no request makes the server's peak
    memory grow by M MiB or more; a sub-megabyte int4 message at that batch stays under it, and one
    sample more is refused before anything is decoded."""
    bound = 64 << 20
    server = ServeSubprocess(free_port(), "--max-request-mb", "64", log_path=tmp_path / "serve.log").start()
    cfg = config(seed=33, dtype_up="int4")
    try:
        with grpc.insecure_channel(server.address) as ch:
            stream = RawStream(server.address)
            _welcome(stream, _hello(cfg, "mem", fresh=True))
            stream.exchange(PHASE_0)
            stream.exchange(_step(1, n=16, codec="int4"))  # warm: model, optimizer buffers, allocator
            info = spb.DescribeReply.FromString(ch.unary_unary(DESCRIBE_METHOD)(
                spb.DescribeRequest(fingerprint=cfg.fingerprint()).SerializeToString(), timeout=30))
            n = info.max_batch
            assert 32 <= n <= 4096
            base = _peak_rss(server.proc.pid)
            small = _step(2, n=n, codec="int4", channels=(0,))
            assert len(small) < 1 << 20
            assert unframe(stream.exchange(small))[0] == TRAIN
            grown = _peak_rss(server.proc.pid) - base
            assert grown < bound, (grown, n)
            with pytest.raises(grpc.RpcError) as refused:
                stream.exchange(_step(3, n=n + 1, codec="int4", channels=(0,)))
            assert dict(refused.value.trailing_metadata())[ERROR_KEY] == "BAD_TENSOR"
            assert f"limit of {n}" in refused.value.details()
            stream.close()
        print(f"max batch {n}: peak RSS grew {grown / 2**20:.1f} MiB for a {len(small)}-byte message")
    finally:
        server.stop()


def test_token_is_checked_before_any_message_is_read():
    handle = start_app(ServeConfig(listen="127.0.0.1:0", token="secret"))
    try:
        gate = threading.Event()

        def never():  # the stream's first message is only sent after the verdict
            gate.wait(30)
            return
            yield

        with grpc.insecure_channel(handle.address) as ch:
            call = ch.stream_stream(TRAIN_METHOD)(never(), timeout=20)
            start = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                next(call)
            gate.set()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert time.monotonic() - start < 10
            assert dict(refused.value.trailing_metadata())[ERROR_KEY] == "UNAUTHENTICATED_TOKEN"
            # a unary call with a large body is refused without parsing it, with the same reason
            with pytest.raises(grpc.RpcError) as big:
                ch.unary_unary(DESCRIBE_METHOD)(b"\x0a" * (8 << 20), timeout=20)
            assert big.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "pass --token" not in big.value.details()  # the client adds the hint, once
        assert handle.service.counters["errors"] == 2
    finally:
        handle.stop(grace=0.5)


def test_refused_calls_are_logged_at_a_bounded_rate(caplog):
    import logging

    from splitprune.server.telemetry.ratelog import BoundedLog

    now = [0.0]
    refusals = BoundedLog(logging.getLogger("splitprune.serve"), "refused calls", burst=5, period_s=60,
                          clock=lambda: now[0])
    with caplog.at_level("INFO", logger="splitprune.serve"):
        for i in range(1000):
            refusals("call %d refused", i)
        now[0] = 61.0
        refusals("call %d refused", 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 7 and lines[4] == "call 4 refused" and lines[6] == "call 1000 refused"
    assert lines[5].startswith("995 more refused calls in the last 61 s")


def test_serve_on_a_busy_port_is_one_clear_error(tmp_path):
    import subprocess
    import sys

    handle = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        proc = subprocess.run([sys.executable, "-m", "splitprune", "serve", "--listen", handle.address],
                              capture_output=True, text=True, timeout=120)
    finally:
        handle.stop(grace=0.5)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "in use" in lines[0], proc.stderr


def test_exposed_servers_warn():
    from splitprune.server.app import exposure_warnings

    assert exposure_warnings("127.0.0.1", None, False) == []
    both = exposure_warnings("0.0.0.0", None, False)
    assert len(both) == 2 and "without a token" in both[0] and "without TLS" in both[1]
    assert exposure_warnings("0.0.0.0", "t", True) == []
    assert "the token" in exposure_warnings("10.0.0.1", "t", False)[0]


def test_a_saved_phase_out_of_range_is_refused_at_start(tmp_path):
    """A phase index is checked when loaded from disk as when received (it once poisoned a saved half)."""
    import json

    from splitprune.errors import UserError

    cfg = config(seed=34)
    handle = start_app(ServeConfig(listen="127.0.0.1:0", checkpoint=str(tmp_path / "srv")))
    stream = RawStream(handle.address)
    _welcome(stream, _hello(cfg, "p", fresh=True))
    stream.exchange(PHASE_0)
    stream.close()
    handle.stop(grace=0.5)
    meta_path = tmp_path / "srv" / "halves" / cfg.fingerprint() / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["phase"]["phase"] = 1 << 31
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="phase 2147483648 does not exist"):
        start_app(ServeConfig(listen="127.0.0.1:0", checkpoint=str(tmp_path / "srv")))


def test_checkpoint_rotation_keeps_the_newest_and_every_kept_model(tmp_path):
    """Two saves may share a step id (a phase start changes the half without a step); kept ones outlive the rotation."""
    from splitprune.server.store import KEEP_CHECKPOINTS, HalfStore

    store = HalfStore(tmp_path)
    saved = [store.save_checkpoint("0123456789abcdef", "dev", step, 1, f"state {step} {i}".encode(), None,
                                   keep=(i == 1))
             for step in (2, 4, 6) for i in range(2)]               # at each step: a kept model, then a rotating save
    left = {p.stem for p in tmp_path.rglob("*.safetensors")}
    rotating = [f"{s.step_id}-{s.sha256[:16]}" for i, s in enumerate(saved) if i % 2 == 0]
    kept = [f"{s.step_id}-{s.sha256[:16]}" for i, s in enumerate(saved) if i % 2 == 1]
    assert left == set(rotating[-KEEP_CHECKPOINTS:]) | set(kept)
    assert len({s.sha256 for s in saved}) == 6
