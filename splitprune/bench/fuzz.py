"""Structured fuzzing of the server: valid sessions whose fields are mutated one at a time.

Each case opens a real session (Hello, PhaseRequest, a training step, as a client would), then sends
one message with one field changed to a value at the edge of its type or of the session (0, 2^31,
2^63, NaN, a truncated or flipped byte string, an unknown enum, ...), or the serialized bytes of a
valid message damaged. Describe, Infer and FetchState requests are mutated the same way. A case
passes when the server answers with a status that is not INTERNAL or UNKNOWN. The test suite drives
the same cases with Hypothesis (tests/test_fuzz.py); this benchmark sends many of them to a server
subprocess and reports INTERNAL errors, crashes and the server's memory:

    splitprune bench fuzz                                   # 100,000 messages, bench_results/fuzz/
    python -m splitprune.bench.fuzz --messages 100000 --out bench_results/fuzz
"""
from __future__ import annotations

import argparse
import json
import queue
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
Choose = Callable[[Sequence[T]], T]
KINDS = ("hello", "phase", "train", "eval", "checkpoint", "envelope", "describe", "infer", "fetch")
FAILURES = ("INTERNAL", "UNKNOWN")
U32, U64 = (1 << 32) - 1, (1 << 64) - 1
INTS = {"uint32": (0, 1, 2, 3, 255, 256, 4096, 4097, 65535, 65536, (1 << 31) - 1, 1 << 31, U32),
        "uint64": (0, 1, 2, 1 << 31, U32, 1 << 32, (1 << 63) - 1, 1 << 63, U64),
        "int32": (0, -1, 1, -(1 << 31), (1 << 31) - 1),
        "enum": (0, 1, 2, 3, 4, 5, 99, -1)}
FLOATS = (0.0, -0.0, -1.0, 1.0, 0.5, 1.5, 1e-45, 1e38, float("inf"), float("-inf"), float("nan"))
STRINGS = ("", "x", "..", "../../etc", "0" * 16, "0123456789abcdef", "f" * 64, "\u00e9\u4e2d", "{", "{}",
           "[]", '{"model": "vgg11"}', "a" * 129, "a" * 5000, "[" * 100_000, '{"a": ' * 50_000)


def _bytes_variants(value: bytes, choose: Choose) -> bytes:
    cut = choose((0, 1, 2, 3))
    what = choose(("empty", "truncate", "extend", "flip", "double", "odd", "random"))
    if what == "empty":
        return b""
    if what == "truncate":
        return value[: len(value) * cut // 4]
    if what == "extend":
        return value + b"\x00" * (1 + cut * 7)
    if what == "flip" and value:
        i = len(value) * cut // 4
        return value[:i] + bytes([value[i] ^ 0xFF]) + value[i + 1:]
    if what == "double":
        return value * 2
    if what == "odd":
        return value + b"\x01"
    return bytes(random.Random(cut).randrange(256) for _ in range(1 + 13 * cut))


def _fields(msg, prefix: str = "") -> list[tuple[object, object, str]]:
    """(parent message, field descriptor, dotted path) of every field, nested messages included."""
    out = []
    for fd in msg.DESCRIPTOR.fields:
        path = prefix + fd.name
        out.append((msg, fd, path))
        if fd.message_type is not None and not fd.is_repeated and msg.HasField(fd.name):
            out.extend(_fields(getattr(msg, fd.name), path + "."))
    return out


def mutate(msg, choose: Choose) -> str:
    """Change one field of `msg` in place to an edge value of its type; a description of the change."""
    parent, fd, path = choose(_fields(msg))
    t = fd.type
    if fd.is_repeated:
        values = list(getattr(parent, fd.name))
        action = choose(("clear", "drop", "append", "edge"))
        del getattr(parent, fd.name)[:]
        if action == "drop":
            values = values[:-1]
        elif action in ("append", "edge") and fd.message_type is None:
            edge = choose(INTS["uint64" if t == fd.TYPE_UINT64 else "uint32"])
            values = values + [edge] if action == "append" or not values else [edge] + values[1:]
        if action != "clear" and fd.message_type is None:
            getattr(parent, fd.name).extend(values)
        return f"{path}: {action}"
    if fd.message_type is not None:
        parent.ClearField(fd.name)
        return f"{path}: cleared"
    if t == fd.TYPE_BOOL:
        value = not getattr(parent, fd.name)
    elif t in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        value = choose(FLOATS)
    elif t == fd.TYPE_STRING:
        value = choose(STRINGS + (getattr(parent, fd.name)[:-1], getattr(parent, fd.name) + "x"))
    elif t == fd.TYPE_BYTES:
        value = _bytes_variants(getattr(parent, fd.name), choose)
    elif t == fd.TYPE_ENUM:
        value = choose(INTS["enum"])
    else:
        kind = {fd.TYPE_UINT64: "uint64", fd.TYPE_INT32: "int32"}.get(t, "uint32")
        value = choose(INTS[kind])
    try:
        setattr(parent, fd.name, value)
    except (ValueError, TypeError):  # not representable in this field (e.g. a negative enum): leave it out
        return f"{path}: unrepresentable {value!r}"
    return f"{path} = {value!r}"[:120]


class Fuzzer:
    """Builds valid sessions against a server and sends one mutated message per case."""

    def __init__(self, address: str, cfg, clients: int = 4, token: str | None = None) -> None:
        import grpc

        from splitprune.transport.protocol import (DESCRIBE_METHOD, FETCH_STATE_METHOD, INFER_METHOD,
                                                   TRAIN_METHOD)

        self.cfg, self.clients = cfg, clients
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.channel = grpc.insecure_channel(address)
        self.train = self.channel.stream_stream(TRAIN_METHOD)
        self.unary = {"describe": self.channel.unary_unary(DESCRIBE_METHOD),
                      "infer": self.channel.unary_unary(INFER_METHOD)}
        self.fetch = self.channel.unary_stream(FETCH_STATE_METHOD)
        self.live: dict[str, _Session] = {}
        self.codes: Counter = Counter()
        self.failures: list[dict] = []
        self.messages = 0

    def end_sessions(self, timeout_s: float = 30.0) -> None:
        """Close every stream and wait until the server has none attached to the half."""
        for client in list(self.live):
            self._end(client)
        from splitprune.proto import service_pb2 as spb

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = spb.DescribeReply.FromString(self.unary["describe"](
                spb.DescribeRequest(fingerprint=self.cfg.fingerprint()).SerializeToString(),
                metadata=self.metadata, timeout=30))
            if info.attached_clients == 0:
                return
            time.sleep(0.05)

    def close(self) -> None:
        for client in list(self.live):
            self._end(client)
        self.channel.close()

    # ---------------------------------------------------------------- valid messages
    def _hello(self, client: str, fresh: bool = False):
        from splitprune.transport.client import make_hello

        return make_hello(self.cfg, client, fresh, 10, 1)

    def _phase(self):
        from splitprune.proto import pb

        return pb.PhaseRequest(phase=0, budget=self.cfg.budget, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def _tensor(self, n: int = 2):
        import torch

        from splitprune.compression import ChannelCodec

        values = torch.linspace(-1, 1, n * self.cfg.budget * 16).reshape(n, self.cfg.budget, 4, 4)
        return ChannelCodec(self.cfg.dtype_up).encode(values, torch.arange(self.cfg.budget) * 3, 512)

    def _train(self, step_id: int):
        import torch

        from splitprune.compression import encode_labels
        from splitprune.proto import pb

        return pb.TrainRequest(step_id=step_id, activations=self._tensor(), labels=encode_labels(torch.tensor([1, 7])))

    # ---------------------------------------------------------------- one case
    def _session(self, client: str) -> "_Session":
        """This client's open stream (Hello and the valid phase sent), opened when it has none."""
        from splitprune.proto import service_pb2 as spb
        from splitprune.transport.protocol import frame, unframe

        live = self.live.get(client)
        if live is not None:
            return live
        stream = _Stream(self)
        welcome = spb.Welcome.FromString(unframe(stream.exchange(frame(1, self._hello(client).SerializeToString())))[1])
        if welcome.last_step_id >= 1 << 62:  # a mutated step id used this client's range up: start afresh
            stream.close()
            stream = _Stream(self)
            welcome = spb.Welcome.FromString(unframe(stream.exchange(
                frame(1, self._hello(client, fresh=True).SerializeToString())))[1])
        stream.exchange(frame(2, self._phase().SerializeToString()))
        self.live[client] = live = _Session(stream, welcome.session_id, welcome.version, welcome.last_step_id)
        return live

    def _end(self, client: str) -> None:
        live = self.live.pop(client, None)
        if live is not None:
            live.stream.close()

    def reset(self) -> None:
        """Close every stream; a fresh start re-initialises the half (whatever the cases did to it)."""
        from splitprune.transport.protocol import frame

        for client in list(self.live):
            self._end(client)
        stream = _Stream(self)
        try:
            stream.exchange(frame(1, self._hello("fuzz-reset", fresh=True).SerializeToString()))
        except _Refused:
            pass
        finally:
            stream.close()

    def case(self, choose: Choose) -> tuple[str, str, str]:
        """(kind, mutation, status name) of one mutated message, sent on a live session of the client
        (one is opened when needed; a refusal ends it, a mutated phase too, so the next one is valid)."""
        from splitprune.proto import pb
        from splitprune.proto import service_pb2 as spb
        from splitprune.transport.protocol import frame

        kind = choose(KINDS)
        client = f"fuzz-{choose(range(self.clients))}"
        if kind in ("describe", "infer"):
            msg = spb.DescribeRequest(fingerprint=self.cfg.fingerprint()) if kind == "describe" else spb.InferRequest(
                fingerprint=self.cfg.fingerprint(), budget=self.cfg.budget,
                eval=pb.EvalRequest(request_id=1, activations=self._tensor()))
            change = mutate(msg, choose)
            return kind, change, self._unary(kind, msg.SerializeToString())
        change = ""
        try:
            if kind == "hello":
                self._end(client)
                hello = self._hello(client)
                change = mutate(hello, choose)
                stream = _Stream(self)
                try:
                    stream.exchange(frame(1, hello.SerializeToString()))
                finally:
                    stream.close()
                return kind, change, "OK"
            live = self._session(client)
            if kind == "fetch":
                req = spb.FetchStateRequest(session_id=live.session_id, known_version=live.version)
                change = mutate(req, choose)
                if req.session_id == live.session_id:
                    req.known_version = live.version  # a whole state transfer per case would be slow
                return kind, change, self._fetch(req.SerializeToString())
            step = live.last_step + 1
            msg = {"phase": self._phase(), "train": self._train(step), "envelope": self._train(step),
                   "eval": pb.EvalRequest(request_id=step, activations=self._tensor()),
                   "checkpoint": spb.CheckpointRequest(step_id=live.last_step)}[kind]
            field = {"phase": 2, "train": 3, "envelope": 3, "eval": 4, "checkpoint": 5}[kind]
            if kind == "envelope":
                data = _bytes_variants(frame(field, msg.SerializeToString()), choose)
                change = f"envelope of {len(data)} bytes"
            else:
                change = mutate(msg, choose)
                data = frame(field, msg.SerializeToString())
            live.stream.exchange(data)
            if kind == "phase":
                self._end(client)
            elif kind in ("train", "envelope"):
                live.last_step = max(live.last_step, msg.step_id)
            return kind, change, "OK"
        except _Refused as refused:
            self._end(client)
            return kind, change, refused.code

    def _unary(self, kind: str, data: bytes) -> str:
        import grpc

        self.messages += 1
        try:
            self.unary[kind](data, metadata=self.metadata, timeout=60)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def _fetch(self, data: bytes) -> str:
        import grpc

        self.messages += 1
        try:
            for _ in self.fetch(data, metadata=self.metadata, timeout=60):
                pass
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    def run(self, choose: Choose) -> str:
        kind, change, code = self.case(choose)
        self.codes[code] += 1
        if code in FAILURES:
            self.failures.append({"kind": kind, "mutation": change, "status": code})
        return code


@dataclass
class _Session:
    stream: "_Stream"
    session_id: str
    version: int
    last_step: int


class _Refused(Exception):
    def __init__(self, code: str) -> None:
        self.code = code


class _Stream:
    """A Train stream driven one message at a time; a refusal raises _Refused with the status name."""

    def __init__(self, fuzzer: Fuzzer) -> None:
        self.fuzzer = fuzzer
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.call = fuzzer.train(iter(self.requests.get, None), metadata=fuzzer.metadata, timeout=120)

    def exchange(self, data: bytes) -> bytes:
        import grpc

        self.fuzzer.messages += 1
        self.requests.put(data)
        try:
            return next(self.call)
        except grpc.RpcError as exc:
            raise _Refused(exc.code().name) from None
        except StopIteration:
            raise _Refused("OK") from None

    def close(self) -> None:
        self.requests.put(None)
        self.call.cancel()


# ---------------------------------------------------------------- the benchmark
DEFAULT_MESSAGES = 100_000
CONFIG = dict(model="vgg11_bn_compact", dataset="fashion-mnist", method="ca", epochs=1, train_subset=64,
              test_subset=32, batch_size=16, test_batch_size=32, threads=1, seed=0)


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _train_summary(cfg, address: str | None, out: Path) -> dict:
    from splitprune.training.trainer import Trainer
    from splitprune.transport.client import connect

    endpoint = connect(cfg, address, out=str(out)) if address else None
    try:
        summary = Trainer(cfg, out, endpoint=endpoint, show_progress=False).run()
    finally:
        if endpoint is not None:
            endpoint.close()
    return {k: v for k, v in summary.items() if k not in ("wall_seconds", "train_seconds", "transport")}


def soak(messages: int, out: Path, seed: int = 0, warmup: int = 1000) -> dict:
    """`messages` fuzz cases against a `splitprune serve` subprocess; the result row (also written to out)."""
    import tempfile

    from splitprune.config import make_config
    from splitprune.transport.testing import ServerProcess, free_port

    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(CONFIG)
    rng = random.Random(seed)
    server = ServerProcess(free_port(), "--max-models", "2", "--max-sessions", "8",
                           log_path=out / "serve.log").start()
    fuzzer = Fuzzer(server.address, cfg)
    rss, crashed, start = [], None, time.monotonic()
    try:
        for i in range(messages):
            if server.proc.poll() is not None:
                crashed = f"server exited with {server.proc.returncode} after {i} cases"
                break
            fuzzer.run(rng.choice)
            if i % 500 == 499:
                fuzzer.reset()
            if i == warmup or i % 1000 == 0 or i == messages - 1:
                rss.append((i, round(time.monotonic() - start, 1), _rss(server.proc.pid)))
                if i % 10_000 == 0:
                    print(f"  {i} cases, {fuzzer.messages} messages, server RSS {rss[-1][2] / 2**20:.0f} MiB, "
                          f"statuses {dict(fuzzer.codes)}", flush=True)
        fuzz_seconds = time.monotonic() - start
        fuzzer.end_sessions()
        alive = server.proc.poll() is None
        with tempfile.TemporaryDirectory() as tmp:
            after = _train_summary(cfg, server.address, Path(tmp) / "fuzzed") if alive else None
            fresh_server = ServerProcess(free_port()).start()
            try:
                fresh = _train_summary(cfg, fresh_server.address, Path(tmp) / "fresh")
            finally:
                fresh_server.stop()
    finally:
        fuzzer.close()
        exit_code = server.stop()
    base = next((r for r in rss if r[0] >= warmup), rss[0] if rss else (0, 0, 0))
    result = {
        "command": " ".join(["splitprune bench fuzz"] if messages == DEFAULT_MESSAGES else
                            ["python -m splitprune.bench.fuzz", "--messages", str(messages), "--out", str(out)]),
        "cases": messages if crashed is None else len(rss), "messages": fuzzer.messages,
        "statuses": dict(fuzzer.codes), "internal_errors": len(fuzzer.failures), "failures": fuzzer.failures[:20],
        "crashed": crashed, "server_exit_code": exit_code, "fuzz_seconds": round(fuzz_seconds, 1),
        "rss_after_warmup_mib": round(base[2] / 2**20, 1), "rss_end_mib": round(rss[-1][2] / 2**20, 1) if rss else None,
        "rss_growth_mib": round((rss[-1][2] - base[2]) / 2**20, 1) if rss else None,
        "rss_max_growth_mib": round((max(r[2] for r in rss if r[0] >= base[0]) - base[2]) / 2**20, 1) if rss else None,
        "rss_samples": [{"case": i, "seconds": t, "rss_mib": round(b / 2**20, 1)} for i, t, b in rss],
        "training_after_fuzz_equals_fresh": after is not None and after == fresh,
        "targets": {"internal_errors": 0, "crashes": 0, "rss_growth_mib_under": 50},
    }
    (out / "fuzz.json").write_text(json.dumps(result, indent=2))
    print(f"fuzz: {result['cases']} cases ({result['messages']} messages) in {result['fuzz_seconds']} s: "
          f"{result['internal_errors']} INTERNAL, crashed: {crashed or 'no'}, server RSS "
          f"{result['rss_after_warmup_mib']} -> {result['rss_end_mib']} MiB (+{result['rss_growth_mib']}, at most "
          f"+{result['rss_max_growth_mib']}), "
          f"training afterwards equals a fresh server: {result['training_after_fuzz_equals_fresh']}")
    return result


def run(profile: str, out: Path) -> dict:
    """`splitprune bench fuzz`: the quick and paper profiles both send DEFAULT_MESSAGES cases on the CPU."""
    return soak(DEFAULT_MESSAGES, Path(out))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=DEFAULT_MESSAGES, help="fuzz cases (one mutated message each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench_results/fuzz")
    args = p.parse_args(argv)
    soak(args.messages, Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
