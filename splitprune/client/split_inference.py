"""Split inference against a server, as a library: the device half runs here, the rest on a `splitprune serve`
server (`splitprune infer` and the benchmarks use it)."""
from __future__ import annotations

import time
from dataclasses import dataclass

from splitprune.adaptive.stream import percentile
from splitprune.client.config import ConnectConfig
from splitprune.errors import UserError


@dataclass
class InferenceSession:
    """A checked split-inference setup: the server's half is the checkpoint's, the device half loaded."""

    client: object          # InferenceClient
    info: object            # the server's DescribeReply
    device: object          # DeviceWorker
    cfg: object             # RunConfig
    meta: dict
    batches: list           # the test set, [(x, y)] per request


def open_session(checkpoint: str, server: ConnectConfig | str, dtype_up: str | None = None, batch_size: int = 1,
                 test_subset: int | None = None, data_dir: str | None = None, stream: bool = False,
                 tcp: bool = False) -> InferenceSession:
    """Everything before the first request; the caller closes `session.client`. `server`: a ConnectConfig, or
    just HOST:PORT; `stream`: requests on InferStream sessions instead of unary Infer calls; `tcp`: on sessions
    on the server's TCP session port."""
    server = ConnectConfig(server=server) if isinstance(server, str) else server
    from splitprune.client.inference import InferenceClient
    from splitprune.data import make_loaders
    from splitprune.training.checkpoint import read_meta, weights_digest
    from splitprune.training.setup import load_checkpoint

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if read_meta(checkpoint).get("server_half"):  # without the server weights, nothing says the server's is this run's
        raise UserError(f"{checkpoint} holds the device half of a remote run only: fetch the whole model with "
                        f"`splitprune pull --server {server.server} --checkpoint {checkpoint} --out DIR`, then infer "
                        "with --checkpoint DIR")
    loaded = load_checkpoint(checkpoint, ("device",), dtype_up=dtype_up, data_dir=data_dir, test_batch_size=batch_size)
    cfg, meta, tensors, device = loaded.cfg, loaded.meta, loaded.tensors, loaded.device
    _, test, _ = make_loaders(cfg.dataset, cfg.data_dir, cfg.batch_size, cfg.input_size,
                              meta["in_channels"], cfg.seed, 1, test_subset, False, batch_size,
                              normalisation=cfg.normalisation())
    client = InferenceClient(server, meta["fingerprint"], stream, tcp)  # connect last: all else is ready
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
        return InferenceSession(client, info, device, cfg, meta, list(test))
    except BaseException:
        client.close()
        raise


def run_inference(checkpoint: str, server: ConnectConfig | str, budget_text: str | None = None,
                  dtype_up: str | None = None, batch_size: int = 1, test_subset: int | None = None,
                  data_dir: str | None = None, warmup: int = 3, stream: bool = False, tcp: bool = False) -> dict:
    """Every test image through the server at one budget: accuracy, latency and bytes."""
    import torch

    from splitprune.training.checkpoint import parse_budget

    session = open_session(checkpoint, server, dtype_up, batch_size, test_subset, data_dir, stream, tcp)
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
            "stream": stream or tcp, "tcp_session": tcp,
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
