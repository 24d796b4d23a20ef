"""Split inference on the device: check the server's half, then per request preprocess, run the ONNX device
half, encode, send, and time every stage."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from splitprune.adaptive import Option
from splitprune.adaptive.hedge import Pending, Start
from splitprune.adaptive.stream import Outcome, submitted
from splitprune.errors import UserError
from splitprune.proto import pb
from splitprune.wire.codec import decode_label_array
from splitprune_device.budget import BudgetPolicy
from splitprune_device.client import InferenceClient
from splitprune_device.model import DeviceModel

STAGES = ("preprocess", "device", "encode", "round_trip", "server", "total")


def check_server(model: DeviceModel, client: InferenceClient):
    """Refuse a server whose half is not the one this device half was exported with."""
    m = model.manifest
    info = client.describe(model.fingerprint)
    if info.protocol_version != m["protocol_version"]:
        raise UserError(f"the server speaks protocol version {info.protocol_version}, this export "
                        f"{m['protocol_version']}")
    mine = (list(m["wire_shape"]), m["num_classes"], m["input"]["in_channels"])
    theirs = (list(info.wire_shape), info.num_classes, info.in_channels)
    if mine != theirs:
        raise UserError(f"the server's model {info.fingerprint} has wire shape, classes, input channels {theirs}; "
                        f"this export {mine}")
    if info.weights_sha256 != m["server_weights_sha256"]:
        raise UserError(f"the server's half of model {info.fingerprint} (sha256 {info.weights_sha256[:16]}...) is "
                        f"not the one this device half was exported with ({m['server_weights_sha256'][:16]}...): "
                        "it was trained further, or comes from another run; serve the exported checkpoint with "
                        "`splitprune serve --model RUN`")
    return info


@dataclass
class Results:
    predictions: list[int] = field(default_factory=list)
    budgets: list[int] = field(default_factory=list)
    ms: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    payload_bytes_up: int = 0      # EvalRequest messages, as `splitprune infer` counts them
    message_bytes_up: int = 0      # InferRequest messages (payload + fingerprint and budget)
    message_bytes_down: int = 0
    requests: int = 0


def infer_one(model: DeviceModel, client: InferenceClient, images: np.ndarray, budget: int, request_id: int,
              num_classes: int, dtype: str | None = None) -> tuple[np.ndarray, dict[str, float], tuple[int, int, int]]:
    """One request: predictions, stage times (ms) and (payload up, message up, message down) bytes."""
    t0 = time.perf_counter()
    x = model.prepare(images)
    t1 = time.perf_counter()
    kept = model.run(x, budget)
    t2 = time.perf_counter()
    tensor = model.encode(kept, budget, dtype)
    if client.stream:  # the session said the header once: the item is the payload
        t3 = time.perf_counter()
        item = client.infer_stream(model.fingerprint, budget, tensor)
        labels = pb.Labels(width=1 if num_classes <= 256 else 2, data=item.reply.labels)
        predictions = decode_label_array(labels, len(images), num_classes)
        server_ms, round_trip, sizes = item.server_s * 1e3, item.round_trip_ms, (
            item.bytes_up, item.bytes_up, item.bytes_down)
    else:
        req = pb.EvalRequest(request_id=request_id, activations=tensor)
        data = client.infer_request(model.fingerprint, budget, req)
        t3 = time.perf_counter()
        res = client.infer(data)
        if res.reply.eval.request_id != request_id:
            raise UserError(f"reply to request {res.reply.eval.request_id} received for {request_id}")
        predictions = decode_label_array(res.reply.eval.predictions, len(images), num_classes)
        server_ms, round_trip, sizes = res.server_s * 1e3, res.round_trip_ms, (
            req.ByteSize(), res.bytes_up, res.bytes_down)
    t4 = time.perf_counter()
    ms = {"preprocess": (t1 - t0) * 1e3, "device": (t2 - t1) * 1e3, "encode": (t3 - t2) * 1e3,
          "round_trip": round_trip, "server": server_ms, "total": (t4 - t0) * 1e3}
    return predictions, ms, sizes


def run_inference(model: DeviceModel, client: InferenceClient, images: np.ndarray, policy: BudgetPolicy,
                  batch_size: int = 1, warmup: int = 1) -> Results:
    """Predictions for uint8 images [N,H,W,C]; the first `warmup` requests are repeated and left out of the
    timings (they load the session and open the connection)."""
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    num_classes = model.manifest["num_classes"]
    for i in range(max(warmup, 0)):
        infer_one(model, client, images[:batch_size], policy.budget(), i + 1, num_classes)
    out = Results()
    for start in range(0, len(images), batch_size):
        budget = policy.budget()
        out.requests += 1
        predictions, ms, (payload, up, down) = infer_one(model, client, images[start:start + batch_size], budget,
                                                         warmup + out.requests, num_classes)
        policy.observe(ms["total"], up)
        out.predictions.extend(int(p) for p in predictions)
        out.budgets.append(budget)
        for stage, value in ms.items():
            out.ms[stage].append(value)
        out.payload_bytes_up += payload
        out.message_bytes_up += up
        out.message_bytes_down += down
    return out


def make_send(model: DeviceModel, client: InferenceClient, images: np.ndarray, labels: np.ndarray | None):
    """`send` of splitprune.adaptive.stream: image `index` (cycling) as one request with the option's budget and
    dtype; the latency is the whole request on this device (preprocess, ONNX, encode, call, decode)."""
    num_classes = model.manifest["num_classes"]

    def send(index: int, option: Option) -> Outcome:
        i = index % len(images)
        predictions, ms, (_, up, down) = infer_one(model, client, images[i:i + 1], option.budget, index + 1,
                                                   num_classes, option.dtype)
        correct = None if labels is None else int(predictions[0] == labels[i])
        return Outcome(1, correct, up, down, ms["total"] / 1e3, ms["round_trip"] / 1e3, ms["server"] / 1e3)

    return send


def make_start(model: DeviceModel, client: InferenceClient, images: np.ndarray, labels: np.ndarray | None) -> Start:
    """`--hedge`: image `index` at an option, the call on its way (splitprune.adaptive.hedge). The ONNX device
    half is one graph per budget: the hedge runs its own, before the main request's."""
    num_classes = model.manifest["num_classes"]

    def start(index: int, option: Option) -> Pending:
        i = index % len(images)
        started = time.perf_counter()
        tensor = model.encode(model.run(model.prepare(images[i:i + 1]), option.budget), option.budget, option.dtype)
        compute = time.perf_counter() - started
        call, cancel, sent = client.submit(model.fingerprint, option.budget, tensor, index + 1,
                                           1 if num_classes <= 256 else 2)

        def score(predicted) -> int | None:
            predictions = decode_label_array(predicted, 1, num_classes)
            return None if labels is None else int(predictions[0] == labels[i])

        return submitted(call, cancel, sent, started, compute, 1, score)

    return start
