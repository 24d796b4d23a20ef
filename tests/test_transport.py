"""The gRPC runtime against a real server on a free loopback port: equivalence with in-process training,
authentication, TLS, validation of every field, size limits, state transfer and split inference."""
import json
import math
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from splitprune.bench.core.certificates import make_certificates

from splitprune.cli import main
from splitprune.client.config import ConnectConfig
from splitprune.client.connect import RemoteError, connect, make_hello
from splitprune.client.inference import InferenceClient
from splitprune.compression import ChannelCodec, encode_labels
from splitprune.config import make_config
from splitprune.errors import ProtocolError
from splitprune.proto import pb, service_pb2_grpc
from splitprune.proto import service_pb2 as spb
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.training.checkpoint import state_from_bytes, state_to_bytes, weights_digest
from splitprune.training.trainer import Trainer
from splitprune.wire.envelopes import (CHECKPOINT, DESCRIBE_METHOD, ERROR_KEY, EVAL, HELLO, INFER_METHOD, PHASE,
                                       PUSH_STATE_METHOD, TRAIN, TRAIN_METHOD, frame, unframe)
from splitprune.wire.timing import MAX_SERVER_SECONDS, server_seconds

SMALL = dict(model="vgg11_bn_compact", dataset="fashion-mnist", train_subset=48, test_subset=32, batch_size=16,
             test_batch_size=32, threads=1, seed=0)


def small_config(**overrides):
    return make_config({**SMALL, "method": "ca", "epochs": 1, **overrides})


@pytest.fixture(scope="module")
def server():
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_sessions=32))
    yield handle
    handle.stop(grace=0.5)


# ---------------------------------------------------------------- raw protocol helpers
def raw_stream(address, messages, metadata=(), timeout=60):
    """Send `messages` (bytes) on one Train stream; return (replies, RpcError or None)."""
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(TRAIN_METHOD)(iter(messages), metadata=metadata, timeout=timeout)
        replies = []
        try:
            for reply in call:
                replies.append(reply)
        except grpc.RpcError as exc:
            return replies, exc
        return replies, None


def reason(exc):
    return dict(exc.trailing_metadata() or ()).get(ERROR_KEY)


def hello_bytes(cfg, client_id, fresh=False, **fields):
    hello = make_hello(cfg, client_id, fresh, num_classes=10, in_channels=1)
    for key, value in fields.items():
        if isinstance(value, list):
            del getattr(hello, key)[:]
            getattr(hello, key).extend(value)
        else:
            setattr(hello, key, value)
    return frame(HELLO, hello.SerializeToString())


PHASE0 = frame(PHASE, pb.PhaseRequest(phase=0, budget=4, lr=0.01, momentum=0.0, weight_decay=5e-4).SerializeToString())


def train_bytes(step_id=1, n=2, channels=(0, 1, 2, 3), labels=None, tensor=None, codec="fp16", lr_scale=0.0):
    if tensor is None:
        values = torch.randn(n, len(channels), 4, 4, generator=torch.Generator().manual_seed(step_id))
        tensor = ChannelCodec(codec).compress(values, torch.tensor(channels), 512)
    y = torch.tensor(labels if labels is not None else [i % 10 for i in range(n)])
    req = pb.TrainRequest(step_id=step_id, activations=tensor, labels=encode_labels(y), lr_scale=lr_scale)
    return frame(TRAIN, req.SerializeToString())


# ---------------------------------------------------------------- equivalence
def _strip(summary):
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "train_seconds", "transport")}


SERVER_SIDE = ("server.", "opt.server.", "rng.server")


def _train_locally_and_remotely(cfg, tmp_path, server, measure=False) -> tuple[dict, dict]:
    """The same run in-process (tmp_path/local) and against the server (tmp_path/remote): both summaries."""
    local = Trainer(cfg, tmp_path / "local", show_progress=False).run()
    endpoint = connect(cfg, ConnectConfig(server=server.address, measure_socket=measure), out=str(tmp_path / "remote"))
    try:
        remote = Trainer(cfg, tmp_path / "remote", endpoint=endpoint, show_progress=False).run()
    finally:
        endpoint.close()
    return local, remote


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_training_over_grpc_equals_in_process_training(tmp_path, server, lr_schedule):
    cfg = make_config({**SMALL, "method": "deprune", "schedule": "4:1,all:1", "lr_schedule": lr_schedule})
    local, remote = _train_locally_and_remotely(cfg, tmp_path, server, measure=True)
    assert _strip(remote) == _strip(local)
    for name in ("model.safetensors", "state.safetensors"):  # the device half; the server keeps its own
        a, b = (load_file(str(tmp_path / run / "checkpoint" / name)) for run in ("local", "remote"))
        assert b.keys() == {k for k in a if not k.startswith(SERVER_SIDE)}
        for key in b:
            assert torch.equal(a[key], b[key]), key
    rows = [json.loads(json.dumps(r)) for r in (local, remote)]
    assert rows[0]["final_test_accuracy"] == rows[1]["final_test_accuracy"]
    # bytes: each message counted as encoded (payload + its envelope); the socket sees that plus framing
    purposes = remote["transport"]["purposes"]
    training, evaluation = purposes["training"], purposes["evaluation"]
    assert 2 * training["messages_up"] <= training["message_bytes_up"] - remote["bytes_up"] <= 4 * training["messages_up"]
    assert training["message_bytes_down"] > remote["bytes_down"]
    single = 512 * 16 * 2 + 100  # evaluate() also sends one single-sample request per epoch, not in eval_bytes_up
    evaluated = remote["eval_bytes_up"] + remote["calibration_bytes_up"]  # precise BN's batches go with them
    assert remote["calibration_bytes_up"] > 0
    assert evaluated < evaluation["message_bytes_up"] < evaluated + 2 * single
    for p in purposes.values():
        assert p["socket_bytes_up"] >= p["message_bytes_up"] and p["socket_bytes_down"] >= p["message_bytes_down"]
    assert training["socket_bytes_up"] > training["message_bytes_up"]
    assert remote["transport"]["connections"] == 1 and remote["transport"]["reconnects"] == 0


def test_prune_over_grpc_starts_from_the_pretrained_server_half(tmp_path, server):
    Trainer(make_config({**SMALL, "method": "sl", "epochs": 1, "train_subset": 32}), tmp_path / "sl",
            show_progress=False).run()
    cfg = make_config({**SMALL, "method": "prune", "schedule": "32:1,4:1", "train_subset": 32,
                       "from_checkpoint": str(tmp_path / "sl")})  # momentum 0.9: optimizer buffers travel too
    local, remote = _train_locally_and_remotely(cfg, tmp_path, server)
    assert remote["transport"]["state_pushes"] == 1  # the pretrained server half went up first
    assert remote["transport"]["purposes"]["state"]["message_bytes_up"] > 0
    assert _strip(remote) == _strip(local)
    for folder in ("checkpoint", "models/budget_32", "models/budget_4"):  # each pulled whole from the server
        pulled = tmp_path / "pulled" / folder
        assert main(["pull", "--server", server.address, "--checkpoint", str(tmp_path / "remote" / folder),
                     "--out", str(pulled)]) == 0
        a = load_file(str(tmp_path / "local" / folder / "model.safetensors"))
        b = load_file(str(pulled / "model.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    state = load_file(str(tmp_path / "pulled" / "checkpoint" / "state.safetensors"))
    assert any(k.startswith("opt.server.") for k in state)


def test_summary_is_identical_from_the_cli(tmp_path, server, capsys):
    args = ["--method", "ca", "--epochs", "1", "--train-subset", "32", "--test-subset", "16", "--threads", "1",
            "--quiet"]
    assert main(["train", *args, "--out", str(tmp_path / "a")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "b"), "--server", server.address, "--measure-socket"]) == 0
    assert "network (on the socket)" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("a", "b"))
    assert _strip(a) == _strip(b)
    assert b["transport"]["purposes"]["training"]["socket_bytes_up"] > 0 and a["transport"] is None


# ---------------------------------------------------------------- authentication and TLS
def test_missing_or_wrong_token_is_refused_with_a_clear_status(tmp_path):
    handle = start_app(ServeConfig(listen="127.0.0.1:0", token="open-sesame"))
    try:
        cfg = small_config()
        for token in (None, "wrong"):
            with pytest.raises(RemoteError) as info:
                connect(cfg, ConnectConfig(server=handle.address, token=token), client_id="intruder", fresh_start=False)
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            assert "token" in str(info.value)
        # every RPC checks it, not only Train
        with grpc.insecure_channel(handle.address) as ch:
            with pytest.raises(grpc.RpcError) as rpc:
                ch.unary_unary(DESCRIBE_METHOD)(b"", timeout=10)
            assert rpc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        endpoint = connect(cfg, ConnectConfig(server=handle.address, token="open-sesame"), client_id="friend",
                           fresh_start=True)
        endpoint.close()
        rc = main(["train", "--method", "ca", "--epochs", "1", "--train-subset", "16", "--test-subset", "16",
                   "--out", str(tmp_path / "cli"), "--server", handle.address, "--token", "bad", "--quiet"])
        assert rc == 2
    finally:
        handle.stop(grace=0.5)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_tls_and_mutual_tls(tmp_path):
    certs = make_certificates(tmp_path / "certs")

    cfg = small_config()
    handle = start_app(ServeConfig(listen="127.0.0.1:0", tls_cert=certs.server_cert, tls_key=certs.server_key,
                                   token="t"))
    try:
        endpoint = connect(cfg, ConnectConfig(server=handle.address, token="t", tls_ca=certs.ca, measure_socket=True),
                           client_id="tls-1", fresh_start=True)
        endpoint.start_phase(pb.PhaseRequest(phase=0, budget=4, lr=0.01, weight_decay=5e-4).SerializeToString())
        stats = endpoint.transport_stats()
        endpoint.close()
        assert stats["tls"] and stats["purposes"]["control"]["socket_bytes_up"] > 1000  # TLS handshake included
        with pytest.raises(RemoteError):  # plaintext client against a TLS server
            connect(cfg, ConnectConfig(server=handle.address, token="t", connect_timeout=2), client_id="tls-2",
                    fresh_start=False)
        with pytest.raises(RemoteError):  # the server's certificate is not signed by this CA
            connect(cfg, ConnectConfig(server=handle.address, token="t", tls_ca=certs.other_ca, connect_timeout=2),
                    client_id="tls-3", fresh_start=False)
    finally:
        handle.stop(grace=0.5)
    mutual = start_app(ServeConfig(listen="127.0.0.1:0", tls_cert=certs.server_cert, tls_key=certs.server_key,
                                   tls_client_ca=certs.ca))
    try:
        with pytest.raises(RemoteError):  # no client certificate
            connect(cfg, ConnectConfig(server=mutual.address, tls_ca=certs.ca, connect_timeout=2), client_id="m-1",
                    fresh_start=False)
        mutual_tls = ConnectConfig(server=mutual.address, tls_ca=certs.ca, tls_cert=certs.client_cert,
                                   tls_key=certs.client_key)
        endpoint = connect(cfg, mutual_tls, client_id="m-2", fresh_start=False)
        assert endpoint.transport_stats()["mutual_tls"]
        endpoint.close()
    finally:
        mutual.stop(grace=0.5)


def test_tls_flag_errors_are_user_errors(tmp_path, capsys):
    rc = main(["serve", "--listen", "127.0.0.1:0", "--tls-cert", str(tmp_path / "missing.pem")])
    assert rc == 2
    assert "TLS needs both" in capsys.readouterr().err
    (tmp_path / "x.pem").write_text("not a certificate")
    rc = main(["serve", "--listen", "127.0.0.1:0", "--tls-cert", str(tmp_path / "x.pem"), "--tls-key",
               str(tmp_path / "x.pem")])
    assert rc == 2
    assert "not a PEM file" in capsys.readouterr().err


# ---------------------------------------------------------------- validation of every field
def _tensor(**fields):
    t = pb.EncodedTensor(dtype=pb.FP16, shape=[2, 512, 4, 4], channels=np.arange(4, dtype="<u2").tobytes(),
                         data=np.zeros((2, 4, 4, 4), dtype="<f2").tobytes())
    for key, value in fields.items():
        if key == "shape":
            del t.shape[:]
            t.shape.extend(value)
        else:
            setattr(t, key, value)
    return t


BAD_STEPS = {
    "garbage": (b"\xff\xff\xff\xff", "BAD_MESSAGE"),
    "empty message": (b"", "BAD_MESSAGE"),
    "second hello": (None, "BAD_MESSAGE"),
    "wrong dtype": (train_bytes(codec="fp32"), "BAD_TENSOR"),
    "NaN": (train_bytes(tensor=_tensor(data=np.full((2, 4, 4, 4), np.nan, dtype="<f2").tobytes())), "BAD_TENSOR"),
    "Inf": (train_bytes(tensor=_tensor(data=np.full((2, 4, 4, 4), np.inf, dtype="<f2").tobytes())), "BAD_TENSOR"),
    "channel out of range": (train_bytes(tensor=_tensor(channels=np.array([0, 1, 2, 600], "<u2").tobytes())),
                             "BAD_TENSOR"),
    "channels not ascending": (train_bytes(tensor=_tensor(channels=np.array([3, 1, 2, 0], "<u2").tobytes())),
                               "BAD_TENSOR"),
    "odd channel bytes": (train_bytes(tensor=_tensor(channels=b"\x00\x01\x02")), "BAD_TENSOR"),
    "short data": (train_bytes(tensor=_tensor(data=b"\x00" * 10)), "BAD_TENSOR"),
    "wrong cut shape": (train_bytes(tensor=_tensor(shape=[2, 256, 4, 4])), "BAD_TENSOR"),
    "3-D shape": (train_bytes(tensor=_tensor(shape=[2, 512, 4])), "BAD_TENSOR"),
    "huge batch": (train_bytes(tensor=_tensor(shape=[10 ** 6, 512, 4, 4])), "BAD_TENSOR"),
    "over budget": (train_bytes(channels=(0, 1, 2, 3, 4)), "BUDGET_EXCEEDED"),
    "label out of range": (train_bytes(labels=[3, 12]), "BAD_TENSOR"),
    "labels missing": (train_bytes(labels=[3]), "BAD_TENSOR"),
    "eval NaN": (frame(EVAL, pb.EvalRequest(request_id=1, activations=_tensor(
        data=np.full((2, 4, 4, 4), np.nan, dtype="<f2").tobytes())).SerializeToString()), "BAD_TENSOR"),
    "phase over budget": (frame(PHASE, pb.PhaseRequest(phase=0, budget=513, lr=0.1).SerializeToString()),
                          "BUDGET_EXCEEDED"),
    "phase not in the schedule": (frame(PHASE, pb.PhaseRequest(phase=1, budget=4, lr=0.1).SerializeToString()),
                                  "BAD_MESSAGE"),
    "phase 2^31": (frame(PHASE, pb.PhaseRequest(phase=1 << 31, budget=4, lr=0.1).SerializeToString()), "BAD_MESSAGE"),
    "step id 2^63": (train_bytes(step_id=1 << 63), "BAD_MESSAGE"),
    "checkpoint step id 2^63": (frame(CHECKPOINT, spb.CheckpointRequest(step_id=1 << 63).SerializeToString()),
                                "BAD_MESSAGE"),
    "lr scale above 1": (train_bytes(lr_scale=1.5), "BAD_MESSAGE"),
    "negative lr scale": (train_bytes(lr_scale=-0.1), "BAD_MESSAGE"),
    "NaN lr scale": (train_bytes(lr_scale=float("nan")), "BAD_MESSAGE"),
    "phase NaN lr": (frame(PHASE, pb.PhaseRequest(phase=0, budget=4, lr=float("nan")).SerializeToString()),
                     "BAD_MESSAGE"),
}


def test_every_malformed_message_gets_a_clear_status_and_the_server_goes_on(server):
    cfg = small_config()
    for i, (name, (message, expected)) in enumerate(BAD_STEPS.items()):
        hello = hello_bytes(cfg, f"bad-{i}")
        message = hello if message is None else message
        replies, exc = raw_stream(server.address, [hello, PHASE0, message])
        assert exc is not None, name
        assert len(replies) == 2, name  # Welcome and PhaseReply came back
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), (name, exc)
        assert reason(exc) == expected, (name, exc.details())
        assert exc.details(), name
    # the server still trains after all that
    replies, exc = raw_stream(server.address, [hello_bytes(cfg, "good"), PHASE0, train_bytes(1)])
    assert exc is None and unframe(replies[-1])[0] == TRAIN


def test_handshake_and_ordering_errors(server):
    cfg = small_config()
    cases = [
        ([train_bytes(1)], grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h1", protocol_version=99)], grpc.StatusCode.FAILED_PRECONDITION, "VERSION_MISMATCH"),
        ([hello_bytes(cfg, "h2", fingerprint="0123456789abcdef")], grpc.StatusCode.INVALID_ARGUMENT,
         "FINGERPRINT_MISMATCH"),
        ([hello_bytes(cfg, "h3", config_json="{not json")], grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h4", config_json='{"no_such_option": 1}')], grpc.StatusCode.INVALID_ARGUMENT,
         "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h4a", config_json="[" * 100_000, fingerprint="")], grpc.StatusCode.INVALID_ARGUMENT,
         "BAD_HANDSHAKE"),  # nested too deep to parse: a refusal, not an internal error
        ([hello_bytes(cfg, "h4b", config_json="{" + " " * 70_000 + "}", fingerprint="")],
         grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "bad id!")], grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h5", dtype_up=pb.INT8)], grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h6", wire_shape=[256, 4, 4])], grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h7", max_budget=1000)], grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h8", num_classes=1)], grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h13", config_json=json.dumps({**cfg.to_dict(), "input_size": 100_000}), fingerprint="")],
         grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),  # would need terabytes: refused before anything is built
        ([hello_bytes(cfg, "h14", config_json='{"model": "no-such-model"}', fingerprint="")],
         grpc.StatusCode.INVALID_ARGUMENT, "BAD_HANDSHAKE"),
        ([hello_bytes(cfg, "h9"), PHASE0, train_bytes(2), train_bytes(2, n=3)], grpc.StatusCode.FAILED_PRECONDITION,
         "STEP_OUT_OF_ORDER"),  # same step id, other content
        ([hello_bytes(cfg, "h10"), PHASE0, train_bytes(5), train_bytes(3)], grpc.StatusCode.FAILED_PRECONDITION,
         "STEP_OUT_OF_ORDER"),
    ]
    for messages, code, expected in cases:
        _, exc = raw_stream(server.address, messages)
        assert exc is not None and exc.code() == code and reason(exc) == expected, (expected, exc)
    # the same step again (a retry) is answered from memory, not applied twice
    replies, exc = raw_stream(server.address, [hello_bytes(cfg, "h12"), PHASE0, train_bytes(1), train_bytes(1)])
    assert exc is None and replies[2] == replies[3]
    other = small_config(seed=123)  # a half of its own, no phase yet
    _, exc = raw_stream(server.address, [hello_bytes(other, "h11", fresh=True), train_bytes(1)])
    assert reason(exc) == "NO_PHASE"


def test_oversized_messages_are_refused_by_the_size_limit():
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_message_mb=0.25))
    try:
        cfg = small_config()
        big = train_bytes(1, n=32)  # the largest batch this config allows
        replies, exc = raw_stream(handle.address, [hello_bytes(cfg, "big", fresh=True), PHASE0, big])
        assert exc is None, exc
        huge = frame(TRAIN, b"\x00" * (512 * 1024))
        _, exc = raw_stream(handle.address, [hello_bytes(cfg, "huge"), PHASE0, huge])
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        replies, exc = raw_stream(handle.address, [hello_bytes(cfg, "big"), train_bytes(2)])
        assert exc is None and len(replies) == 2  # still serving
    finally:
        handle.stop(grace=0.5)


def test_generated_stub_speaks_the_protocol(server):
    """A client built only from service.proto (the generated stub) can train and describe."""
    cfg = small_config()
    with grpc.insecure_channel(server.address) as channel:
        stub = service_pb2_grpc.SplitPruneStub(channel)
        hello = make_hello(cfg, "stub-client", False, num_classes=10, in_channels=1)
        msgs = [spb.ClientMessage(hello=hello),
                spb.ClientMessage(phase=pb.PhaseRequest(phase=0, budget=4, lr=0.01, weight_decay=5e-4)),
                spb.ClientMessage(train=pb.TrainRequest.FromString(unframe(train_bytes(1))[1]))]
        replies = list(stub.Train(iter(msgs), timeout=60))
        assert [r.WhichOneof("body") for r in replies] == ["welcome", "phase", "train"]
        assert replies[0].welcome.wire_shape == [512, 4, 4]
        grad = replies[2].train.gradient
        assert list(grad.shape) == [2, 512, 4, 4] and len(grad.channels) == 8 and grad.dtype == pb.FP32
        info = stub.Describe(spb.DescribeRequest(fingerprint=cfg.fingerprint()), timeout=30)
        assert info.num_classes == 10 and len(info.weights_sha256) == 64


def test_pushed_state_is_validated(server):
    cfg = small_config(seed=7)
    endpoint = connect(cfg, server.address, client_id="pusher", fresh_start=True)
    try:
        state = state_from_bytes(endpoint.fetch_state()[1])
        assert endpoint.push_state(state, 0).applied
        bad = dict(state)
        name = next(k for k in bad if k.endswith("weight"))
        for broken, expected in [({**bad, name: bad[name][:1]}, "shape"),
                                 ({**bad, name: torch.full_like(bad[name], float("nan"))}, "NaN"),
                                 ({**bad, "server.extra": torch.zeros(1)}, "does not have"),
                                 ({k: v for k, v in bad.items() if k != name}, "lacks")]:
            with pytest.raises(RemoteError) as info:
                endpoint.push_state(broken, 0)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and expected in str(info.value)
        with grpc.insecure_channel(server.address) as ch:  # not a safetensors file
            first = spb.StateChunk(session_id=endpoint.welcome.session_id, total_bytes=5, data=b"hello")
            with pytest.raises(grpc.RpcError) as rpc:
                ch.stream_unary(PUSH_STATE_METHOD)(iter([first.SerializeToString()]), timeout=10)
            assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            first = spb.StateChunk(session_id="nope", total_bytes=5, data=b"hello")
            with pytest.raises(grpc.RpcError) as rpc:
                ch.stream_unary(PUSH_STATE_METHOD)(iter([first.SerializeToString()]), timeout=10)
            assert rpc.value.code() == grpc.StatusCode.NOT_FOUND
            huge = spb.StateChunk(session_id=endpoint.welcome.session_id, total_bytes=1 << 40, data=b"x")
            with pytest.raises(grpc.RpcError) as rpc:
                ch.stream_unary(PUSH_STATE_METHOD)(iter([huge.SerializeToString()]), timeout=10)
            assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert endpoint.fetch_state()[1] == state_to_bytes(state)  # unchanged by the refusals
    finally:
        endpoint.close()


# ---------------------------------------------------------------- inference
def test_split_inference_concurrent_requests_and_budget_checks(tmp_path, server):
    cfg = small_config(seed=3)
    endpoint = connect(cfg, server.address, out=str(tmp_path / "run"))
    try:
        trainer = Trainer(cfg, tmp_path / "run", endpoint=endpoint, show_progress=False)
        trainer.run()
    finally:
        endpoint.close()
    device, loader = trainer.device, trainer.parts.test_loader
    x, y = next(iter(loader))
    client = InferenceClient(server.address, cfg.fingerprint())
    try:
        info = client.describe()
        assert main(["pull", "--server", server.address, "--checkpoint", str(tmp_path / "run"),
                     "--out", str(tmp_path / "whole")]) == 0
        model = load_file(str(tmp_path / "whole" / "model.safetensors"))
        assert info.weights_sha256 == weights_digest(model)  # the server half is the checkpoint's
        link = client.link(4)
        reference, _, _ = device.predict(x, link, 4)
        results, errors = [], []

        def worker():
            try:
                for _ in range(3):
                    results.append(device_predict(x))
            except Exception as exc:  # noqa: BLE001
                errors.append(exc)

        lock = threading.Lock()

        def device_predict(batch):
            with lock:  # the device half is one module; the server calls overlap
                _, request = device._encode(device.half(batch), device.kept_channels(4))
                data = pb.EvalRequest(request_id=1, activations=request).SerializeToString()
            return pb.EvalReply.FromString(client.infer(data, 4))

        device.half.eval()
        threads = [threading.Thread(target=worker) for _ in range(8)]
        with torch.no_grad():
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert not errors and len(results) == 24
        first = results[0].predictions.data
        assert all(r.predictions.data == first for r in results)
        assert np.frombuffer(first, "u1").tolist() == reference.tolist()
        with torch.no_grad():
            _, request = device._encode(device.half(x), device.kept_channels(4))
        data = pb.EvalRequest(request_id=1, activations=request).SerializeToString()
        for budget in (0, 3, 513):
            with pytest.raises(RemoteError) as exc_info:
                client.infer(data, budget)
            assert exc_info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        with grpc.insecure_channel(server.address) as ch:
            with pytest.raises(grpc.RpcError) as rpc:
                ch.unary_unary(INFER_METHOD)(spb.InferRequest(fingerprint="ffffffffffffffff", budget=4).SerializeToString(),
                                             timeout=10)
            assert rpc.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        client.close()


def test_infer_command_prints_accuracy_and_latency(tmp_path, capsys):
    cfg = small_config(seed=5)
    Trainer(cfg, tmp_path / "run", show_progress=False).run()
    handle = start_app(ServeConfig(listen="127.0.0.1:0", model=(str(tmp_path / "run"),)))
    try:
        out = tmp_path / "infer.json"
        rc = main(["infer", "--server", handle.address, "--checkpoint", str(tmp_path / "run"), "--test-subset", "16",
                   "--batch-size", "4", "--out", str(out), "--measure-socket"])
        text = capsys.readouterr().out
        assert rc == 0 and "test accuracy" in text and "p99" in text
        result = json.loads(out.read_text())
        local = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert result["test_samples"] == 16 and result["requests"] == 4
        assert result["test_accuracy"] == pytest.approx(local["final_test_accuracy"], abs=0.5)
        assert result["transport"]["purposes"]["evaluation"]["socket_bytes_up"] > result["payload_bytes_up"]
        # a model hosted with --model is for inference only
        with pytest.raises(RemoteError) as info:
            connect(cfg, handle.address, client_id="x", fresh_start=True)
        assert info.value.reason == "READ_ONLY_MODEL"
        other = tmp_path / "other"
        Trainer(small_config(seed=5, epochs=2), other, show_progress=False).run()
        rc = main(["infer", "--server", handle.address, "--checkpoint", str(other), "--test-subset", "4"])
        assert rc == 2 and "UNKNOWN_MODEL" in capsys.readouterr().err
    finally:
        handle.stop(grace=0.5)


def test_serve_refuses_bad_flags(capsys):
    assert main(["serve", "--listen", "nonsense"]) == 2
    assert "bad address" in capsys.readouterr().err
    assert main(["serve", "--listen", "127.0.0.1:0", "--max-sessions", "0"]) == 2
    assert main(["serve", "--listen", "127.0.0.1:0", "--max-batch", "0"]) == 2
    assert main(["serve", "--listen", "127.0.0.1:0", "--max-request-mb", "-1"]) == 2
    assert main(["serve", "--listen", "127.0.0.1:0", "--model", "/no/such/checkpoint"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    from splitprune.bench.core.processes import free_port

    rc = main(["train", "--method", "ca", "--epochs", "1", "--train-subset", "16", "--out", str(tmp_path / "x"),
               "--server", f"127.0.0.1:{free_port()}", "--connect-timeout", "1", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot reach the server" in err and "Traceback" not in err


# ---------------------------------------------------------------- typed refusals and server limits
def test_every_error_reason_has_one_refusal_class():
    from splitprune.wire.refusals import REFUSALS

    names = set(spb.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED", "INTERNAL_ERROR"}
    assert set(REFUSALS) == names
    for reason_name, cls in REFUSALS.items():
        assert cls.reason == reason_name and hasattr(grpc.StatusCode, cls.status)


def test_server_batch_limit_is_enforced_at_the_handshake_and_per_request():
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_batch=20))
    try:
        _, exc = raw_stream(handle.address, [hello_bytes(small_config(), "b1", fresh=True)])  # test batches of 32
        assert reason(exc) == "BAD_HANDSHAKE" and "--max-batch" in exc.details()
        cfg = small_config(test_batch_size=16)
        replies, exc = raw_stream(handle.address, [hello_bytes(cfg, "b2", fresh=True), PHASE0, train_bytes(1, n=20),
                                                   train_bytes(2, n=21)])
        assert len(replies) == 3 and reason(exc) == "BAD_TENSOR" and "limit of 20" in exc.details()
        info = handle.service.halves[cfg.fingerprint()]
        assert info.max_batch == 20
    finally:
        handle.stop(grace=0.5)


def test_training_batches_are_sized_for_every_forward_the_objective_keeps():
    # the any-budget sandwich keeps three forwards of the server half for its backward, an evaluation none:
    # its training limit is a third of the evaluation one's share of the memory; a gated half has one limit
    from math import prod

    from splitprune.server.hosting import HostedHalf

    memory = 32 << 20
    gated = HostedHalf(small_config(), 10, 1, request_memory=memory)
    assert gated.max_train_batch == gated.max_batch == memory // gated.sample_bytes
    nested_cfg = small_config(method="anybudget")
    nested = HostedHalf(nested_cfg, 10, 1, request_memory=memory)
    cut = 8 * prod(nested.geometry.wire_shape)
    assert nested.worker.objective.passes == 3
    assert nested.train_sample_bytes - cut == 3 * (nested.sample_bytes - cut)
    n = nested.max_train_batch
    assert n == memory // nested.train_sample_bytes and 16 <= n < nested.max_batch / 2

    # training batches of 16 no longer fit
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_request_mb=(memory // 2) / 2**20))
    try:
        _, exc = raw_stream(handle.address, [hello_bytes(nested_cfg, "t1", fresh=True)])
        assert reason(exc) == "BAD_HANDSHAKE" and "training batch of 16" in exc.details()
    finally:
        handle.stop(grace=0.5)
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_request_mb=(memory) / 2**20))
    try:
        evaluation = frame(EVAL, pb.EvalRequest(request_id=1, activations=_prefix(n + 1)).SerializeToString())
        replies, exc = raw_stream(handle.address, [
            hello_bytes(nested_cfg, "t2", fresh=True), PHASE0, train_bytes(1, n=n, tensor=_prefix(n)),
            evaluation, train_bytes(2, n=n + 1, tensor=_prefix(n + 1))])
        assert len(replies) == 4 and reason(exc) == "BAD_TENSOR" and f"limit of {n}" in exc.details()
        with grpc.insecure_channel(handle.address) as ch:
            info = spb.DescribeReply.FromString(ch.unary_unary(DESCRIBE_METHOD)(
                spb.DescribeRequest(fingerprint=nested_cfg.fingerprint()).SerializeToString(), timeout=30))
        assert (info.max_batch, info.max_train_batch) == (nested.max_batch, n)
    finally:
        handle.stop(grace=0.5)


def _prefix(n):
    """n samples of the first 4 channels, as a prefix message."""
    values = torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(n))
    return ChannelCodec("fp16").compress(values, None, 512, prefix=True)


def test_client_records_per_half_are_bounded(server):
    from splitprune.server import hosting

    cfg = small_config()  # the module's server already hosts as many halves as it may
    replies, exc = raw_stream(server.address, [hello_bytes(cfg, "keeper")])
    assert exc is None
    half = server.service.halves[cfg.fingerprint()]
    with half.mutex:
        before = dict(half.clients)
        half.clients.clear()
        for i in range(hosting.MAX_CLIENT_RECORDS + 10):
            half.record(f"c{i}").last_step = i + 1
        assert len(half.clients) == hosting.MAX_CLIENT_RECORDS
        assert "c9" not in half.clients and half.clients["c10"].last_step == 11
        half.clients.clear()
        half.clients.update(before)


# ---------------------------------------------------------------- the server's time in a reply
def test_every_training_reply_carries_the_servers_time(server):
    endpoint = connect(small_config(), ConnectConfig(server=server.address), client_id="server-time",
                       fresh_start=True)
    try:
        endpoint.start_phase(unframe(PHASE0)[1])
        for step in (1, 2):
            start = time.perf_counter()
            reply = pb.TrainReply.FromString(endpoint.train(unframe(train_bytes(step, n=8))[1]))
            measured_us = (time.perf_counter() - start) * 1e6
            assert reply.step_id == step and 0 < reply.server_us <= measured_us, (reply.server_us, measured_us)
    finally:
        endpoint.close()


def test_a_server_time_that_cannot_be_true_is_refused():
    assert server_seconds(0, 0.0, "TrainReply") == 0.0     # a server too quick for its clock to tick
    assert server_seconds(0.004, 0.005, "InferReply") == 0.004
    assert server_seconds(0.0055, 0.005, "InferReply") == 0.0055   # within the clocks' slack of the round trip
    bad = {math.nan: "not a finite number", -1.0: "not a finite number", math.inf: "not a finite number",
           0.050: "longer than the 20.000 ms the device waited", MAX_SERVER_SECONDS + 1: "over the limit of 600 s"}
    for seconds, words in bad.items():
        with pytest.raises(ProtocolError, match=f"bad server time in the InferItemReply: .*{words}"):
            server_seconds(seconds, 0.020 if seconds == 0.050 else 1e4, "InferItemReply")
