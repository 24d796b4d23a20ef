"""Structured fuzzing against a real loopback server (property-based, Hypothesis): valid sessions whose
fields are mutated one at a time. No mutation may end in INTERNAL (or UNKNOWN), the server goes on
serving, and a normal training run afterwards equals one on a fresh server."""
import json
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from splitprune.bench.systems.fuzzing import FAILURES, Fuzzer
from splitprune.bench.systems.mutation import INTS, mutate
from splitprune.client.connect import connect
from splitprune.config import make_config  # noqa: E402
from splitprune.proto import pb  # noqa: E402
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.training.trainer import Trainer  # noqa: E402

CFG = dict(model="vgg11_bn_compact", dataset="fashion-mnist", method="ca", epochs=1, train_subset=32,
           test_subset=16, batch_size=16, test_batch_size=16, threads=1, seed=0)


@pytest.fixture(scope="module")
def fuzzed():
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_models=2, max_sessions=8))
    fuzzer = Fuzzer(handle.address, make_config(CFG))
    yield handle, fuzzer
    fuzzer.close()
    handle.stop(grace=0.5)


def _as_float32(value: float) -> float:
    import struct
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _is_nan(value) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _differs(old, new) -> bool:
    """NaN != NaN: a field that is NaN after the mutation counts as changed."""
    return old != new or _is_nan(new)


def _leaves(msg, prefix: str = "") -> dict:
    """Every field's value by dotted path; a message field as its presence, then its own fields (when set)."""
    out = {}
    for fd in msg.DESCRIPTOR.fields:
        path, value = prefix + fd.name, getattr(msg, fd.name)
        if fd.is_repeated:
            out[path] = [v.SerializeToString(deterministic=True) if fd.message_type else v for v in value]
        elif fd.message_type is not None:
            out[path] = msg.HasField(fd.name)
            if out[path]:
                out.update(_leaves(value, path + "."))
        else:
            out[path] = value
    return out


def _changed_fields(before: dict, after: dict) -> list[str]:
    missing = object()
    return [path for path in {**before, **after}
            if _differs(before.get(path, missing), after.get(path, missing))]


def test_mutate_changes_exactly_one_field():
    import random

    rng = random.Random(0)
    changed = unchanged = 0
    for _ in range(300):
        req = pb.PhaseRequest(phase=0, budget=4, lr=0.01, momentum=0.9, weight_decay=5e-4)
        old = _leaves(req)
        change = mutate(req, rng.choice)
        # every PhaseRequest field is a number: the description is "NAME = VALUE" with the value set
        name, text = change.split(" = ")
        fd = req.DESCRIPTOR.fields_by_name[name]
        value = int(text) if fd.type == fd.TYPE_UINT32 else _as_float32(float(text))  # float32 as stored
        now = getattr(req, name)
        assert now == value or (_is_nan(value) and _is_nan(now)), (change, now)  # the value was set
        differs = _changed_fields(old, _leaves(req))
        if _differs(old[name], value):
            assert differs == [name], (change, differs)
            changed += 1
        else:  # the value drawn equals the old one (phase = 0): legitimately nothing changes
            assert differs == [], (change, differs)
            unchanged += 1
    assert changed > 250 and unchanged > 0, (changed, unchanged)  # both cases are reached


def test_mutate_changes_one_field_of_every_message_the_fuzzer_sends():
    import random

    import torch

    from grpc_health.v1 import health_pb2

    from splitprune.client.connect import make_hello
    from splitprune.compression import ChannelCodec, encode_labels
    from splitprune.proto import service_pb2 as spb

    cfg = make_config(CFG)
    values = torch.linspace(-1, 1, 2 * cfg.budget * 16).reshape(2, cfg.budget, 4, 4)
    tensor = ChannelCodec(cfg.dtype_up).compress(values, torch.arange(cfg.budget) * 3, 512)
    messages = [lambda: make_hello(cfg, "fuzz-0", False, 10, 1),
                lambda: pb.TrainRequest(step_id=7, activations=tensor, labels=encode_labels(torch.tensor([1, 7]))),
                lambda: pb.EvalRequest(request_id=7, activations=tensor),
                lambda: spb.CheckpointRequest(step_id=7),
                lambda: spb.DescribeRequest(fingerprint=cfg.fingerprint()),
                lambda: spb.InferRequest(fingerprint=cfg.fingerprint(), budget=cfg.budget,
                                         eval=pb.EvalRequest(request_id=1, activations=tensor)),
                lambda: spb.FetchStateRequest(session_id="0123", known_version=3),
                lambda: spb.StateChunk(session_id="0123", step_id=7, total_bytes=9, data=b"012345678"),
                lambda: health_pb2.HealthCheckRequest(service="splitprune.v1.SplitPrune"),
                lambda: spb.InferOpen(fingerprint=cfg.fingerprint(), budget=cfg.budget, dtype=tensor.dtype,
                                      channels=tensor.channels),
                lambda: spb.InferItem(data=tensor.data, samples=2)]
    rng = random.Random(1)
    changed = 0
    for _ in range(400):
        msg = rng.choice(messages)()
        before = type(msg)()
        before.CopyFrom(msg)
        old = _leaves(msg)
        change = mutate(msg, rng.choice)
        path = change.split(" = ")[0].split(": ")[0]
        assert path in old, change
        differs = _changed_fields(old, _leaves(msg))
        if differs:
            if change.endswith(": cleared"):  # a set message field: it and what it held, nothing else
                assert differs[0] == path and all(d.startswith(path + ".") for d in differs[1:]), (change, differs)
            else:
                assert differs == [path], (change, differs)
            changed += 1
            continue
        # nothing changed: only where the mutation cannot change anything, each case named
        *parents, leaf = path.split(".")
        was, now = before, msg
        for part in parents:
            was, now = getattr(was, part), getattr(now, part)
        if "unrepresentable" in change:           # e.g. a negative enum: left out
            continue
        if change.endswith((": clear", ": drop")):  # a repeated field that was empty
            assert not getattr(was, leaf), change
        elif change.endswith(": edge"):             # its first value replaced by an edge value equal to it
            first = getattr(was, leaf)[0]
            assert first == getattr(now, leaf)[0] and first in INTS["uint32"] + INTS["uint64"], change
        elif change.endswith(": cleared"):         # a message field that was unset
            assert not was.HasField(leaf), change
        else:                                      # a scalar set to the value it had (e.g. 0 on 0)
            assert change == f"{path} = {getattr(now, leaf)!r}"[:120], change
            assert not _differs(getattr(was, leaf), getattr(now, leaf)), change
    assert changed > 350, changed


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_mutated_message_makes_the_server_fail(fuzzed, data):
    _, fuzzer = fuzzed
    code = fuzzer.run(lambda options: data.draw(st.sampled_from(list(options))))
    assert code not in FAILURES, fuzzer.failures[-1]


def _strip(summary):
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "train_seconds", "transport")}


def test_after_fuzzing_the_server_still_trains_exactly_as_a_fresh_one(tmp_path):
    import random

    import torch

    from splitprune.proto import service_pb2 as spb
    from splitprune.training.checkpoint import read_meta, read_tensors

    cfg = make_config(CFG)
    fuzzed = start_app(ServeConfig(listen="127.0.0.1:0", max_models=2, max_sessions=8))
    fresh = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        fuzzer = Fuzzer(fuzzed.address, cfg)
        try:
            rng = random.Random(0)
            for _ in range(30):   # its own cases (seeded): this test does not lean on another having run
                fuzzer.run(rng.choice)
            fuzzer.end_sessions()
            info = spb.DescribeReply.FromString(fuzzer.unary["describe"](
                spb.DescribeRequest(fingerprint=cfg.fingerprint()).SerializeToString(), timeout=30))
        finally:
            fuzzer.close()
        codes = dict(fuzzer.codes)
        assert not fuzzer.failures, fuzzer.failures
        assert codes.get("INVALID_ARGUMENT", 0) > 0 and codes.get("OK", 0) > 0, codes  # the cases reach both
        assert info.version > 1, info  # the fuzzer's training steps changed the half this run then trains
        results = []
        for name, server in (("fuzzed", fuzzed), ("fresh", fresh)):
            endpoint = connect(cfg, server.address, out=str(tmp_path / name))
            try:
                results.append(Trainer(cfg, tmp_path / name, endpoint=endpoint, show_progress=False).run())
            finally:
                endpoint.close()
    finally:
        fresh.stop(grace=0.5)
        fuzzed.stop(grace=0.5)
    assert _strip(results[0]) == _strip(results[1])
    # the summary's accuracy on 16 images and its byte counts hardly see the weights: the trained halves must be
    # the same to the bit (the server's state digest: weights, momentum buffers, random state; the device's weights)
    saved = [read_meta(tmp_path / name) for name in ("fuzzed", "fresh")]
    assert saved[0]["server_half"]["state_sha256"] == saved[1]["server_half"]["state_sha256"]
    device = [read_tensors(meta["_folder"]) for meta in saved]
    assert device[0].keys() == device[1].keys() and all(torch.equal(device[0][k], device[1][k]) for k in device[0])
    print(json.dumps({"messages": fuzzer.messages, "statuses": codes}))
