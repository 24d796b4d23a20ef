"""`splitprune infer`: split inference: the device half runs here, the rest on a `splitprune serve` server."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from splitprune.adaptive.stream import add_auto_flags, check_auto_args
from splitprune.cli.common import add_connect_flags, connect_config, percent
from splitprune.compression.codec import WIRE_DTYPES
from splitprune.errors import UserError


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="split inference against a server: accuracy and latency",
                              description=__doc__)
    add_connect_flags(p, "a `splitprune serve` server hosting the model")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or run folder) of the trained model; "
                                                       "the server must host the same model")
    p.add_argument("--budget", help="channels sent per request, up to the trained budget, or 'all' "
                                    "(default: the trained budget); 'auto': chosen per request to meet --latency-ms")
    p.add_argument("--dtype-up", choices=list(WIRE_DTYPES), help="uplink dtype (default: as trained)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per inference request (default: 1)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="send the requests on one streaming session (InferStream: the request's header said once, "
                        "then each request is its data alone; the default); --no-stream: one Infer call each")
    p.add_argument("--tcp-session", action="store_true",
                   help="open the sessions on the server's TCP session port (serve --session-port, docs/protocol.md "
                        "5.2): each message framed by its length alone, no HTTP/2 around it")
    p.add_argument("--test-subset", type=int, help="use N test images (default: all)")
    p.add_argument("--data-dir", help="where the dataset is (default: as trained)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=3,
                   help="requests sent first and left out of the latency figures (default: 3)")
    p.add_argument("--out", help="also write the results as JSON here")
    add_auto_flags(p, "the device picks (budget, uplink dtype) per single-sample request from the link it "
                      "measures", per="request, device to answer", model="trained", inputs="test images")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # every flag is checked before data, model or connection are loaded
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be positive, got {args.threads}")
    for name in ("batch_size", "test_subset"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    check_auto_args(args, args.budget == "auto")
    if args.tcp_session and not args.stream:
        raise UserError("--tcp-session opens streaming sessions: leave out --no-stream")
    remote = connect_config(args)
    from splitprune.training.checkpoint import parse_budget, read_meta

    meta = read_meta(args.checkpoint)
    if args.budget != "auto":
        parse_budget(args.budget, int(meta.get("budget", 0)), int(meta.get("cut_shape", [0])[0]))
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.budget == "auto":
        return run_auto(args, remote)
    from splitprune.client.split_inference import run_inference

    r = run_inference(args.checkpoint, remote, args.budget, args.dtype_up, args.batch_size,
                      args.test_subset, args.data_dir, max(args.warmup, 0), args.stream, args.tcp_session)
    lat, rpc = r["latency_ms"], r["rpc_latency_ms"]
    print(f"budget {r['budget']} of {r['channels']} channels, uplink {r['dtype_up']}, {r['batch_size']} sample(s) "
          f"per request: test accuracy {percent(r['test_accuracy'])} on {r['test_samples']} images")
    print(f"latency per request: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, mean {lat['mean']:.2f} ms "
          f"(network round trip p50 {rpc['p50']:.2f} ms, server {r['server_ms']['p50']:.2f} ms); "
          f"{r['samples_per_second']:.1f} samples/s")
    t = r["transport"]["purposes"]["evaluation"]
    wire = f", {t['socket_bytes_up']} B on the socket" if "socket_bytes_up" in t else ""
    print(f"uplink {r['bytes_up_per_sample']:.1f} B/sample of payload ({r['payload_bytes_up']} B; "
          f"{t['message_bytes_up']} B of Infer messages{wire}, warm-up included)")
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=2))
        print(f"written to {args.out}")
    return 0


def run_auto(args: argparse.Namespace, remote) -> int:
    from splitprune.adaptive.budgets import uplink_dtypes
    from splitprune.adaptive.stream import summary_lines
    from splitprune.client.auto import run_auto as stream
    from splitprune.files import check_out_file, write_text_atomic

    if args.dtype_up:
        raise UserError("--budget auto chooses the uplink dtype: give the candidates with --dtypes-up")
    for path, flag in ((args.out, "--out"), (args.log, "--log")):
        if path:
            check_out_file(path, flag)
    from splitprune.client.split_inference import open_session

    session = open_session(args.checkpoint, remote, None, args.batch_size, args.test_subset, args.data_dir,
                           args.stream, args.tcp_session)
    try:
        dtypes = uplink_dtypes(args.dtypes_up, session.cfg.dtype_up)
        result = stream(session, args.latency_ms, dtypes, max(args.warmup, 0), duration=args.duration,
                        show=print, every=args.every, hedge=bool(args.hedge))
        transport = session.client.traffic.report()
    finally:
        session.client.close()
    summary = {**result.summary(), "checkpoint": session.meta["_folder"], "server": remote.server,
               "options": [o.label() for o in result.options], "transport": transport}
    for line in summary_lines(summary):
        print(line)
    if args.log:
        write_text_atomic(Path(args.log), result.log())
        print(f"log written to {args.log}")
    if args.out:
        write_text_atomic(Path(args.out), json.dumps(summary, indent=2))
        print(f"written to {args.out}")
    return 0
