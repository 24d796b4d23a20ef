"""Health checking and Prometheus metrics of a real server on loopback: the standard grpc.health.v1 service
(SERVING, then NOT_SERVING once it drains), and GET /metrics counting real training and inference requests."""
import queue
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from test_transport import PHASE0, hello_bytes, small_config, train_bytes

from splitprune.cli import main
from splitprune.compression import ChannelCodec
from splitprune.errors import UserError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.wire.envelopes import AUTH_KEY, ERROR_KEY, INFER_METHOD, SERVICE, TRAIN_METHOD

TOKEN = "metrics-test-token"
AUTH = ((AUTH_KEY, f"Bearer {TOKEN}"),)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def scrape(address: str) -> dict:
    """GET /metrics over HTTP, parsed: {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def check(channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


class Stream:
    """A Train stream whose messages the test sends one at a time."""

    def __init__(self, channel, metadata=AUTH) -> None:
        self.outbox = queue.Queue()
        self.replies = channel.stream_stream(TRAIN_METHOD)(iter(self.outbox.get, None), metadata=metadata,
                                                           timeout=60)

    def send(self, data: bytes) -> bytes:
        self.outbox.put(data)
        return next(self.replies)

    def close(self) -> None:
        self.outbox.put(None)


@pytest.fixture
def server():
    handle = start_app(ServeConfig(listen="127.0.0.1:0", token=TOKEN, metrics="127.0.0.1:0"))
    yield handle
    handle.stop(grace=0.5)


def test_health_answers_serving_without_the_token_and_not_serving_once_draining(server):
    with grpc.insecure_channel(server.address) as channel:
        assert check(channel) == SERVING and check(channel, SERVICE) == SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            check(channel, "no.such.Service")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        # Watch keeps a stream open: it needs the token, unlike Check (a kubelet probe sends no metadata)
        with pytest.raises(grpc.RpcError) as watch:
            next(health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert watch.value.code() == grpc.StatusCode.UNAUTHENTICATED
        watcher = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=SERVICE),
                                                            metadata=AUTH, timeout=30)
        assert next(watcher).status == SERVING
        assert scrape(server.metrics_address)[("splitprune_draining", ())] == 0
        server.drain()  # what stop() and SIGTERM begin with
        assert check(channel) == NOT_SERVING and check(channel, SERVICE) == NOT_SERVING
        assert next(watcher).status == NOT_SERVING  # a watcher hears it at once
        watcher.cancel()
    assert scrape(server.metrics_address)[("splitprune_draining", ())] == 1


def test_a_malformed_health_request_is_refused_cleanly_and_logged_within_bounds(server, caplog):
    garbage = b"\x0a\xff\xff\xff\xff\x0f"  # field 1 (service) claiming a 4 GB string
    with grpc.insecure_channel(server.address) as channel:
        raw = channel.unary_unary("/grpc.health.v1.Health/Check")
        for _ in range(50):
            with pytest.raises(grpc.RpcError) as refused:
                raw(garbage, timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
        with pytest.raises(grpc.RpcError) as refused:
            next(watch(garbage, metadata=AUTH, timeout=10))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert check(channel) == SERVING  # and it still answers
    logged = [r.getMessage() for r in caplog.records]
    assert not any("Traceback" in m or "deserializ" in m for m in logged) and not any(r.exc_info for r in caplog.records)
    assert sum("malformed health request" in m for m in logged) <= 20  # the bounded log's burst


def test_metrics_count_real_training_and_inference_requests(server):
    before = scrape(server.metrics_address)
    assert before[("splitprune_steps_total", ())] == 0
    assert before[("splitprune_requests_total", (("kind", "train"), ("outcome", "ok")))] == 0
    cfg = small_config()
    step = train_bytes(1, n=2)
    with grpc.insecure_channel(server.address) as channel:
        stream = Stream(channel)
        hello = hello_bytes(cfg, "observed", fresh=True)
        welcome = stream.send(hello)
        phase = stream.send(PHASE0)
        reply = stream.send(step)
        during = scrape(server.metrics_address)
        tensor = ChannelCodec("fp16").compress(torch.randn(3, 4, 4, 4), torch.tensor([0, 1, 2, 3]), 512)
        infer = spb.InferRequest(fingerprint=cfg.fingerprint(), budget=4,
                                 eval=pb.EvalRequest(request_id=1, activations=tensor)).SerializeToString()
        answer = channel.unary_unary(INFER_METHOD)(infer, metadata=AUTH, timeout=30)
        with pytest.raises(grpc.RpcError):  # a refused request: the same step id again, different content
            stream.send(train_bytes(1, n=3))
        stream.close()
        server.drain()
        with pytest.raises(grpc.RpcError) as refused:  # a draining server takes no new session
            Stream(channel).send(hello)
        assert dict(refused.value.trailing_metadata())[ERROR_KEY] == "SHUTTING_DOWN"
        assert check(channel, SERVICE) == NOT_SERVING
    after = scrape(server.metrics_address)

    def requests(kind, outcome="ok"):
        return after[("splitprune_requests_total", (("kind", kind), ("outcome", outcome)))]

    assert during[("splitprune_sessions_attached", ())] == 1 and during[("splitprune_sessions_total", ())] == 1
    assert during[("splitprune_halves_hosted", (("role", "trainable"),))] == 1
    assert after[("splitprune_steps_total", ())] == 1
    assert requests("hello") == requests("phase") == requests("train") == requests("infer") == 1
    assert requests("train", "STEP_OUT_OF_ORDER") == 1 and requests("hello", "SHUTTING_DOWN") == 1
    assert after[("splitprune_request_seconds_count", (("kind", "train"),))] == 2
    assert after[("splitprune_request_seconds_bucket", (("kind", "train"), ("le", "10.0")))] == 2
    # message bytes exactly as sent and received, by purpose
    assert after[("splitprune_message_bytes_total", (("direction", "in"), ("purpose", "training")))] == \
        len(step) + len(train_bytes(1, n=3))
    assert after[("splitprune_message_bytes_total", (("direction", "out"), ("purpose", "training")))] == len(reply)
    assert after[("splitprune_message_bytes_total", (("direction", "in"), ("purpose", "evaluation")))] == len(infer)
    assert after[("splitprune_message_bytes_total", (("direction", "out"), ("purpose", "evaluation")))] == \
        len(answer)
    assert after[("splitprune_message_bytes_total", (("direction", "in"), ("purpose", "control")))] == \
        2 * len(hello) + len(PHASE0)
    assert after[("splitprune_message_bytes_total", (("direction", "out"), ("purpose", "control")))] == \
        len(welcome) + len(phase)
    # each server has its own registry: a second one in this process starts from zero
    other = start_app(ServeConfig(listen="127.0.0.1:0", metrics="127.0.0.1:0"))
    try:
        fresh = scrape(other.metrics_address)
        assert fresh[("splitprune_steps_total", ())] == 0
        assert fresh[("splitprune_requests_total", (("kind", "train"), ("outcome", "ok")))] == 0
    finally:
        other.stop(grace=0.5)


def test_metrics_flag_and_a_taken_metrics_port_are_clear_errors(server, capsys):
    host, port = server.metrics_address.rsplit(":", 1)
    with pytest.raises(UserError, match="cannot serve metrics"):
        start_app(ServeConfig(listen="127.0.0.1:0", metrics=server.metrics_address))
    assert main(["serve", "--listen", "127.0.0.1:0", "--metrics-port", f"{host}:{port}"]) == 2
    assert main(["serve", "--listen", "127.0.0.1:0", "--metrics-port", "not-a-port"]) == 2
    err = capsys.readouterr().err
    assert "cannot serve metrics" in err and "Traceback" not in err


def test_metrics_are_off_by_default():
    from splitprune.cli import build_parser
    from splitprune.flags import flag_values

    assert ServeConfig(**flag_values(build_parser("serve").parse_args(["serve"]), ServeConfig)).metrics is None
    handle = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        assert handle.metrics_address is None
    finally:
        handle.stop(grace=0.5)
