"""`splitprune infer`: split inference: the device half runs here, the rest on a `splitprune serve` server."""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from splitprune.adaptive.stream import add_auto_flags, check_auto_args, percentile
from splitprune.cli.common import percent
from splitprune.cli.train import add_remote_flags
from splitprune.compression.codec import WIRE_DTYPES
from splitprune.errors import UserError


def add_parser(subparsers, name: str) -> None:
    p = subparsers.add_parser(name, help="split inference against a server: accuracy and latency",
                              description=__doc__)
    add_remote_flags(p, "a `splitprune serve` server hosting the model")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (or run folder) of the trained model; "
                                                       "the server must host the same model")
    p.add_argument("--budget", help="channels sent per request, up to the trained budget, or 'all' "
                                    "(default: the trained budget); 'auto': chosen per request to meet --latency-ms")
    p.add_argument("--dtype-up", choices=list(WIRE_DTYPES), help="uplink dtype (default: as trained)")
    p.add_argument("--batch-size", type=int, default=1, help="samples per inference request (default: 1)")
    p.add_argument("--test-subset", type=int, help="use N test images (default: all)")
    p.add_argument("--data-dir", help="where the dataset is (default: as trained)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--warmup", type=int, default=3,
                   help="requests sent first and left out of the latency figures (default: 3)")
    p.add_argument("--out", help="also write the results as JSON here")
    add_auto_flags(p, "the device picks (budget, uplink dtype) per single-sample request from the link it "
                      "measures", per="request, device to answer", model="trained", inputs="test images")
    p.set_defaults(run=run)


@dataclass
class Session:
    """A checked split-inference setup: the server's half is the checkpoint's, the device half loaded."""

    client: object          # InferenceClient
    info: object            # the server's DescribeReply
    device: object          # DeviceWorker
    cfg: object             # RunConfig
    meta: dict
    batches: list           # the test set, [(x, y)] per request


def open_session(checkpoint: str, server: str, dtype_up: str | None = None, batch_size: int = 1,
                 test_subset: int | None = None, data_dir: str | None = None, token: str | None = None,
                 tls=None, measure: bool = False) -> Session:
    """Everything before the first request; the caller closes `session.client`."""
    from splitprune.compression import ChannelCodec
    from splitprune.config import make_config
    from splitprune.data import make_loaders
    from splitprune.training.checkpoint import load_module, read_meta, read_tensors
    from splitprune.training.setup import build_device_worker
    from splitprune.transport.inference import InferenceClient
    from splitprune.transport.protocol import weights_digest

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    meta = read_meta(checkpoint)
    if "config" not in meta or "num_classes" not in meta:
        raise UserError(f"{checkpoint} is not a model checkpoint of `splitprune train`")
    if meta.get("server_half"):  # without the server weights, nothing says the server's half is this run's
        raise UserError(f"{checkpoint} holds the device half of a remote run only: fetch the whole model with "
                        f"`splitprune pull --server {server} --checkpoint {checkpoint} --out DIR`, then infer "
                        "with --checkpoint DIR")
    values = {**meta["config"], "test_subset": test_subset, "test_batch_size": batch_size}
    if dtype_up:
        values["dtype_up"] = dtype_up
    if data_dir:
        values["data_dir"] = data_dir
    cfg = make_config(values)
    tensors = read_tensors(meta["_folder"])
    _, test, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size,
                              meta["in_channels"], cfg.seed, 1, cfg.test_subset, False, batch_size)
    device, _ = build_device_worker(cfg, meta["num_classes"], meta["in_channels"])
    load_module("device", device.half, tensors)
    device.codec = ChannelCodec(cfg.dtype_up)
    client = InferenceClient(server, meta["fingerprint"], token, tls, measure)  # connect last: all else is ready
    try:
        info = client.describe()
        if list(info.wire_shape) != list(meta["wire_shape"]) or info.num_classes != meta["num_classes"]:
            raise UserError(f"the server's model {info.fingerprint} has wire shape {list(info.wire_shape)} and "
                            f"{info.num_classes} classes; the checkpoint {list(meta['wire_shape'])} and "
                            f"{meta['num_classes']}")
        if info.weights_sha256 != weights_digest(tensors):
            raise UserError(f"the server's half of model {info.fingerprint} differs from the one in {checkpoint} "
                            "(trained further, or another run): serve this checkpoint with "
                            f"`splitprune serve --model {checkpoint}`")
        if batch_size > info.max_batch:
            raise UserError(f"--batch-size {batch_size} exceeds the server's limit of {info.max_batch} for this model")
        return Session(client, info, device, cfg, meta, list(test))
    except BaseException:
        client.close()
        raise


def run_inference(checkpoint: str, server: str, budget_text: str | None = None, dtype_up: str | None = None,
                  batch_size: int = 1, test_subset: int | None = None, data_dir: str | None = None,
                  token: str | None = None, tls=None, warmup: int = 3, measure: bool = False) -> dict:
    import torch

    from splitprune.cli.evaluate import parse_budget

    session = open_session(checkpoint, server, dtype_up, batch_size, test_subset, data_dir, token, tls, measure)
    client, info, device, cfg, meta, batches = (session.client, session.info, session.device, session.cfg,
                                                session.meta, session.batches)
    channels = int(meta["cut_shape"][0])
    try:
        budget = parse_budget(budget_text, int(meta["budget"]), channels)
        link = client.link(budget)
        for x, _ in batches[:warmup]:
            device.predict(x, link, budget)
        client.latencies_ms.clear()
        client.server_ms.clear()
        correct = samples = up = down = 0
        wall = []
        start = time.perf_counter()
        for x, y in batches:
            t0 = time.perf_counter()
            predictions, sent, received = device.predict(x, link, budget)
            wall.append((time.perf_counter() - t0) * 1e3)
            correct += int((predictions == y).sum())
            samples, up, down = samples + len(y), up + sent, down + received
        seconds = time.perf_counter() - start
        rpc = client.latencies_ms
        result = {
            "checkpoint": meta["_folder"], "server": client.conn.target, "fingerprint": info.fingerprint,
            "budget": budget, "channels": channels, "dtype_up": cfg.dtype_up, "batch_size": batch_size,
            "requests": len(batches), "test_samples": samples, "test_accuracy": correct / max(samples, 1),
            "samples_per_second": samples / seconds if seconds else None,
            "latency_ms": {"p50": percentile(wall, 50), "p99": percentile(wall, 99), "mean": sum(wall) / len(wall)},
            "rpc_latency_ms": {"p50": percentile(rpc, 50), "p99": percentile(rpc, 99)},
            "server_ms": {"p50": percentile(client.server_ms, 50), "p99": percentile(client.server_ms, 99)},
            "payload_bytes_up": up, "payload_bytes_down": down, "bytes_up_per_sample": up / max(samples, 1),
            "transport": client.traffic.report(), "threads": torch.get_num_threads(),
        }
    finally:
        client.close()
    return result


def run(args: argparse.Namespace) -> int:
    import torch

    from splitprune.transport.client import tls_from_args, token_from_args

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_auto_args(args, args.budget == "auto")
    if args.budget == "auto":
        return run_auto(args, token_from_args(args), tls_from_args(args))
    r = run_inference(args.checkpoint, args.server, args.budget, args.dtype_up, args.batch_size, args.test_subset,
                      args.data_dir, token_from_args(args), tls_from_args(args), max(args.warmup, 0),
                      args.measure_socket)
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


def run_auto(args: argparse.Namespace, token, tls) -> int:
    from splitprune.adaptive.stream import summary_lines
    from splitprune.cli.common import check_out_file, write_text_atomic
    from splitprune.adaptive.budgets import uplink_dtypes
    from splitprune.cli.auto import run_auto as stream

    if args.dtype_up:
        raise UserError("--budget auto chooses the uplink dtype: give the candidates with --dtypes-up")
    for path, flag in ((args.out, "--out"), (args.log, "--log")):
        if path:
            check_out_file(path, flag)
    session = open_session(args.checkpoint, args.server, None, args.batch_size, args.test_subset, args.data_dir,
                           token, tls, args.measure_socket)
    try:
        dtypes = uplink_dtypes(args.dtypes_up, session.cfg.dtype_up)
        result = stream(session, args.latency_ms, dtypes, max(args.warmup, 0), duration=args.duration,
                        show=print, every=args.every)
        transport = session.client.traffic.report()
    finally:
        session.client.close()
    summary = {**result.summary(), "checkpoint": session.meta["_folder"], "server": args.server,
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
