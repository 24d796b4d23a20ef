"""In-process vs loopback-gRPC split training and split inference, side by side.

For each setting (B=4 fp16 uplink and all channels fp32; batch 16 and 64) it trains one epoch of the
same seeded run in-process and against a `splitprune serve` subprocess on loopback, and reports the
training throughput (samples/s over the training loop, evaluation excluded), the payload bytes the
device counted, the bytes measured on the TCP socket and their ratio (wire overhead), per direction.
Then it measures split-inference latency per single-sample request (p50/p99), in-process vs gRPC.

    python -m splitprune.bench.systems.transport --out bench_results/transport
"""
from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from splitprune.bench.core.profiles import Profile

WARMUP = 5  # single-sample inference requests sent before the measured ones

SETTINGS = [
    # name, method, budget, dtype_up, dtype_down
    ("B=4 fp16", "ca", 4, "fp16", "fp32"),
    ("all fp32", "sl", None, "fp32", "fp32"),
]


def _config(method, budget, dtype_up, dtype_down, batch, args, **more):
    from splitprune.config import make_config

    values = dict(method=method, dtype_up=dtype_up, dtype_down=dtype_down, batch_size=batch, epochs=1,
                  train_subset=args.train_subset, test_subset=args.test_subset, test_batch_size=64,
                  threads=args.threads, seed=args.seed, model=args.model, dataset=args.dataset)
    if budget:
        values["budget"] = budget
    if args.data_dir:
        values["data_dir"] = args.data_dir
    return make_config({**values, **more})


def _train(cfg, out: Path, server: str | None) -> dict:
    import shutil

    from splitprune.client.config import ConnectConfig
    from splitprune.client.connect import connect
    from splitprune.training.trainer import Trainer

    shutil.rmtree(out, ignore_errors=True)
    endpoint = connect(cfg, ConnectConfig(server=server, measure_socket=True), out=str(out)) if server else None
    try:
        s = Trainer(cfg, out, endpoint=endpoint, show_progress=False).run()
    finally:
        if endpoint is not None:
            endpoint.close()
    train_seconds = s["train_seconds"]
    row = {"train_seconds": train_seconds, "samples_per_s": s["train_samples"] / train_seconds,
           "bytes_up": s["bytes_up"], "bytes_down": s["bytes_down"], "test_accuracy": s["final_test_accuracy"]}
    if server:
        # training steps' messages against the socket bytes of the steps plus connection set-up (control)
        tr, ctl = (s["transport"]["purposes"][p] for p in ("training", "control"))
        payload = {d: tr[f"message_bytes_{d}"] for d in ("up", "down")}
        wire = {d: tr[f"socket_bytes_{d}"] + ctl[f"socket_bytes_{d}"] for d in ("up", "down")}
        row.update(payload_bytes_up=payload["up"], payload_bytes_down=payload["down"],
                   wire_bytes_up=wire["up"], wire_bytes_down=wire["down"],
                   handshake_bytes=ctl["socket_bytes_up"] + ctl["socket_bytes_down"],
                   wire_over_payload_up=round(wire["up"] / payload["up"], 5),
                   wire_over_payload_down=round(wire["down"] / payload["down"], 5),
                   wire_over_payload=round(sum(wire.values()) / sum(payload.values()), 5),
                   wire_over_payload_after_setup_up=round(tr["socket_bytes_up"] / payload["up"], 5),
                   wire_over_payload_after_setup_down=round(tr["socket_bytes_down"] / payload["down"], 5))
    return row


def _sent(run: dict) -> int:
    """Requests an inference session put on the socket: the measured ones plus the warm-up (replayed from them)."""
    return run["requests"] + min(WARMUP, run["requests"])


def _steady_wire(remote: dict, short: dict) -> dict:
    """Socket bytes per request once the connection and handshake are paid: two sessions of different length
    (same setup, same warm-up) differ by exactly their extra requests."""
    extra = _sent(remote) - _sent(short)
    a, b = _wire(remote), _wire(short)
    return {"wire_bytes_up_per_request_after_setup": (a["socket_bytes_up"] - b["socket_bytes_up"]) / extra,
            "wire_bytes_down_per_request_after_setup": (a["socket_bytes_down"] - b["socket_bytes_down"]) / extra,
            "payload_bytes_up_per_request_after_setup": (a["message_bytes_up"] - b["message_bytes_up"]) / extra}


def _wire(run: dict) -> dict:
    """An inference session's bytes, all purposes (requests, Describe, connection set-up) added up."""
    purposes = run["transport"]["purposes"].values()
    return {k: sum(p[k] for p in purposes) for k in ("socket_bytes_up", "socket_bytes_down", "message_bytes_up")}


def _local_latency(checkpoint: Path, budget: int, requests: int, warmup: int = 5) -> dict:
    """Single-sample split inference in-process (LocalLink): what gRPC adds is the difference."""
    from splitprune.adaptive.stream import percentile
    from splitprune.data import make_loaders
    from splitprune.training.server_worker import LocalLink
    from splitprune.training.setup import load_checkpoint

    loaded = load_checkpoint(checkpoint, test_subset=requests, test_batch_size=1)
    cfg, device, server = loaded.cfg, loaded.device, loaded.server
    _, test, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size, loaded.meta["in_channels"],
                              cfg.seed, 1, cfg.test_subset, False, 1)
    link = LocalLink(server)
    batches = list(test)
    for x, _ in batches[:warmup]:
        device.predict(x, link, budget)
    times, correct = [], 0
    for x, y in batches:
        t0 = time.perf_counter()
        predictions, _, _ = device.predict(x, link, budget)
        times.append((time.perf_counter() - t0) * 1e3)
        correct += int((predictions == y).sum())
    return {"p50_ms": percentile(times, 50), "p99_ms": percentile(times, 99), "mean_ms": statistics.fmean(times),
            "accuracy": correct / len(batches), "requests": len(batches)}


PROFILES = {  # `splitprune bench transport --profile P`
    "quick": dict(model="vgg11_bn_compact", train_subset=512, test_subset=64, batches="16,64", repeats=3,
                  infer_requests=200),
    "paper": dict(model="vgg11_bn", train_subset=512, test_subset=64, batches="16,64", repeats=2,
                  infer_requests=100),
}


def run(profile: str | Profile, out: Path) -> dict:
    """Entry point of `splitprune bench transport`; also measures the rate suite's chosen configurations."""
    import json

    from splitprune.bench.core.profiles import profile_name

    profile = profile_name(profile)
    rate = Path(out).parent / "rate" / "rate.json"
    chosen = json.loads(rate.read_text()).get("choices", []) if rate.exists() else []
    configs = dict.fromkeys(f"{c['budget'] if c['budget'] != 'all' else 512}:{c['dtype']}:{c['resolution']}"
                            for c in chosen if c.get("config"))
    return main(["--out", str(out), *(f"--{k.replace('_', '-')}={v}" for k, v in PROFILES[profile].items()),
                 *(f"--infer-config={c}" for c in configs)], return_results=True)


def main(argv: list[str] | None = None, return_results: bool = False):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_results/transport", help="folder for transport.json, results.md, command.txt")
    p.add_argument("--model", default="vgg11_bn_compact")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--data-dir")
    p.add_argument("--train-subset", type=int, default=512)
    p.add_argument("--test-subset", type=int, default=64)
    p.add_argument("--batches", default="16,64", help="training batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="runs per mode and setting (alternated); the best counts")
    p.add_argument("--infer-requests", type=int, default=200, help="single-sample inference requests per setting")
    p.add_argument("--infer-config", action="append", metavar="B:DTYPE:R",
                   help="also measure single-sample inference of this budget, uplink dtype and resolution")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the device process and of the server")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch

    from splitprune.bench.core.common import write_results
    from splitprune.bench.core.processes import ServeSubprocess, free_port

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(prefix="splitprune-bench-transport-")  # run folders: checkpoints, not kept
    work = Path(scratch.name)
    batches = [int(b) for b in args.batches.split(",")]
    server = ServeSubprocess(free_port(), "--quiet", log_path=work / "serve.log", threads=args.threads).start()
    command = "python -m splitprune.bench.systems.transport " + shlex.join(argv if argv is not None else sys.argv[1:])
    chosen = [c for c in (args.infer_config or [])]
    results = {"transport_command": command,
               "setup": "CPU only; the server runs in a subprocess on 127.0.0.1 with the same torch threads as the "
                        "client; the client reaches it through an unshaped in-process TCP relay that counts socket bytes",
               "train_subset": args.train_subset, "test_subset": args.test_subset, "model": args.model,
               "dataset": args.dataset, "threads": args.threads, "repeats": args.repeats,
               "training": [], "inference": []}
    try:
        for name, method, budget, up, down in SETTINGS:
            for batch in batches:
                cfg = _config(method, budget, up, down, batch, args)
                tag = f"{name.replace(' ', '_').replace('=', '')}_b{batch}"
                runs = {"in-process": [], "grpc": []}
                for r in range(args.repeats):
                    runs["in-process"].append(_train(cfg, work / f"{tag}_local{r}", None))
                    runs["grpc"].append(_train(cfg, work / f"{tag}_grpc{r}", server.address))
                # the median repeat is the headline (one statistic across suites); the best is kept next to it
                best = {mode: max(rows, key=lambda row: row["samples_per_s"]) for mode, rows in runs.items()}
                median = {mode: statistics.median(row["samples_per_s"] for row in rows) for mode, rows in runs.items()}
                g, local = best["grpc"], best["in-process"]
                entry = {"setting": name, "method": method, "budget": budget or "all", "dtype_up": up,
                         "dtype_down": down, "batch_size": batch, "steps": -(-args.train_subset // batch),
                         "in_process_samples_per_s": round(median["in-process"], 2),
                         "grpc_samples_per_s": round(median["grpc"], 2),
                         "speed_ratio": round(median["grpc"] / median["in-process"], 4),
                         "best_in_process_samples_per_s": round(local["samples_per_s"], 2),
                         "best_grpc_samples_per_s": round(g["samples_per_s"], 2),
                         "best_speed_ratio": round(g["samples_per_s"] / local["samples_per_s"], 4),
                         "same_accuracy": all(row["test_accuracy"] == local["test_accuracy"]
                                              for rows in runs.values() for row in rows),
                         "same_payload": local["bytes_up"] == g["bytes_up"] and local["bytes_down"] == g["bytes_down"],
                         "payload_bytes_up": g["payload_bytes_up"], "payload_bytes_down": g["payload_bytes_down"],
                         "wire_bytes_up": g["wire_bytes_up"], "wire_bytes_down": g["wire_bytes_down"],
                         "handshake_bytes": g["handshake_bytes"],
                         "wire_over_payload_up": g["wire_over_payload_up"],
                         "wire_over_payload_down": g["wire_over_payload_down"],
                         "wire_over_payload": g["wire_over_payload"],
                         "wire_over_payload_after_setup_up": g["wire_over_payload_after_setup_up"],
                         "wire_over_payload_after_setup_down": g["wire_over_payload_after_setup_down"],
                         "runs": runs}
                results["training"].append(entry)
                print(f"{name:9s} batch {batch:3d}: in-process {entry['in_process_samples_per_s']:8.1f} samples/s, "
                      f"gRPC {entry['grpc_samples_per_s']:8.1f} samples/s (x{entry['speed_ratio']:.3f}); "
                      f"wire/payload up {entry['wire_over_payload_up']:.4f} down {entry['wire_over_payload_down']:.4f}",
                      flush=True)
            # inference: the batch-16 model of this setting, one sample per request; the in-process run's folder
            # holds both halves, the same bit for bit as the half its gRPC twin left on the server
            tag = f"{name.replace(' ', '_').replace('=', '')}_b{batches[0]}_local0"
            results["inference"].append(_inference(name, budget, up, work / tag, server.address, args))
        for text in chosen:  # inference-only settings (the rate suite's choices): bytes do not depend on weights
            budget, dtype, resolution = _parse_infer_config(text)
            cfg = _config("ca", budget, dtype, "fp32", 16, args, resolution=resolution, train_subset=16)
            tag = f"infer_B{budget}_{dtype}_r{resolution}"
            _train(cfg, work / f"{tag}_grpc", server.address)  # hosts the half on the server
            _train(cfg, work / tag, None)                       # the same model with both halves, for infer
            results["inference"].append(_inference(f"B={budget} {dtype} r={resolution}", budget, dtype, work / tag,
                                                   server.address, args))
    finally:
        server.stop()
        scratch.cleanup()
    write_results(out, "transport", results)
    (out / "command.txt").write_text(command + "\n")
    (out / "results.md").write_text(_markdown(results))
    print(_markdown(results))
    return results if return_results else 0


def _inference(name: str, budget, dtype_up: str, checkpoint: Path, address: str, args) -> dict:
    """Single-sample split inference of a checkpoint, in-process and through the gRPC server."""
    from splitprune.client.config import ConnectConfig
    from splitprune.client.split_inference import run_inference

    local = _local_latency(checkpoint, budget or 512, args.infer_requests)
    measured = ConnectConfig(server=address, measure_socket=True)
    remote = run_inference(str(checkpoint), measured, str(budget) if budget else "all",
                           test_subset=args.infer_requests, batch_size=1, warmup=WARMUP)
    short = run_inference(str(checkpoint), measured, str(budget) if budget else "all",
                          test_subset=max(args.infer_requests // 4, 1), batch_size=1, warmup=WARMUP)
    entry = {"setting": name, "budget": budget or "all", "dtype_up": dtype_up, "requests": remote["requests"],
             "in_process_ms": {k: round(local[k], 3) for k in ("p50_ms", "p99_ms", "mean_ms")},
             "grpc_ms": {"p50_ms": round(remote["latency_ms"]["p50"], 3),
                         "p99_ms": round(remote["latency_ms"]["p99"], 3),
                         "mean_ms": round(remote["latency_ms"]["mean"], 3)},
             "grpc_rpc_ms": {k + "_ms": round(v, 3) for k, v in remote["rpc_latency_ms"].items()},
             "server_ms": {k + "_ms": round(v, 3) for k, v in remote["server_ms"].items()},
             "same_accuracy": local["accuracy"] == remote["test_accuracy"],
             "payload_bytes_up_per_request": remote["payload_bytes_up"] / remote["requests"],
             "wire_bytes_up_per_request": _wire(remote)["socket_bytes_up"] / _sent(remote),
             "wire_bytes_down_per_request": _wire(remote)["socket_bytes_down"] / _sent(remote),
             **_steady_wire(remote, short)}
    print(f"{name:9s} inference, 1 sample/request: in-process p50 {entry['in_process_ms']['p50_ms']:.2f} ms "
          f"p99 {entry['in_process_ms']['p99_ms']:.2f} ms; gRPC p50 {entry['grpc_ms']['p50_ms']:.2f} ms "
          f"p99 {entry['grpc_ms']['p99_ms']:.2f} ms", flush=True)
    return entry


def _parse_infer_config(text: str) -> tuple[int, str, int]:
    from splitprune.errors import UserError

    try:
        budget, dtype, resolution = text.split(":")
        return int(budget), dtype, int(resolution)
    except ValueError:
        raise UserError(f"--infer-config {text!r}: give BUDGET:DTYPE:RESOLUTION, e.g. 4:int4:2") from None


def _count(entry: dict, key: str) -> str:
    return f"{entry[key]:.0f}" if key in entry else "n/a"


def _markdown(r: dict) -> str:
    lines = ["# Transport benchmark: in-process vs loopback gRPC", "",
             f"`{r['transport_command']}`", "",
             f"{r['model']} on {r['dataset']}, {r['train_subset']} training images (1 epoch), torch threads "
             f"{r['threads']} per process, CPU. Throughput over the training loop (evaluation "
             "excluded): median of the repeats (best in parentheses). Wire bytes are measured on the client's TCP socket (HTTP/2 + gRPC "
             "framing, headers, window updates, pings included); payload = the serialized step and evaluation "
             "messages the device counts. 'After setup' leaves out the connection setup and the session "
             "handshake (a fixed ~1.4 kB per run).", "",
             "| setting | batch | in-process samples/s | gRPC samples/s | gRPC / in-process | wire/payload up | "
             "wire/payload down | wire/payload both | up, after setup | down, after setup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["training"]:
        lines.append(f"| {e['setting']} | {e['batch_size']} | {e['in_process_samples_per_s']} "
                     f"({e.get('best_in_process_samples_per_s', '-')}) | {e['grpc_samples_per_s']} "
                     f"({e.get('best_grpc_samples_per_s', '-')}) | {e['speed_ratio']:.3f} "
                     f"({e.get('best_speed_ratio', 0):.3f}) | {e['wire_over_payload_up']:.4f} | "
                     f"{e['wire_over_payload_down']:.4f} | {e['wire_over_payload']:.4f} | "
                     f"{e['wire_over_payload_after_setup_up']:.4f} | {e['wire_over_payload_after_setup_down']:.4f} |")
    lines += ["", "Split inference, one sample per request (device half + network + server half):", "",
              "| setting | requests | in-process p50 ms | in-process p99 ms | gRPC p50 ms | gRPC p99 ms | "
              "network round trip p50 ms | uplink payload B/request | uplink wire B/request (setup included) | "
              "uplink wire B/request after setup | downlink wire B/request after setup |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in r["inference"]:
        lines.append(f"| {e['setting']} | {e['requests']} | {e['in_process_ms']['p50_ms']} | "
                     f"{e['in_process_ms']['p99_ms']} | {e['grpc_ms']['p50_ms']} | {e['grpc_ms']['p99_ms']} | "
                     f"{e['grpc_rpc_ms']['p50_ms']} | {e['payload_bytes_up_per_request']:.0f} | "
                     f"{e['wire_bytes_up_per_request']:.0f} | {_count(e, 'wire_bytes_up_per_request_after_setup')} | "
                     f"{_count(e, 'wire_bytes_down_per_request_after_setup')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
