"""The PyTorch side of `--budget auto`: `splitprune infer` streaming through splitprune.adaptive.stream, and
the per-step budget of `splitprune train`.

What is PyTorch-specific lives here: the sizes of each option's messages (encoded through the device
worker's own selector and codec, so a change of wire format changes them too) and `send`, one request
through the real server. The loop and the controller are torch-free and shared with the device package.
"""
from __future__ import annotations

import time

from splitprune.adaptive import Option
from splitprune.adaptive.budgets import model_options
from splitprune.adaptive.hedge import Pending, Start
from splitprune.adaptive.policy import AutoBudget, AutoStepBudget
from splitprune.adaptive.stream import Outcome, StreamResult, run_stream, submitted
from splitprune.errors import UserError


class SizingLink:
    """Answers an EvalRequest as a server would, without sending it: the sizes its messages would have (an item
    on a session with `stream`, else an Infer call)."""

    def __init__(self, fingerprint: str, budget: int, stream: bool) -> None:
        self.fingerprint, self.budget, self.stream = fingerprint, budget, stream
        self.sizes = (0, 0)

    def evaluate(self, request: bytes) -> bytes:
        import torch

        from splitprune.compression import encode_labels
        from splitprune.proto import pb
        from splitprune.wire.stream import exchange_sizes

        req = pb.EvalRequest.FromString(request)
        self.sizes = exchange_sizes(self.fingerprint, self.budget, req, self.stream)
        count = int(req.activations.shape[0])
        reply = pb.EvalReply(request_id=req.request_id, predictions=encode_labels(torch.zeros(count, dtype=torch.long)))
        return reply.SerializeToString()


def inference_options(session, dtypes: list[str], ranked: bool = True) -> list[Option]:
    """The option ladder of a model (model_options), each option sized by encoding a real sample as the session's
    client sends it (an item on a stream, or an Infer call);
    `ranked=False`: every option that costs more bytes than the one before, whatever its accuracy."""
    from splitprune.compression import ChannelCodec

    device, x = session.device, session.batches[0][0][:1]
    codec = device.codec

    def bytes_for(budget: int, dtype: str) -> tuple[int, int]:
        link = SizingLink(session.meta["fingerprint"], budget, session.client.stream)
        device.codec = ChannelCodec(dtype)
        device.predict(x, link, budget)
        return link.sizes

    try:
        return model_options(session.meta, dtypes, bytes_for, ranked)
    finally:
        device.codec = codec


def make_send(session):
    """One real request per call: sample `index` (cycling through the test set) with the option's budget and dtype."""
    from splitprune.compression import ChannelCodec

    client, device, batches = session.client, session.device, session.batches
    counted = client.traffic.messages["evaluation"]   # the Infer messages as encoded and sent
    links, codecs = {}, {}

    def send(index: int, option: Option) -> Outcome:
        x, y = batches[index % len(batches)]
        link = links.setdefault(option.budget, client.link(option.budget))
        device.codec = codecs.setdefault(option.dtype, ChannelCodec(option.dtype))
        up, down = counted["bytes_up"], counted["bytes_down"]
        start = time.perf_counter()
        predictions, _, _ = device.predict(x, link, option.budget)
        seconds = time.perf_counter() - start
        return Outcome(len(y), int((predictions == y).sum()), counted["bytes_up"] - up, counted["bytes_down"] - down,
                       seconds, client.latencies_ms[-1] / 1e3, client.server_ms[-1] / 1e3)

    return send


def make_start(session) -> Start:
    """`--hedge`: sample `index` at an option, the call on its way (adaptive.hedge). The device half runs once
    per sample: the hedge and the main request of one sample encode the same output."""
    from splitprune.compression import ChannelCodec

    client, device, batches = session.client, session.device, session.batches
    codecs, last = {}, {}

    def start(index: int, option: Option) -> Pending:
        x, y = batches[index % len(batches)]
        started = time.perf_counter()
        if last.get("index") != index:
            last.update(index=index, z=device.infer_half(x))
        device.codec = codecs.setdefault(option.dtype, ChannelCodec(option.dtype))
        request_id, request = device.eval_request(last["z"], option.budget)
        compute = time.perf_counter() - started
        call, cancel, sent = client.submit(request, option.budget)
        return submitted(call, cancel, sent, started, compute, len(y),
                         lambda reply: int((device.eval_predictions(reply, request_id, len(y)) == y).sum()))

    return start


def run_auto(session, latency_ms: float, dtypes: list[str], warmup: int = 3, requests: int | None = None,
             duration: float | None = None, show=None, every: int = 1, hedge: bool = False,
             **settings) -> StreamResult:
    """Stream single-sample requests with the budget the controller picks; `session` from infer.open_session;
    `hedge`: each request above the smallest option with a hedge (adaptive.hedge)."""
    if len(session.batches[0][1]) != 1:
        raise UserError("--budget auto streams single-sample requests: leave --batch-size at 1")
    auto = AutoBudget(inference_options(session, dtypes), latency_ms / 1e3, **settings)
    return run_stream(make_send(session), auto, requests if requests is not None or duration else len(session.batches),
                      duration, show=show, every=every, warmup=max(warmup, 0),
                      hedge=make_start(session) if hedge else None)


def training_bytes(parts, budget: int) -> tuple[int, int]:
    """(TrainRequest, TrainReply) sizes of one full batch at `budget` channels, as the device worker encodes them."""
    import torch

    from splitprune.compression import ChannelCodec, encode_labels
    from splitprune.proto import pb

    device, cfg = parts.device, parts.cfg
    _, height, width = parts.geometry.wire_shape
    values = torch.randn(cfg.batch_size, min(budget, device.channels), height, width,
                         generator=torch.Generator().manual_seed(0))  # its own generator: training's RNG untouched
    channels = device.kept_channels(budget)
    labels = encode_labels(torch.zeros(cfg.batch_size, dtype=torch.long))
    prefix = device.selector.prefix   # an any-budget model's channels travel as a prefix length, both ways
    up = pb.TrainRequest(step_id=1, activations=device.codec.compress(values, channels, device.channels, prefix),
                         labels=labels, lr_scale=0.5)
    down = pb.TrainReply(step_id=1, loss=1.0, correct=1, server_us=50_000,   # fixed width: any step's time
                         gradient=ChannelCodec(cfg.dtype_down).compress(values, channels, device.channels, prefix))
    return up.ByteSize(), down.ByteSize()


def step_budget(parts, step_ms: float, **settings) -> AutoStepBudget:
    """`train --budget auto --step-ms T`: any budget up to each phase's (top-B by gate; the server takes fewer)."""
    if not step_ms > 0:
        raise UserError(f"--step-ms must be positive, got {step_ms}")
    budgets = list(range(1, parts.device.channels + 1))
    return AutoStepBudget(budgets, lambda b: training_bytes(parts, b), step_ms / 1e3, parts.cfg.dtype_up, **settings)
