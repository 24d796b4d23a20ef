"""Which HTTP/2 frames one InferStream request costs on the socket (issue 24: what limits the bytes).

A `splitprune serve --model CHECKPOINT` subprocess, a plain TCP relay that keeps every byte, and one
InferStream session of REQUESTS single-sample requests (dtype ec at the model's budget) with the runtime's
channel settings; the relay's bytes are cut into HTTP/2 frames and the last 20 requests' frames counted.

    python scripts/h2_frames.py --checkpoint bench_results/entropy/runs/ca4_r2_seed0/checkpoint \\
        --out bench_results/entropy/single/frames.json
"""
from __future__ import annotations

import argparse
import collections
import json
import socket
import threading
import time
from pathlib import Path

import grpc

from splitprune.bench.core.processes import ServeSubprocess, free_port
from splitprune.bench.paper.single import encoded_samples
from splitprune.wire.channels import client_options
from splitprune.wire.stream import InferStreamClient, item_data, open_message

NAMES = {0: "DATA", 1: "HEADERS", 3: "RST_STREAM", 4: "SETTINGS", 6: "PING", 7: "GOAWAY", 8: "WINDOW_UPDATE"}
REQUESTS, LAST = 40, 20
PREFACE = 24  # the client's connection preface before its first frame


def _frames(buf: bytes, pos: int) -> list[tuple[str, int]]:
    out = []
    while pos + 9 <= len(buf):
        length = int.from_bytes(buf[pos:pos + 3], "big")
        out.append((NAMES.get(buf[pos + 3], str(buf[pos + 3])), 9 + length))
        pos += 9 + length
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    server = ServeSubprocess(free_port(), "--model", args.checkpoint).start()
    host, port = server.address.rsplit(":", 1)
    relay = socket.socket()
    relay.bind(("127.0.0.1", 0))
    relay.listen(1)
    kept = {"up": bytearray(), "down": bytearray()}

    def pump(src, dst, key):
        while data := src.recv(65536):
            kept[key] += data
            dst.sendall(data)

    def accept():
        client, _ = relay.accept()
        upstream = socket.create_connection((host, int(port)))
        threading.Thread(target=pump, args=(client, upstream, "up"), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client, "down"), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        meta, tensors = encoded_samples(args.checkpoint, "ec", REQUESTS)
        channel = grpc.insecure_channel("127.0.0.1:%d" % relay.getsockname()[1], client_options())
        session = InferStreamClient(channel, open_message(meta["fingerprint"], int(meta["budget"]), tensors[0]))
        sizes = [session.infer(item_data(t)) for t in tensors]
        time.sleep(0.5)  # the last window updates arrive; the session's end is not counted
        snapshot = {key: bytes(value) for key, value in kept.items()}
        session.close()
    finally:
        server.stop()
    result = {"command": f"python scripts/h2_frames.py --checkpoint {args.checkpoint} --out {args.out}",
              "requests": REQUESTS, "counted": LAST,
              "item_bytes": sizes[-1].bytes_up, "reply_bytes": sizes[-1].bytes_down}
    for key, start in (("up", PREFACE), ("down", 0)):
        frames = _frames(snapshot[key], start)
        tail = frames[-3 * LAST:]  # a request's frames: its DATA and two WINDOW_UPDATEs (stream, connection)
        counts = collections.Counter(f"{name} {size} B" for name, size in tail)
        result[key] = {"frames_per_request": {k: v / LAST for k, v in sorted(counts.items())},
                       "bytes_per_request": sum(size for _, size in tail) / LAST}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
