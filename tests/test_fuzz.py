"""Structured fuzzing against a real loopback server (property-based, Hypothesis): valid sessions whose
fields are mutated one at a time. No mutation may end in INTERNAL (or UNKNOWN), the server goes on
serving, and a normal training run afterwards equals one on a fresh server."""
import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from splitprune.bench.systems.fuzzing import FAILURES, Fuzzer, mutate
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


def test_mutate_changes_exactly_one_field():
    import random

    rng = random.Random(0)
    for _ in range(200):
        req = pb.PhaseRequest(phase=0, budget=4, lr=0.01, momentum=0.9, weight_decay=5e-4)
        before = req.SerializeToString()
        change = mutate(req, rng.choice)
        differs = [f.name for f in req.DESCRIPTOR.fields
                   if getattr(req, f.name) != getattr(pb.PhaseRequest.FromString(before), f.name)
                   and not (getattr(req, f.name) != getattr(req, f.name))]  # NaN != NaN: compare as changed
        assert len(differs) <= 1, (change, differs)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_mutated_message_makes_the_server_fail(fuzzed, data):
    _, fuzzer = fuzzed
    code = fuzzer.run(lambda options: data.draw(st.sampled_from(list(options))))
    assert code not in FAILURES, fuzzer.failures[-1]


def _strip(summary):
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "train_seconds", "transport")}


def test_after_fuzzing_the_server_still_trains_exactly_as_a_fresh_one(fuzzed, tmp_path):
    handle, fuzzer = fuzzed
    fuzzer.end_sessions()
    assert fuzzer.messages >= 200 and not fuzzer.failures
    codes = dict(fuzzer.codes)
    assert codes.get("INVALID_ARGUMENT", 0) > 0 and codes.get("OK", 0) > 0, codes  # the cases do reach both
    cfg = make_config(CFG)
    fresh = start_app(ServeConfig(listen="127.0.0.1:0"))
    try:
        results = []
        for name, server in (("fuzzed", handle), ("fresh", fresh)):
            endpoint = connect(cfg, server.address, out=str(tmp_path / name))
            try:
                results.append(Trainer(cfg, tmp_path / name, endpoint=endpoint, show_progress=False).run())
            finally:
                endpoint.close()
    finally:
        fresh.stop(grace=0.5)
    assert _strip(results[0]) == _strip(results[1])
    print(json.dumps({"messages": fuzzer.messages, "statuses": codes}))
