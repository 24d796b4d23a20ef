"""One sample per request on the wire (issue 24): unary Infer, a streaming session (InferStream) and a session on
the server's TCP session port (docs/protocol.md 5.2), bytes counted on the socket by an independent proxy
(splitprune.link.LinkProxy, no shaping), both directions, all framing included.

A `splitprune serve --model CHECKPOINT --session-port P` subprocess on loopback; the client (this process,
torch device half) sends REQUESTS single test images at the model's trained budget with each dtype, first on
one channel as unary Infer calls, then on another as one InferStream session, then on one connection to the
session port. Steady state: the bytes between the WARMUP-th and the last request, divided by their count; the
first request (connection, HTTP/2 settings, the stream's headers and its InferOpen) is reported apart.

    python -m splitprune.bench.paper.single --checkpoint CHECKPOINT --out bench_results/entropy/single
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REQUESTS, WARMUP = 200, 20
DTYPES = ("fp16", "int4", "ec", "ec3")
TARGETS = {"up": 32, "down": 24}  # bytes per request on the wire, steady state (issue 24)


def encoded_samples(checkpoint: str, dtype: str, count: int):
    """(meta, the EncodedTensor of each of `count` test images, one sample each, at the trained budget)."""
    import torch

    from splitprune.compression import ChannelCodec
    from splitprune.export import load_workers, sample_inputs

    device, server, cfg, meta, _ = load_workers(checkpoint)
    device.codec = ChannelCodec(dtype, server.spec.tables)  # the model's entropy tables, by grid
    x, _, _ = sample_inputs(cfg, meta["in_channels"], count)
    with torch.no_grad():
        z = device.half.eval()(x)
        channels = device.kept_channels(int(meta["budget"]))
        return meta, [device._encode(z[i:i + 1], channels)[1] for i in range(count)]


def _measure(address: tuple[str, int], send, requests: int, credentials=None) -> dict:
    """Socket bytes per request through a fresh proxy: the first request, and the steady state after WARMUP."""
    import grpc

    from splitprune.link.profile import LinkProfile
    from splitprune.link.proxy import LinkProxy
    from splitprune.wire.channels import client_options

    with LinkProxy(("127.0.0.1", 0), address, LinkProfile()) as proxy:
        target, options = "%s:%d" % proxy.address, client_options()  # the runtime's settings
        channel = (grpc.secure_channel(target, credentials, options) if credentials is not None
                   else grpc.insecure_channel(target, options))
        counts, payload = [], 0
        with send(channel, proxy.address) as call:
            for i in range(requests):
                payload = call(i)
                counts.append(proxy.counters())
        channel.close()
    steady = requests - 1 - WARMUP
    return {"first_up": counts[0].bytes_up, "first_down": counts[0].bytes_down,
            "steady_up": round((counts[-1].bytes_up - counts[WARMUP].bytes_up) / steady, 1),
            "steady_down": round((counts[-1].bytes_down - counts[WARMUP].bytes_down) / steady, 1),
            "payload_up": payload}


def run(checkpoint: str, out: Path, dtypes: tuple[str, ...] = DTYPES, tls: bool = False) -> dict:
    """`tls`: the server speaks TLS on both ports (throw-away certificates), the clients verify it."""
    import contextlib

    from splitprune.bench.core.common import markdown_table, write_results
    from splitprune.bench.core.processes import ServeSubprocess, free_port
    from splitprune.proto import pb
    from splitprune.proto import service_pb2 as spb
    from splitprune.wire.envelopes import INFER_METHOD
    from splitprune.wire.session_socket import SocketSession
    from splitprune.wire.stream import InferStreamClient, item_data, open_message

    from splitprune.bench.paper.measure import with_all_tables

    out.mkdir(parents=True, exist_ok=True)
    checkpoint = with_all_tables(checkpoint, out / "checkpoint")  # tables for every grid (ec3 ...), sealed
    session_port, more, credentials, context = free_port(), [], None, None
    if tls:
        import tempfile

        import grpc

        from splitprune.bench.core.certificates import make_certificates
        from splitprune.wire.session_socket import client_context

        certs = make_certificates(tempfile.mkdtemp(prefix="splitprune-certs-"))
        more = ["--tls-cert", certs.server_cert, "--tls-key", certs.server_key]
        credentials = grpc.ssl_channel_credentials(Path(certs.ca).read_bytes())
        context = client_context(certs.ca)
    server = ServeSubprocess(free_port(), "--model", checkpoint, "--session-port", str(session_port), *more,
                             log_path=out / "serve.log").start()
    host, port = server.address.rsplit(":", 1)
    rows = []
    try:
        for dtype in dtypes:
            meta, tensors = encoded_samples(checkpoint, dtype, REQUESTS)
            fp, budget = meta["fingerprint"], int(meta["budget"])

            @contextlib.contextmanager
            def unary(channel, _):
                call = channel.unary_unary(INFER_METHOD)

                def one(i):
                    req = spb.InferRequest(fingerprint=fp, budget=budget,
                                           eval=pb.EvalRequest(request_id=i + 1, activations=tensors[i]))
                    call(req.SerializeToString(), timeout=60)
                    return req.ByteSize()
                yield one

            @contextlib.contextmanager
            def stream(channel, address):
                session = (InferStreamClient(channel, open_message(fp, budget, tensors[0])) if address is None
                           else SocketSession(address, open_message(fp, budget, tensors[0]), tls=context))

                def one(i):
                    return session.infer(item_data(tensors[i])).bytes_up
                try:
                    yield one
                finally:
                    session.close()

            for name, send, where in (("unary Infer", unary, int(port)),
                                      ("InferStream session", lambda c, _: stream(c, None), int(port)),
                                      ("TCP session port", stream, session_port)):
                rows.append({"dtype": dtype, "mode": name + (" (TLS)" if tls else ""), "budget": budget,
                             **_measure((host, where), send, REQUESTS, credentials)})
    finally:
        server.stop()
    for r in rows:
        r["up_target_holds"] = r["steady_up"] <= TARGETS["up"]
        r["down_target_holds"] = r["steady_down"] <= TARGETS["down"]
    command = (f"python -m splitprune.bench.paper.single --checkpoint {checkpoint} --out {out}"
               + (f" --dtypes {','.join(dtypes)}" if dtypes != DTYPES else "") + (" --tls" if tls else ""))
    table = markdown_table(
        ["dtype", "mode", "payload up (B)", "wire up per request (B, steady)", "wire down per request (B, steady)",
         "first request up / down (B)", f"<= {TARGETS['up']} B up / <= {TARGETS['down']} B down"],
        [[r["dtype"], r["mode"], r["payload_up"], r["steady_up"], r["steady_down"],
          f"{r['first_up']} / {r['first_down']}",
          f"{'holds' if r['up_target_holds'] else 'missed'} / {'holds' if r['down_target_holds'] else 'missed'}"]
         for r in rows])
    markdown = (f"`{command}`\n\n{REQUESTS} single-sample requests per row at budget {rows[0]['budget']}; steady state "
                f"over requests {WARMUP + 1}..{REQUESTS}; bytes counted by an independent proxy on the socket.\n\n"
                f"{table}\n")
    (out / "single.md").write_text(markdown)
    write_results(out, "single", {"single_command": command, "checkpoint": checkpoint, "rows": rows,
                                  "targets": TARGETS, "requests": REQUESTS, "warmup": WARMUP})
    print(markdown)
    return {"rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", default="bench_results/entropy/single")
    p.add_argument("--tls", action="store_true", help="the server speaks TLS (throw-away certificates, openssl)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="uplink dtypes, comma-separated")
    args = p.parse_args(argv)
    from splitprune.config import WIRE_DTYPE_NAMES
    from splitprune.errors import UserError

    dtypes = tuple(args.dtypes.split(","))
    if not set(dtypes) <= set(WIRE_DTYPE_NAMES):
        p.error(f"--dtypes takes names of {', '.join(WIRE_DTYPE_NAMES)}, comma-separated")
    try:
        from splitprune.training.checkpoint import read_meta

        read_meta(args.checkpoint)   # a bad checkpoint is refused before the output folder is made
        run(args.checkpoint, Path(args.out), dtypes, args.tls)
    except UserError as exc:
        print(f"single: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
