"""Server-wide admission control (issue 25 item 4): the memory all requests in flight may take is bounded
by --max-inflight-mb; a request that does not fit waits, then is refused with RESOURCE_EXHAUSTED /
SERVER_BUSY. A real server on loopback, real streams."""
from __future__ import annotations

import threading
import time

import grpc
import pytest

from splitprune.bench.systems.fuzzing import Fuzzer, _Refused
from splitprune.cli import main
from splitprune.config import make_config
from splitprune.proto import pb
from splitprune.server.admission import Admission
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.server.service import request_memory
from splitprune.wire.envelopes import frame
from splitprune.wire.refusals import ServerBusy

CFG = dict(model="vgg11_bn_compact", dataset="fashion-mnist", method="ca", budget=4, epochs=1, train_subset=32,
           test_subset=16, batch_size=16, test_batch_size=16, threads=1, seed=0)


def test_admission_waits_for_room_then_refuses():
    admission = Admission(100, wait_s=0.3)
    outcome = {}

    def second(nbytes, key):
        start = time.monotonic()
        try:
            with admission.hold(nbytes):
                outcome[key] = ("admitted", time.monotonic() - start, admission.in_flight)
        except ServerBusy as exc:
            outcome[key] = ("refused", time.monotonic() - start, str(exc))

    with admission.hold(60):
        t = threading.Thread(target=second, args=(60, "full"))
        t.start()
        t.join()
        second(40, "fits")                       # 60 + 40 <= 100: at once
        t = threading.Thread(target=second, args=(60, "freed"))
        t.start()
        time.sleep(0.1)
    t.join()                                     # the first hold ended within the wait: admitted
    assert outcome["full"][0] == "refused" and outcome["full"][1] >= 0.3 and "--max-inflight-mb" in outcome["full"][2]
    assert outcome["fits"][:1] == ("admitted",) and outcome["fits"][2] == 100
    assert outcome["freed"][0] == "admitted" and 0.05 < outcome["freed"][1] < 0.3
    assert admission.in_flight == 0 and admission.peak == 100 and admission.refused == 1
    with admission.hold(10 ** 9):                # larger than the budget: takes all of it, not refused forever
        assert admission.in_flight == 100


def test_a_request_over_the_server_budget_is_refused_as_busy_and_then_served():
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_request_mb=32, max_inflight_mb=32, admission_wait=0.3))
    cfg = make_config(CFG)
    fuzzer = Fuzzer(handle.address, cfg)
    try:
        live = fuzzer._session("busy")
        half = handle.service.halves[cfg.fingerprint()]
        request = frame(4, pb.EvalRequest(request_id=1, activations=fuzzer._tensor()).SerializeToString())
        assert 0 < request_memory(half, pb.EvalRequest(activations=fuzzer._tensor()).activations) <= 32 * 2**20
        with handle.service.admission.hold(32 * 2**20):  # another request holds the whole budget
            with pytest.raises(_Refused) as refused:
                live.stream.exchange(request)
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        assert handle.service.admission.refused == 1
        live = fuzzer._session("busy-again")
        live.stream.exchange(request)           # room again: served
        assert handle.service.admission.in_flight == 0
    finally:
        fuzzer.close()
        handle.stop(grace=0.5)


def test_the_budget_must_hold_one_request(capsys):
    assert main(["serve", "--listen", "127.0.0.1:0", "--max-request-mb", "64", "--max-inflight-mb", "32"]) == 2
    err = capsys.readouterr().err
    assert "--max-inflight-mb (32) must be at least --max-request-mb (64)" in err and "Traceback" not in err


def test_grpc_status_of_the_refusal_carries_its_reason():
    assert ServerBusy.status == grpc.StatusCode.RESOURCE_EXHAUSTED.name and ServerBusy.reason == "SERVER_BUSY"
