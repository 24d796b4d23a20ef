"""Inference sessions on the server's TCP session port (`serve --session-port`, docs/protocol.md 5.2): a real
`splitprune serve` on loopback, an independent proxy counting the socket's bytes, the answers equal to unary
Infer's, bad items in the middle of a session, bad openings, garbage and oversized frames, too many sessions."""
import json
import socket
import time

import grpc
import pytest

from splitprune.bench.core.processes import ServeSubprocess, free_port
from splitprune.bench.paper.single import encoded_samples
from splitprune.link.profile import LinkProfile
from splitprune.link.proxy import LinkProxy
from splitprune.proto import service_pb2 as spb
from splitprune.wire.frames import MAGIC, frame, read_frame, varint
from splitprune.wire.session_socket import SocketSession, on_port
from splitprune.wire.stream import SessionLost, StreamRefused, item_data, item_message, open_message
from test_stream import _unary, check_answers_in_turn

REQUESTS = 24
TOKEN = "s3cret"


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    run, _ = exported
    session_port = free_port()
    proc = ServeSubprocess(free_port(), "--model", str(run), "--max-sessions", "2", "--token", TOKEN,
                           "--session-port", str(session_port),
                           log_path=tmp_path_factory.mktemp("serve") / "serve.log").start()
    yield run, proc, ("127.0.0.1", session_port)
    proc.stop()


def _opened(address, meta, tensor, token=TOKEN) -> SocketSession:
    return SocketSession(address, open_message(meta["fingerprint"], int(meta["budget"]), tensor), token)


@pytest.mark.parametrize("dtype", ["ec", "int4"])
def test_a_session_answers_like_unary_infer_with_one_byte_of_framing_and_survives_bad_items(served, dtype):
    run, proc, address = served
    meta, tensors = encoded_samples(str(run), dtype, REQUESTS)
    direct = grpc.insecure_channel(proc.address)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    with LinkProxy(("127.0.0.1", 0), address, LinkProfile()) as proxy:
        session = _opened(proxy.address, meta, tensors[0])
        assert list(session.opened.wire_shape) == meta["wire_shape"]
        before = proxy.counters()
        assert before.bytes_up == session.open_bytes   # MAGIC + token and the InferOpen, a varint each
        for i, tensor in enumerate(tensors):
            counts = proxy.counters()
            result = session.infer(item_data(tensor))
            expected = _unary(direct, meta["fingerprint"], int(meta["budget"]), tensor, auth)
            assert result.reply.labels == expected                                # the same answer
            after = proxy.counters()
            item = item_message(item_data(tensor), 1)
            assert after.bytes_up - counts.bytes_up == len(item) + 1              # the item and its length
            assert after.bytes_down - counts.bytes_down == result.bytes_down + 1
            if i == REQUESTS // 2:  # bad items in the middle: each refused alone, the session goes on
                for bad, reason in ((b"\x00" * 3, "BAD_TENSOR"), (item_data(tensor)[:-1], "BAD_TENSOR"),
                                    (b"\xff" * 40, "BAD_TENSOR")):
                    with pytest.raises(StreamRefused, match=reason):
                        session.infer(bad)
                with pytest.raises(StreamRefused, match="TOO_LARGE"):
                    session.infer(item_data(tensor), samples=10**6)
        session.close()
    direct.close()
    if dtype == "ec":  # issue 24's single-request targets, on the socket
        assert result.bytes_up + 1 <= 32 and result.bytes_down + 1 <= 24


def _raw(address, *frames_: bytes) -> socket.socket:
    sock = socket.create_connection(address, timeout=30)
    sock.sendall(b"".join(frames_))
    return sock


def _refusal(sock: socket.socket) -> str:
    answer = spb.InferOpened.FromString(read_frame(sock, 1 << 16))
    assert read_frame(sock, 1 << 16) is None   # and the connection is closed
    sock.close()
    return spb.ErrorReason.Name(answer.error)


def _open_when_free(address, meta, tensor, wait_s: float = 10.0) -> SocketSession:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            return _opened(address, meta, tensor)
        except StreamRefused as exc:
            if exc.reason != "SERVER_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_bad_openings_garbage_and_too_many_sessions_are_refused_and_the_server_serves_on(served):
    run, proc, address = served
    meta, tensors = encoded_samples(str(run), "ec", 1)
    good = open_message(meta["fingerprint"], int(meta["budget"]), tensors[0]).SerializeToString()
    hello = frame(MAGIC + TOKEN.encode())
    assert _refusal(_raw(address, frame(MAGIC + b"wrong"), frame(good))) == "UNAUTHENTICATED_TOKEN"
    assert _refusal(_raw(address, frame(MAGIC))) == "UNAUTHENTICATED_TOKEN"
    assert _refusal(_raw(address, b"GET / HTTP/1.1\r\n" + b"x" * 99)) == "BAD_HANDSHAKE"  # not a session
    assert _refusal(_raw(address, varint(10**6))) == "TOO_LARGE"                   # an opening over 4 KiB
    assert _refusal(_raw(address, hello, frame(b"\xff" * 9))) == "BAD_MESSAGE"     # not an InferOpen
    with pytest.raises(StreamRefused, match="UNKNOWN_MODEL"):
        _opened(address, {"fingerprint": "0" * 16, "budget": 1}, tensors[0])
    with pytest.raises(StreamRefused, match="BAD_TENSOR"):   # other entropy tables than the model's
        bad = open_message(meta["fingerprint"], int(meta["budget"]), tensors[0])
        bad.tables ^= 1
        SocketSession(address, bad, TOKEN)
    # an item announcing more than the server's message limit: answered TOO_LARGE, and that session ends
    sock = _raw(address, hello, frame(good), varint(2**34))
    assert not spb.InferOpened.FromString(read_frame(sock, 1 << 16)).error
    assert spb.ErrorReason.Name(spb.InferItemReply.FromString(read_frame(sock, 1 << 16)).error) == "TOO_LARGE"
    assert read_frame(sock, 1 << 16) is None
    sock.close()
    sessions = [_opened(address, meta, tensors[0]) for _ in range(2)]   # --max-sessions 2
    with pytest.raises(StreamRefused, match="SERVER_BUSY"):
        _opened(address, meta, tensors[0])
    assert sessions[0].infer(item_data(tensors[0])).reply.labels        # the open ones still serve
    sessions[0].close()
    sessions[0] = _opened(address, meta, tensors[0])   # a closed session's slot is free once its close returns
    for session in sessions:
        session.close()
    with LinkProxy(("127.0.0.1", 0), address, LinkProfile()) as proxy:
        lost = _opened(proxy.address, meta, tensors[0])
    with pytest.raises(SessionLost):   # the connection went away: the client says so, nothing hangs
        lost.infer(item_data(tensors[0]))
    lost.close()
    fresh = _open_when_free(address, meta, tensors[0])   # room again once the server saw the lost one go
    assert fresh.infer(item_data(tensors[0])).reply.labels
    fresh.close()


def test_splitprune_infer_on_the_session_port_answers_as_on_an_infer_stream(served, tmp_path, capsys):
    from splitprune.cli import main

    run, proc, _ = served
    results = {}
    for mode, more in (("stream", []), ("tcp", ["--tcp-session"])):
        out = tmp_path / f"{mode}.json"
        assert main(["infer", "--checkpoint", str(run), "--server", proc.address, "--token", TOKEN, "--dtype-up",
                     "ec", "--test-subset", "16", "--warmup", "1", *more, "--out", str(out)]) == 0
        results[mode] = json.loads(out.read_text())
    capsys.readouterr()
    assert results["tcp"]["tcp_session"] and results["tcp"]["test_accuracy"] == results["stream"]["test_accuracy"]
    assert main(["infer", "--checkpoint", str(run), "--server", proc.address, "--tcp-session", "--no-stream"]) == 2
    assert "--tcp-session opens streaming sessions" in capsys.readouterr().err


def test_a_client_asking_for_a_session_port_the_server_lacks_gets_one_clear_message(exported, tmp_path, capsys):
    from splitprune.cli import main

    run, _ = exported
    proc = ServeSubprocess(free_port(), "--model", str(run), log_path=tmp_path / "serve.log").start()
    try:
        assert main(["infer", "--checkpoint", str(run), "--server", proc.address, "--tcp-session",
                     "--test-subset", "2"]) == 2
        err = capsys.readouterr().err
        assert "announces no TCP session port" in err and "Traceback" not in err
    finally:
        proc.stop()


def test_answers_not_waited_for_are_read_in_turn_on_the_session_port(served):
    """--hedge abandons answers on a session: on the TCP port too, each answer goes to its own item, in order."""
    run, proc, address = served
    meta, tensors = encoded_samples(str(run), "int4", 12)
    direct = grpc.insecure_channel(proc.address)
    auth = (("authorization", f"Bearer {TOKEN}"),)
    expected = [_unary(direct, meta["fingerprint"], int(meta["budget"]), t, auth) for t in tensors]
    direct.close()
    check_answers_in_turn(_opened(address, meta, tensors[0]), tensors, expected)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(max_size=64), min_size=1, max_size=6))
def test_garbage_after_a_valid_opening_never_breaks_the_server(served, garbage):
    """Raw bytes after a valid opening (frames or not, lengths of any size): the connection gets answers or is
    closed; the server logs no failure and opens the next session."""
    run, proc, address = served
    meta, tensors = _samples(str(run))
    good = open_message(meta["fingerprint"], int(meta["budget"]), tensors[0]).SerializeToString()
    sock = _raw(address, frame(MAGIC + TOKEN.encode()), frame(good), *garbage)
    sock.settimeout(0.2)
    try:
        while read_frame(sock, 1 << 20) is not None:
            pass
    except (OSError, ValueError):
        pass   # waiting for the rest of a frame, or closed: either way this connection is done
    sock.close()
    for _ in range(50):   # the server notices the close before it has room for the next session
        try:
            fresh = _opened(address, meta, tensors[0])
            break
        except StreamRefused as exc:
            assert "SERVER_BUSY" in str(exc)
            time.sleep(0.05)
    assert fresh.infer(item_data(tensors[0])).reply.labels
    fresh.close()
    assert "Traceback" not in proc.log() and "failed" not in proc.log()


_cache: dict = {}


def _samples(run: str):
    if run not in _cache:
        _cache[run] = encoded_samples(run, "ec", 1)
    return _cache[run]


def test_each_replica_of_a_tier_serves_sessions_on_its_own_port(exported, tmp_path):
    from splitprune.bench.systems.scale_replicas import _free_ports, start_tier
    from splitprune.wire.envelopes import DESCRIBE_METHOD

    run, _ = exported
    first = _free_ports(2)
    tier, addresses = start_tier(2, tmp_path / "state", "--model", str(run), "--session-port", str(first),
                                 log_path=tmp_path / "tier.log")
    try:
        meta, tensors = encoded_samples(str(run), "ec", 1)
        for rank, address in enumerate(addresses):
            channel = grpc.insecure_channel(address)
            described = spb.DescribeReply.FromString(channel.unary_unary(DESCRIBE_METHOD)(
                spb.DescribeRequest(fingerprint=meta["fingerprint"]).SerializeToString(), timeout=30))
            channel.close()
            assert described.session_port == first + rank   # replica r: --session-port + r
            session = SocketSession(("127.0.0.1", first + rank), open_message(meta["fingerprint"],
                                                                               int(meta["budget"]), tensors[0]))
            assert session.infer(item_data(tensors[0])).reply.labels
            session.close()
        assert f"sessions on port {first + 1}" in tier.log()
    finally:
        tier.stop()


def test_the_port_is_asked_for_once_per_model_and_again_after_a_session_failed_to_connect(served):
    run, proc, address = served
    meta, tensors = encoded_samples(str(run), "ec", 1)
    asked = []

    def address_of(fingerprint: str):
        asked.append(fingerprint)
        return ("127.0.0.1", free_port()) if len(asked) == 1 else address   # first: a port nobody listens on

    open_session = on_port(address_of, TOKEN)
    opening = open_message(meta["fingerprint"], int(meta["budget"]), tensors[0])
    with pytest.raises(SessionLost, match="cannot connect"):
        open_session(opening)
    sessions = [open_session(opening) for _ in range(2)]
    assert asked == [meta["fingerprint"]] * 2
    for session in sessions:
        assert session.infer(item_data(tensors[0])).reply.labels
        session.close()
