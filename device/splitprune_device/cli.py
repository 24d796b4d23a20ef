"""`splitprune-device`: the device half of split inference with ONNX Runtime, against a `splitprune serve` server."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from splitprune.adaptive.stream import add_auto_flags, check_auto_args
from splitprune.errors import UserError, run_command

TOKEN_ENV = "SPLITPRUNE_TOKEN"
SHOWN = 20  # predictions printed; --out holds them all


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="splitprune-device", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("infer", help="classify images: device half here, server half on the server",
                       description="Classify images with an exported device half (`splitprune export`) and the "
                                   "server half on a `splitprune serve` server; print predictions, per-stage "
                                   "latency and bytes.")
    p.add_argument("inputs", nargs="+", metavar="IMAGES",
                   help="image files (PGM/PPM; PNG/JPEG with Pillow), or batches: IDX (.gz), .npy, .npz "
                        "('images' uint8 [N,H,W(,C)], optional 'labels')")
    p.add_argument("--server", required=True, metavar="HOST:PORT", help="a `splitprune serve` server")
    p.add_argument("--model", required=True, metavar="DIR", help="folder written by `splitprune export`")
    p.add_argument("--budget", help="channels per request: one of the exported budgets (default: the trained "
                                    "budget), or 'auto': (budget, uplink dtype) chosen per image to meet --latency-ms")
    p.add_argument("--token", help=f"bearer token for the server (default: ${TOKEN_ENV})")
    p.add_argument("--tls-ca", help="CA certificate to verify the server (enables TLS)")
    p.add_argument("--labels", help="IDX or .npy class ids of the inputs, to report accuracy")
    p.add_argument("--batch-size", type=int, default=1, help="images per request (default: 1)")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--threads", type=int, default=1,
                   help="onnxruntime threads (default: 1, the weak-device setting)")
    p.add_argument("--cpu", type=int, help="pin this process to one CPU core (Linux), for steadier timings")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                   help="send the requests on one streaming session (InferStream: the request's header said once, "
                        "then each request is its data alone; the default); --no-stream: one Infer call each")
    p.add_argument("--tcp-session", action="store_true",
                   help="open the sessions on the server's TCP session port (serve --session-port): each message "
                        "framed by its length alone, no HTTP/2 around it")
    p.add_argument("--connect-timeout", type=float, default=20.0,
                   help="seconds to wait for the server to answer at all (default: 20)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent first and left out of the timings")
    p.add_argument("--out", help="also write predictions and every timing as JSON here")
    add_auto_flags(p, "one image per request, each with the exported budget and uplink dtype the budget "
                      "controller picks from the link it measures", per="image, on this device end to end",
                   model="exported", inputs="images")
    p.set_defaults(run=run_infer)
    return parser


def load_inputs(paths: list[str], labels_path: str | None,
                limit: int | None) -> tuple[list[str], np.ndarray, np.ndarray | None]:
    from splitprune_device.images import read_inputs, read_labels

    names, arrays, labels = [], [], []
    for path in paths:
        images, file_labels = read_inputs(path)
        names += [path] if len(images) == 1 else [f"{path}[{i}]" for i in range(len(images))]
        arrays.append(images)
        labels.append(file_labels)
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise UserError(f"the inputs have different sizes {sorted(shapes)}: run them separately")
    images = np.concatenate(arrays)
    y = read_labels(labels_path) if labels_path else (
        np.concatenate(labels) if all(v is not None for v in labels) else None)
    if y is not None and len(y) != len(images):
        raise UserError(f"{len(y)} labels for {len(images)} images")
    if limit is not None:
        if limit < 1:
            raise UserError(f"--limit must be at least 1, got {limit}")
        names, images, y = names[:limit], images[:limit], None if y is None else y[:limit]
    return names, images, y


def summary(r, model, y: np.ndarray | None, args) -> dict:
    def stats(values: list[float]) -> dict:
        return {"p50": float(np.percentile(values, 50)), "mean": float(np.mean(values)),
                "p99": float(np.percentile(values, 99))}

    n = len(r.predictions)
    out = {"model": model.fingerprint, "server": args.server, "images": n, "requests": r.requests,
           "batch_size": args.batch_size, "budgets": sorted(set(r.budgets)), "channels": model.channels,
           "dtype_up": model.manifest["codec"]["dtype_up"], "threads": args.threads,
           "latency_ms": {stage: stats(values) for stage, values in r.ms.items()},
           "payload_bytes_up": r.payload_bytes_up, "message_bytes_up": r.message_bytes_up,
           "message_bytes_down": r.message_bytes_down, "payload_bytes_up_per_image": r.payload_bytes_up / n}
    if y is not None:
        out["accuracy"] = float((np.asarray(r.predictions) == y).mean())
    return out


def print_report(names: list[str], r, s: dict, classes: list[str] | None) -> None:
    for name, p in list(zip(names, r.predictions))[:SHOWN]:
        print(f"{name}: {p}" + (f" {classes[p]}" if classes and p < len(classes) else ""))
    if len(names) > SHOWN:
        print(f"... {len(names) - SHOWN} more predictions (--out FILE writes them all)")
    if "accuracy" in s:
        print(f"accuracy {100 * s['accuracy']:.2f}% on {s['images']} labelled images")
    print(f"budget {','.join(map(str, s['budgets']))} of {s['channels']} channels, uplink {s['dtype_up']}, "
          f"{s['batch_size']} image(s) per request, {s['requests']} requests, onnxruntime on {s['threads']} thread(s)")
    labels = {"preprocess": "preprocess", "device": "device compute (onnx)", "encode": "encode",
              "round_trip": "uplink + server + downlink", "server": "  of which server (its report)",
              "total": "total"}
    print(f"{'latency per request (ms)':30s} {'p50':>8s} {'mean':>8s} {'p99':>8s}")
    for stage, text in labels.items():
        v = s["latency_ms"][stage]
        print(f"{text:30s} {v['p50']:8.3f} {v['mean']:8.3f} {v['p99']:8.3f}")
    print(f"uplink {s['payload_bytes_up_per_image']:.1f} B/image of payload (EvalRequest; {s['payload_bytes_up']} B), "
          f"{s['message_bytes_up']} B of InferRequest messages; downlink {s['message_bytes_down']} B")


def run_infer(args: argparse.Namespace) -> int:
    from splitprune_device.budget import make_policy
    from splitprune_device.client import InferenceClient
    from splitprune_device.model import DeviceModel
    from splitprune_device.runner import check_server, run_inference

    if args.tcp_session and not args.stream:
        raise UserError("--tcp-session opens streaming sessions: leave out --no-stream")
    if args.cpu is not None:
        if not hasattr(os, "sched_setaffinity"):
            raise UserError("--cpu needs Linux (sched_setaffinity)")
        try:
            os.sched_setaffinity(0, {args.cpu})
        except OSError as exc:
            raise UserError(f"--cpu {args.cpu}: {exc.strerror or exc}") from None
    model = DeviceModel(args.model, args.threads)
    auto = args.budget == "auto"
    check_auto_args(args, auto)
    policy = None if auto else make_policy(args.budget, model.budgets, int(model.manifest.get("trained_budget", 0)))
    names, images, y = load_inputs(args.inputs, args.labels, args.limit)
    model.prepare(images[:1])  # a wrong size or channel count is refused before connecting
    client = InferenceClient(args.server, args.token or os.environ.get(TOKEN_ENV) or None, args.tls_ca,
                          connect_timeout_s=args.connect_timeout, stream=args.stream, tcp=args.tcp_session)
    try:
        info = check_server(model, client)
        if args.batch_size > info.max_batch:
            raise UserError(f"--batch-size {args.batch_size} exceeds the server's limit of {info.max_batch}")
        if auto:
            return stream_auto(model, client, images, y, args)
        r = run_inference(model, client, images, policy, args.batch_size, args.warmup)
    finally:
        client.close()
    s = summary(r, model, y, args)
    print_report(names, r, s, model.manifest.get("classes"))
    if args.out:
        Path(args.out).write_text(json.dumps({**s, "predictions": r.predictions, "ms": r.ms}, indent=1))
        print(f"written to {args.out}")
    return 0


def stream_auto(model, client, images: np.ndarray, y: np.ndarray | None, args: argparse.Namespace) -> int:
    """`--budget auto`: the shared streaming loop of splitprune.adaptive, this package's ONNX device half."""
    from splitprune.adaptive.budgets import uplink_dtypes
    from splitprune.adaptive.policy import AutoBudget
    from splitprune.adaptive.stream import run_stream, summary_lines
    from splitprune_device.budget import auto_options
    from splitprune_device.runner import make_send, make_start

    options = auto_options(model, uplink_dtypes(args.dtypes_up, model.manifest["codec"]["dtype_up"]), args.stream)
    result = run_stream(make_send(model, client, images, y), AutoBudget(options, args.latency_ms / 1e3),
                        None if args.duration else len(images), args.duration, show=print, every=args.every,
                        warmup=max(args.warmup, 0),
                        hedge=make_start(model, client, images, y) if args.hedge else None)
    summary = {**result.summary(), "model": model.fingerprint, "server": args.server,
               "options": [o.label() for o in options]}
    for line in summary_lines(summary):
        print(line)
    for path, text in ((args.log, result.log()), (args.out, json.dumps(summary, indent=1))):
        if path:
            Path(path).write_text(text)
            print(f"written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("splitprune-device", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
