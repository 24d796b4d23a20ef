"""A tier of two server replicas on torch.distributed (gloo on loopback), real processes and real gRPC
clients: halves bit-identical after every synchronisation; a killed replica is restarted while the other
goes on serving, it rejoins, and its client resumes on the other replica without losing or doubling a step."""
import copy
import os
import re
import signal
import threading
import time

import grpc
import pytest

from splitprune.bench.systems.scale_replicas import SYNC_LINE, RecordingLink, bench_config, first_batch, start_tier
from splitprune.cli import build_parser, main
from splitprune.client.channel import Connection
from splitprune.client.config import ConnectConfig
from splitprune.client.connect import connect, make_hello
from splitprune.client.remote import RemoteEndpoint
from splitprune.errors import UserError
from splitprune.flags import flag_values, to_argv
from splitprune.proto import service_pb2 as spb
from splitprune.server.config import ServeConfig
from splitprune.server.replicas.averaging import plan_weights
from splitprune.server.replicas.launch import replica_listen
from splitprune.server.replicas.rendezvous import SECRET_ENV, TierEnv
from splitprune.training.link import OptimizerSettings
from splitprune.training.setup import build_device_worker
from splitprune.wire.envelopes import DESCRIBE_METHOD

STEPS = 3  # per client before the checkpoint


def _describe(address: str, fingerprint: str) -> spb.DescribeReply:
    with grpc.insecure_channel(address) as ch:
        call = ch.unary_unary(DESCRIBE_METHOD)
        return spb.DescribeReply.FromString(call(spb.DescribeRequest(fingerprint=fingerprint).SerializeToString(),
                                                 timeout=30))


def _rounds(log: str) -> dict[tuple[int, int], dict[int, str]]:
    """(generation, round) -> {replica: state digest} from the replicas' log lines."""
    out: dict[tuple[int, int], dict[int, str]] = {}
    for m in SYNC_LINE.finditer(log):
        out.setdefault((int(m.group(2)), int(m.group(3))), {})[int(m.group(1))] = m.group(7)
    return out


def _identical(addresses: list[str], fingerprint: str, timeout: float = 60.0) -> str:
    """Wait for the tier's periodic synchronisation; the one digest every replica then reports."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            digests = {_describe(a, fingerprint).weights_sha256 for a in addresses}
        except grpc.RpcError as exc:  # a restarted replica builds the half in its first round
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            digests = set()
        if len(digests) == 1:
            return digests.pop()
        assert time.monotonic() < deadline, f"replicas still differ after {timeout} s: {digests}"
        time.sleep(0.2)


def _train(cfg, batch, address: str, index: int, out: dict) -> None:
    try:
        device, _ = build_device_worker(cfg, 10, 1)
        endpoint = connect(cfg, ConnectConfig(server=address, reconnect=30.0 if "," in address else 2.0),
                           client_id=f"client-{index}", fresh_start=False)
        device.start_phase(endpoint.link, 0, cfg.budget, OptimizerSettings(0.01, 0.9, 5e-4), True)
        for _ in range(STEPS):
            device.train_step(*batch, endpoint.link)
        record = endpoint.checkpoint(device.step_id) if index == 1 else None  # the one that will resume
        out[index] = (device, endpoint, record, copy.deepcopy(device))
    except Exception as exc:  # noqa: BLE001 - reported by the test
        out[index] = exc


def _wait_for(tier, text: str, timeout: float = 120.0, after: int = 0) -> None:
    deadline = time.monotonic() + timeout
    while text not in tier.log()[after:]:
        assert time.monotonic() < deadline and tier.proc.poll() is None, tier.log()[-4000:]
        time.sleep(0.2)


def test_two_replicas_stay_identical_and_survive_a_killed_replica(tmp_path):
    cfg = bench_config()
    batch = first_batch(cfg)
    fingerprint = cfg.fingerprint()
    sync = ("--sync-every", "4", "--sync-max-delay", "0.3", "--sync-timeout", "20", "--sync-settle", "1",
            "--max-restarts", "1")
    tier, addresses = start_tier(2, tmp_path / "state", *sync, log_path=tmp_path / "tier.log")
    try:
        out: dict = {}
        # client 3 names both replicas, its own first: when it is lost, the run continues on the other
        where = [addresses[0], addresses[1], addresses[0], f"{addresses[1]},{addresses[0]}"]
        threads = [threading.Thread(target=_train, args=(cfg, batch, where[i], i, out)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(not isinstance(v, Exception) for v in out.values()), out
        _identical(addresses, fingerprint)
        rounds = _rounds(tier.log())
        assert len(rounds) >= 3, tier.log()[-3000:]
        for key, by_rank in rounds.items():  # after every synchronisation, both replicas hold the same bits
            assert len(by_rank) == 2 and len(set(by_rank.values())) == 1, (key, by_rank)
        assert len({d for r in rounds.values() for d in r.values()}) >= 2  # the half did change on the way
        assert "momentum True" in tier.log()
        both = [w for w in re.findall(r"weights \[(\d+), (\d+)\]", tier.log()) if int(w[0]) and int(w[1])]
        assert both, "no round averaged the steps of both replicas"

        # replica 1 dies: replica 0 re-forms alone and goes on serving its clients; the launcher restarts 1
        mark = len(tier.log())
        pid = int(re.search(r"replica 1 of 2 at \S+ \(pid (\d+)\)", tier.log()).group(1))
        os.kill(pid, signal.SIGKILL)
        _wait_for(tier, "replica 0: generation 1 broke", after=mark)
        device0, endpoint0, _, _ = out[0]
        device0.train_step(*batch, endpoint0.link)                 # served while its peer is gone
        device3, endpoint3, _, _ = out[3]
        before = endpoint3.last_step
        device3.train_step(*batch, endpoint3.link)                 # its replica is gone: no error, no step lost
        assert endpoint3.last_step == before + 1  # on the other replica, or on its own restarted one, whichever
        assert f"client client-3 continues at step {before} on this replica" in tier.log()  # answered first
        _wait_for(tier, "replica 1 ended (exit code -9); restarting it", after=mark)
        _wait_for(tier, "formed: replicas [0, 1]", after=mark)     # the restarted replica rejoined
        digest = _identical(addresses, fingerprint)
        assert tier.proc.poll() is None

        # client 1 trained on the killed replica: it resumes from its checkpoint on replica 0 (shared folder)
        _, endpoint, record, saved_device = out[1]
        endpoint.close()
        step = record.identity["step_id"]
        hello = make_hello(cfg, "client-1", fresh_start=False)
        hello.resume_step_id, hello.resume_state_sha256 = step, record.identity["state_sha256"]
        endpoint = RemoteEndpoint(Connection(ConnectConfig(server=addresses[0], reconnect=5.0)), hello)
        assert endpoint.welcome.last_step_id == step                            # no step lost
        assert endpoint.welcome.attached_clients > 1 and not endpoint.welcome.state_sha256  # the shared half kept
        link = RecordingLink(endpoint.link)
        saved_device.train_step(*batch, link)                                   # step + 1 is accepted
        assert endpoint.last_step == step + 1
        assert endpoint.train(link.request) == link.reply  # sent twice: answered from memory, not applied twice
        assert _identical(addresses, fingerprint) != digest
        endpoint.close()
        for i, (_, ep, _, _) in out.items():
            if i != 1:
                ep.close()
    finally:
        tier.stop()
        tier.kill()
    assert "replicas stopped (exit codes [0, 0]; 1 restarts)" in tier.log()


def test_weights_of_a_synchronisation():
    fresh = {"joined": False, "samples": 0, "saved_ns": 0}
    joined = {"joined": True, "samples": 0, "saved_ns": 0}
    # samples since the last synchronisation weigh; an idle replica does not dilute the others
    assert plan_weights([{**joined, "samples": 32}, {**joined, "samples": 16}]) == ([32.0, 16.0], True)
    assert plan_weights([{**joined, "samples": 0}, {**joined, "samples": 16}]) == ([0.0, 16.0], True)
    assert plan_weights([joined, joined]) == ([1.0, 0.0], False)  # nothing changed: nothing travels
    # a replica new to the half adopts the tier's state
    assert plan_weights([{**fresh, "samples": 8}, {**joined, "samples": 0}]) == ([0.0, 1.0], True)
    # a restarted tier: the newest save wins, else the lowest replica
    assert plan_weights([{**fresh, "saved_ns": 5}, {**fresh, "saved_ns": 9}]) == ([0.0, 1.0], True)
    assert plan_weights([fresh, fresh]) == ([1.0, 0.0], True)


def test_tier_environment_and_command_line(capsys):
    secret = "s" * 16
    assert TierEnv.from_environ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500",
                                 "LOCAL_RANK": "1", SECRET_ENV: secret}) == TierEnv(1, 2, 1, "h", 29500, secret.encode())
    assert TierEnv.from_environ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"},
                                token="t" * 16).secret == b"t" * 16  # the serve token serves as the secret
    for secret in ("", "short"):
        with pytest.raises(UserError, match="shared secret of at least 16"):
            TierEnv.from_environ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                                  SECRET_ENV: secret})
    with pytest.raises(UserError, match="MASTER_ADDR, MASTER_PORT"):
        TierEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(UserError, match="RANK must be in"):
        TierEnv.from_environ({"RANK": "2", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                              SECRET_ENV: secret})
    assert replica_listen("127.0.0.1:50051", 3) == "127.0.0.1:50054"
    assert replica_listen("0.0.0.0:0", 3) == "0.0.0.0:0"
    args = build_parser("serve").parse_args(["serve", "--replicas", "2", "--listen", "127.0.0.1:5000", "--model", "a",
                                             "--model", "b", "--quiet", "--sync-every", "8"])
    values = {**flag_values(args, ServeConfig), "replicas": None, "distributed": True}
    assert to_argv(ServeConfig, values) == ["--listen", "127.0.0.1:5000", "--model", "a", "--model", "b", "--quiet",
                                            "--distributed", "--sync-every", "8"]  # what each launched replica runs
    for argv, message in ((["serve", "--replicas", "2", "--listen", "127.0.0.1:0"], "explicit --listen port"),
                          (["serve", "--replicas", "0"], "--replicas must be an integer >= 1")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k in os.environ}
    try:
        assert main(["serve", "--distributed", "--listen", "127.0.0.1:0"]) == 2
        assert "serve --distributed needs the variables RANK" in capsys.readouterr().err
    finally:
        os.environ.update(env)
