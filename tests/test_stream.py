"""The streaming inference session (InferStream, issue 24 item 3): a real `splitprune serve` on loopback, an
independent proxy counting the socket's bytes, bad items in the middle of a session, bad opens and too many
streams refused, and the answers equal to unary Infer's."""
import json

import grpc
import pytest

from splitprune.bench.core.processes import ServeSubprocess, free_port
from splitprune.bench.paper.single import encoded_samples
from splitprune.link.profile import LinkProfile
from splitprune.link.proxy import LinkProxy
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.wire.codec import decode_label_array
from splitprune.wire.envelopes import INFER_METHOD
from splitprune.wire.stream import InferStreamClient, StreamRefused, item_data, open_message

REQUESTS = 24


@pytest.fixture(scope="module")
def served(exported, tmp_path_factory):
    run, _ = exported
    proc = ServeSubprocess(free_port(), "--model", str(run), "--max-sessions", "2",
                           log_path=tmp_path_factory.mktemp("serve") / "serve.log").start()
    yield run, proc
    proc.stop()


def _unary(channel, fingerprint: str, budget: int, tensor: pb.EncodedTensor, metadata=()) -> bytes:
    req = spb.InferRequest(fingerprint=fingerprint, budget=budget, eval=pb.EvalRequest(request_id=1,
                                                                                       activations=tensor))
    out = channel.unary_unary(INFER_METHOD)(req.SerializeToString(), timeout=30, metadata=metadata)
    return spb.InferReply.FromString(out).eval.predictions.data


@pytest.mark.parametrize("dtype", ["ec", "int4", "fp16"])
def test_a_session_answers_like_unary_infer_and_survives_bad_items(served, dtype):
    run, proc = served
    meta, tensors = encoded_samples(str(run), dtype, REQUESTS)
    fingerprint, budget = meta["fingerprint"], int(meta["budget"])
    host, port = proc.address.rsplit(":", 1)
    with LinkProxy(("127.0.0.1", 0), (host, int(port)), LinkProfile()) as proxy:
        channel = grpc.insecure_channel("%s:%d" % proxy.address)
        direct = grpc.insecure_channel(proc.address)  # the comparison's unary calls do not cross the proxy
        session = InferStreamClient(channel, open_message(fingerprint, budget, tensors[0]))
        assert list(session.opened.wire_shape) == meta["wire_shape"]
        counts = []
        for i, tensor in enumerate(tensors):
            result = session.infer(item_data(tensor))
            assert result.reply.labels == _unary(direct, fingerprint, budget, tensor)  # the same answer
            counts.append(proxy.counters())
            if i == REQUESTS // 2:  # bad items in the middle: each refused alone, the session goes on
                with pytest.raises(StreamRefused, match="BAD_TENSOR"):
                    session.infer(b"\x00" * 3)
                with pytest.raises(StreamRefused, match="BAD_TENSOR"):
                    session.infer(item_data(tensor)[:-1])
                with pytest.raises(StreamRefused, match="TOO_LARGE"):
                    session.infer(item_data(tensor), samples=10**6)
        assert decode_label_array(pb.Labels(width=1, data=result.reply.labels), 1, meta["num_classes"]).shape == (1,)
        session.close()
        channel.close()
        direct.close()
    # bytes on the socket (an independent proxy), per request, both directions: the stream's own requests only
    stream_up = (counts[REQUESTS // 2 - 1].bytes_up - counts[1].bytes_up) / (REQUESTS // 2 - 2)
    payload = len(spb.InferItem(data=item_data(tensors[0])).SerializeToString())
    assert payload < stream_up < payload + 60, (payload, stream_up)
    if dtype == "ec":
        assert len(item_data(tensors[0])) < len(tensors[0].data) + 8  # only the string travels


def test_bad_opens_and_too_many_streams_are_refused(served):
    run, proc = served
    meta, tensors = encoded_samples(str(run), "ec", 1)
    channel = grpc.insecure_channel(proc.address)
    good = open_message(meta["fingerprint"], int(meta["budget"]), tensors[0])
    for bad, code in ((spb.InferOpen(fingerprint="0" * 16, budget=1, dtype=pb.FP16), grpc.StatusCode.NOT_FOUND),
                      (spb.InferOpen(fingerprint=meta["fingerprint"], budget=10**6, dtype=pb.FP16),
                       grpc.StatusCode.INVALID_ARGUMENT),
                      (spb.InferOpen(fingerprint=meta["fingerprint"], budget=int(meta["budget"]), dtype=pb.EC,
                                     channels=tensors[0].channels, tables=tensors[0].tables ^ 1),
                       grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            InferStreamClient(channel, bad)
        assert err.value.code() == code
    sessions = [InferStreamClient(channel, good) for _ in range(2)]  # --max-sessions 2
    with pytest.raises(grpc.RpcError) as err:
        InferStreamClient(channel, good)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert sessions[0].infer(item_data(tensors[0])).reply.labels  # the open ones still serve
    sessions[0].close()
    sessions[0] = InferStreamClient(channel, good)   # a closed session's place is free once its close returns
    for s in sessions:
        s.close()
    channel.close()


def test_splitprune_infer_on_a_session_answers_as_unary_calls_do(served, tmp_path, capsys):
    from splitprune.cli import main

    run, proc = served
    results = {}
    for mode, more in (("unary", ["--no-stream"]), ("stream", [])):
        out = tmp_path / f"{mode}.json"
        assert main(["infer", "--checkpoint", str(run), "--server", proc.address, "--dtype-up", "ec",
                     "--test-subset", "24", "--warmup", "1", *more, "--out", str(out)]) == 0
        results[mode] = json.loads(out.read_text())
    capsys.readouterr()
    unary, stream = results["unary"], results["stream"]
    assert stream["stream"] and stream["test_accuracy"] == unary["test_accuracy"]
    up = {m: r["transport"]["purposes"]["evaluation"]["message_bytes_up"] for m, r in results.items()}
    assert up["stream"] < up["unary"] / 2, up  # the item alone, against an InferRequest each
    assert stream["server_ms"]["p50"] > 0


def test_answers_not_waited_for_are_read_in_turn_and_never_taken_for_the_next(served):
    """--hedge abandons answers on a session: the reader gives each answer to its own item, in order."""
    run, proc = served
    meta, tensors = encoded_samples(str(run), "int4", 12)
    fingerprint, budget = meta["fingerprint"], int(meta["budget"])
    channel = grpc.insecure_channel(proc.address)
    expected = [_unary(channel, fingerprint, budget, t) for t in tensors]
    check_answers_in_turn(InferStreamClient(channel, open_message(fingerprint, budget, tensors[0])), tensors,
                          expected)
    channel.close()


def check_answers_in_turn(session, tensors: list, expected: list[bytes]) -> None:
    """Four items abandoned, then items waited for and submitted in turn: each answer is its own item's."""
    assert len(set(expected)) > 1   # else a confused answer could not show
    abandoned = [session.submit(item_data(t)) for t in tensors[:4]]   # nobody waits for these
    for i, tensor in enumerate(tensors[4:], start=4):
        got = session.infer(item_data(tensor)) if i % 2 else session.submit(item_data(tensor)).result(timeout=30)
        assert got.reply.labels == expected[i]
    assert [f.result(timeout=0).reply.labels for f in abandoned] == expected[:4]
    session.close()
