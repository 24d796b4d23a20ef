"""Remote runs keep each half where it runs: the server checkpoints its half, the device keeps its own
plus the server half's identity; `pull` fetches the whole model explicitly; every byte is counted by
purpose, summed across resumes, and an independent TCP proxy checks the total on the socket."""
import asyncio
import json
import logging
import shutil
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from splitprune.bench.core.certificates import make_certificates

from splitprune.cli import main
from splitprune.client.channel import Connection
from splitprune.client.config import ConnectConfig
from splitprune.client.connect import RemoteError, connect
from splitprune.config import make_config
from splitprune.server.app import start_app
from splitprune.server.config import ServeConfig
from splitprune.training.trainer import Trainer

SMALL = dict(model="vgg11_bn_compact", dataset="fashion-mnist", train_subset=32, test_subset=16, batch_size=16,
             test_batch_size=16, threads=1, seed=0)


def _strip(summary):
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "train_seconds", "transport")}


def _tensors(folder, name="model.safetensors"):
    return load_file(str(folder / name))


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def server():
    handle = start_app(ServeConfig(listen="127.0.0.1:0", max_sessions=8))
    yield handle
    handle.stop(grace=0.5)


class CountingProxy:
    """An independent TCP relay (plain asyncio, nothing from splitprune): counts bytes both ways."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.up = self.down = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _pipe(self, reader, writer, direction):
        try:
            while data := await reader.read(65536):
                setattr(self, direction, getattr(self, direction) + len(data))
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _handle(self, reader, writer):
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._pipe(reader, up_writer, "up"), self._pipe(up_reader, writer, "down"))

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


def test_remote_run_keeps_only_the_device_half_and_pull_completes_it(tmp_path, server, capsys):
    cfg = make_config({**SMALL, "method": "deprune", "schedule": "4:1,all:1"})
    local = Trainer(cfg, tmp_path / "local", show_progress=False).run()
    endpoint = connect(cfg, server.address, out=str(tmp_path / "remote"))
    try:
        trainer = Trainer(cfg, tmp_path / "remote", endpoint=endpoint, show_progress=False)
        assert trainer.parts.server_worker is None  # the device process builds the device side only
        remote = trainer.run()
    finally:
        endpoint.close()
    assert _strip(remote) == _strip(local)
    ckpt = tmp_path / "remote" / "checkpoint"
    model, state = _tensors(ckpt), _tensors(ckpt, "state.safetensors")
    assert not any(k.startswith(("server.", "opt.server.", "rng.server")) for k in {**model, **state})
    local_model, local_state = _tensors(tmp_path / "local" / "checkpoint"), \
        _tensors(tmp_path / "local" / "checkpoint", "state.safetensors")
    _equal(model, {k: v for k, v in local_model.items() if k.startswith("device.")})
    identity = json.loads((ckpt / "meta.json").read_text())["server_half"]
    assert len(identity["state_sha256"]) == 64 and identity["step_id"] > 0 and identity["server"] == server.address
    t = remote["transport"]
    assert t["counted"] == "messages" and t["checkpoints"] == 4 and t["state_fetches"] == 0
    assert t["purposes"]["state"]["message_bytes_down"] == 0  # no server weights travelled for checkpoints

    assert main(["pull", "--server", server.address, "--checkpoint", str(tmp_path / "remote"),
                 "--out", str(tmp_path / "whole")]) == 0
    assert "pulled the server half" in capsys.readouterr().out
    _equal(_tensors(tmp_path / "whole"), local_model)
    _equal(_tensors(tmp_path / "whole", "state.safetensors"), local_state)
    pulled = json.loads((tmp_path / "whole" / "meta.json").read_text())["pulled"]
    assert pulled["bytes_down"] > sum(v.numel() * v.element_size() for k, v in local_model.items()
                                      if k.startswith("server."))  # counted: the weights did travel
    assert main(["eval", "--checkpoint", str(tmp_path / "whole"), "--test-subset", "16"]) == 0
    assert main(["infer", "--server", server.address, "--checkpoint", str(tmp_path / "whole"), "--test-subset", "8",
                 "--warmup", "0"]) == 0  # the server's live half is the pulled one
    assert main(["infer", "--server", server.address, "--checkpoint", str(tmp_path / "remote"),
                 "--test-subset", "8"]) == 2
    assert "splitprune pull" in capsys.readouterr().err
    assert main(["pull", "--server", server.address, "--checkpoint", str(tmp_path / "remote"),
                 "--out", str(tmp_path / "whole")]) == 2  # never over a folder that holds something
    assert main(["pull", "--server", server.address, "--checkpoint", str(tmp_path / "local"),
                 "--out", str(tmp_path / "again")]) == 2
    assert "nothing to pull" in capsys.readouterr().err


def test_device_crash_resumes_bit_identical_and_traffic_adds_up(tmp_path, server, monkeypatch):
    cfg = make_config({**SMALL, "method": "ca", "epochs": 3})
    local = Trainer(cfg, tmp_path / "local", show_progress=False).run()
    calls = {"n": 0}
    original = Trainer._run_epoch

    def crash_on_third_epoch(self, phase):
        calls["n"] += 1
        if calls["n"] == 3:
            self.device.train_step(*next(iter(self.parts.train_loader)), self.endpoint.link)  # one step, unsaved
            raise KeyboardInterrupt
        return original(self, phase)

    monkeypatch.setattr(Trainer, "_run_epoch", crash_on_third_epoch)
    endpoint = connect(cfg, server.address, out=str(tmp_path / "remote"))
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, tmp_path / "remote", endpoint=endpoint, show_progress=False).run()
    endpoint.close()  # the device process dies; the server went one step further than the checkpoint
    first_wall = json.loads((tmp_path / "remote" / "checkpoint" / "meta.json").read_text())["progress"]["wall_seconds"]
    monkeypatch.setattr(Trainer, "_run_epoch", original)
    endpoint = connect(cfg, server.address, out=str(tmp_path / "remote"))
    try:
        remote = Trainer(cfg, tmp_path / "remote", endpoint=endpoint, show_progress=False).run()
    finally:
        endpoint.close()
    assert _strip(remote) == _strip(local)
    assert main(["pull", "--server", server.address, "--checkpoint", str(tmp_path / "remote"),
                 "--out", str(tmp_path / "whole")]) == 0
    for name in ("model.safetensors", "state.safetensors"):
        _equal(_tensors(tmp_path / "whole", name), _tensors(tmp_path / "local" / "checkpoint", name))
    t = remote["transport"]
    assert t["processes"] == 2 and t["checkpoints"] == 4  # one per epoch, one at the end of the phase
    training = t["purposes"]["training"]
    assert training["messages_up"] == 3 * 2  # 2 steps per epoch; the unsaved step's bytes died with its process
    overhead = training["message_bytes_up"] - remote["bytes_up"]  # the ClientMessage envelope of each step
    assert 2 * training["messages_up"] <= overhead <= 4 * training["messages_up"]
    assert remote["wall_seconds"] > first_wall + remote["train_seconds"] / 3  # both processes' time


def test_resume_against_a_server_without_the_checkpoint_is_one_clear_message(tmp_path, server, capsys):
    args = ["train", "--method", "ca", "--epochs", "1", "--train-subset", "16", "--test-subset", "16",
            "--threads", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert main([*args, "--server", server.address]) == 0
    other = start_app(ServeConfig(listen="127.0.0.1:0"))  # a fresh server: it never saw this run
    try:
        start = time.monotonic()
        assert main([*args, "--server", other.address]) == 2
        err = capsys.readouterr().err
        assert "no longer has this run's server half" in err and "another --out" in err
        assert "Traceback" not in err and time.monotonic() - start < 30
    finally:
        other.stop(grace=0.5)


def test_socket_bytes_of_a_ca_run_are_within_1_1x_of_its_payload(tmp_path, server):
    cfg = make_config({**SMALL, "method": "ca", "budget": 4, "epochs": 2, "train_subset": 256, "test_subset": 64,
                       "test_batch_size": 32})
    proxy = CountingProxy(server.port)
    try:
        endpoint = connect(cfg, ConnectConfig(server=f"127.0.0.1:{proxy.port}", measure_socket=True),
                           out=str(tmp_path / "run"))
        try:
            summary = Trainer(cfg, tmp_path / "run", endpoint=endpoint, show_progress=False).run()
        finally:
            endpoint.close()
        time.sleep(0.2)
    finally:
        proxy.stop()
    payload = sum(summary[f"{kind}_{side}"] for kind in ("bytes", "eval_bytes", "calibration_bytes")
                  for side in ("up", "down"))
    socket_total = proxy.up + proxy.down
    assert socket_total <= 1.1 * payload, (socket_total, payload)
    t = summary["transport"]
    measured = sum(p["socket_bytes_up"] + p["socket_bytes_down"] for p in t["purposes"].values())
    assert measured <= socket_total <= measured + 2048  # the client's own count agrees (stream end aside)
    messages = sum(p["message_bytes_up"] + p["message_bytes_down"] for p in t["purposes"].values())
    assert payload < messages < measured


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_tls_mismatch_is_one_fast_clear_message(tmp_path, server):
    certs = make_certificates(tmp_path / "certs")

    # "fast": the mismatch is said at the first failed attempt, not once the client has waited out its connect
    # timeout. That timeout is set long (90 s) and the bound is half of it: a stall guard that a loaded machine
    # does not trip, which a client that only diagnoses when its window has run out still fails.
    wait, bound = 90.0, 45.0
    cfg = make_config({**SMALL, "method": "ca", "epochs": 1})
    tls_server = start_app(ServeConfig(listen="127.0.0.1:0", tls_cert=certs.server_cert, tls_key=certs.server_key))
    try:
        start = time.monotonic()
        with pytest.raises(RemoteError) as info:
            connect(cfg, ConnectConfig(server=tls_server.address, connect_timeout=wait), client_id="plain",
                    fresh_start=True)
        assert "uses TLS" in str(info.value) and "--tls-ca" in str(info.value)
        assert time.monotonic() - start < bound
    finally:
        tls_server.stop(grace=0.5)
    start = time.monotonic()
    with pytest.raises(RemoteError) as info:
        connect(cfg, ConnectConfig(server=server.address, tls_ca=certs.ca, connect_timeout=wait), client_id="tls",
                fresh_start=True)
    assert "does not use TLS" in str(info.value) and time.monotonic() - start < bound


def test_a_token_in_clear_off_loopback_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, logger="splitprune.client"):
        Connection(ConnectConfig(server="127.0.0.1:5", token="secret")).close()
        assert not caplog.records
        # never connects: a warning before anything is sent
        Connection(ConnectConfig(server="192.0.2.7:5", token="secret")).close()
    assert any("clear text" in r.getMessage() for r in caplog.records)


def test_bytes_a_killed_client_sent_after_its_last_checkpoint_are_in_the_summary(tmp_path, server):
    """issue 25 item 6: a client killed mid-epoch (SIGKILL) and rerun; what its socket carried after the
    checkpoint it resumed from is reported (`transport.discarded`), so the run's totals match the bytes an
    independent proxy counted."""
    import signal
    import subprocess
    import sys

    from splitprune.wire.accounting import totals

    proxy = CountingProxy(server.port)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "splitprune", "train", "--model", "vgg11_bn_compact", "--dataset", "fashion-mnist",
            "--method", "ca", "--budget", "4", "--epochs", "2", "--train-subset", "160", "--test-subset", "32",
            "--batch-size", "16", "--threads", "1", "--quiet", "--bn-calibration", "0",
            "--server", f"127.0.0.1:{proxy.port}", "--measure-socket", "--out", str(out)]
    try:
        first = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        journal = out / "transport.jsonl"
        deadline = time.monotonic() + 300
        while True:  # past epoch 1's checkpoint and 5 steps into epoch 2
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
            if (out / "checkpoint" / "meta.json").exists() and journal.exists():
                held = json.loads((out / "checkpoint" / "meta.json").read_text())["progress"]["journal"]
                lines = journal.read_text().splitlines()
                if held and len(lines) >= 10 + 1 + 5:
                    break
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        second = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
        assert second.returncode == 0, second.stderr
        time.sleep(0.3)
    finally:
        proxy.stop()
    summary = json.loads((out / "summary.json").read_text())
    lost = summary["transport"]["discarded"]
    assert lost["processes"] == 1 and lost["bytes_up"] > 5 * 16 * 4 and lost["bytes_down"] > 0, lost
    up, down = totals(summary["transport"])
    # without the journal the summary tells less than the socket carried; with it, the gap is one step's
    # messages at most (a process killed mid-step) and the streams' ends
    step_up = summary["bytes_up"] / (2 * 160 / 16)
    assert proxy.up - up > lost["bytes_up"] - step_up
    assert up + lost["bytes_up"] <= proxy.up <= up + lost["bytes_up"] + step_up + 4096, (up, lost, proxy.up)
    assert down + lost["bytes_down"] <= proxy.down + 4096
