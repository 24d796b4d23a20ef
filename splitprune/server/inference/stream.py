"""An inference session's answers, whatever carries it: an `InferStream` (docs/protocol.md 5.1) or the TCP
session port (5.2, port.py).

What stays the same for a session (the half, the budget, the dtype, the kept channels, the entropy tables'
digest) is said once, in the InferOpen, and checked once; each later message is an InferItem holding the
tensor's data alone (splitprune.wire.stream.item_data), rebuilt here into the EncodedTensor a unary Infer
would carry and validated by the same code (sizes before decoding, the tables, the budget). One bad item is
answered with its error and the session goes on; a bad InferOpen ends the session.
"""
from __future__ import annotations

from splitprune.compression.codec import accepted_tables
from splitprune.errors import ProtocolError
from splitprune.proto import pb
from splitprune.proto import service_pb2 as spb
from splitprune.server.transfer import infer
from splitprune.server.validation import check_infer_budget
from splitprune.wire.codec import LEVELS, decode_channels
from splitprune.wire.refusals import BadTensor, BudgetExceeded, Refusal, TooLarge
from splitprune.wire.timing import microseconds

MESSAGE_LIMIT = 200  # characters of an item's error message


def parse_item(data: bytes) -> spb.InferItem:
    try:
        return spb.InferItem.FromString(data)
    except Exception:  # noqa: BLE001 - protobuf's DecodeError
        raise BadTensor("not an InferItem") from None


class InferSession:
    """One open InferStream: its checked parameters, and the answer to each item."""

    def __init__(self, service, opened: spb.InferOpen) -> None:
        self.service = service
        self.half = service.half(opened.fingerprint)
        check_infer_budget(opened.budget, self.half.channels)
        self.c, self.h, self.w = self.half.geometry.wire_shape
        if opened.dtype not in self.half.worker.spec.dtypes:
            raise BadTensor(f"dtype {opened.dtype} is not one this server decodes")
        self.template = pb.EncodedTensor(dtype=opened.dtype, channels=opened.channels, prefix=opened.prefix,
                                         tables=opened.tables)
        try:
            kept, _ = decode_channels(self.template, self.c)
        except ProtocolError as exc:
            raise BadTensor(str(exc)) from None
        self.k = kept.size
        if self.k > opened.budget:
            raise BudgetExceeded(f"{self.k} channels kept but the session's budget is {opened.budget}")
        if opened.dtype == pb.EC and opened.tables not in accepted_tables(self.half.worker.spec):
            raise BadTensor("the session's entropy tables are not this model's")
        self.fingerprint, self.budget = opened.fingerprint, opened.budget
        self.side = 8 * self.k if opened.dtype in LEVELS else 0  # INT8/INT4: K scales, K offsets first

    def opened(self) -> bytes:
        return spb.InferOpened(wire_shape=[self.c, self.h, self.w],
                               max_batch=self.half.worker.spec.max_batch).SerializeToString()

    def answer(self, data: bytes) -> bytes:
        """The InferItemReply to one item: its labels, or its error (the session goes on)."""
        try:
            return self._answer(parse_item(data)).SerializeToString()
        except ProtocolError as exc:  # a Refusal, or the codec's own rule
            self.service.count("errors")
            return failed_item(exc if isinstance(exc, Refusal) else BadTensor(str(exc)))

    def _answer(self, item: spb.InferItem) -> spb.InferItemReply:
        n = item.samples or 1
        if n > self.half.worker.spec.max_batch:
            raise TooLarge(f"{n} samples in one item, the limit is {self.half.worker.spec.max_batch}")
        tensor = pb.EncodedTensor()
        tensor.CopyFrom(self.template)
        tensor.shape.extend([n, self.c, self.h, self.w])
        if self.side:
            if len(item.data) < self.side:
                raise BadTensor(f"an item of this session starts with {self.side} bytes of scales and offsets")
            tensor.scales, tensor.offsets = item.data[:self.side // 2], item.data[self.side // 2:self.side]
        tensor.data = item.data[self.side:]
        reply = infer(self.service, spb.InferRequest(fingerprint=self.fingerprint, budget=self.budget,
                                                     eval=pb.EvalRequest(request_id=1, activations=tensor)))
        return spb.InferItemReply(labels=reply.eval.predictions.data, server_us=microseconds(reply.server_ms / 1e3))


def failed_item(refusal: Refusal) -> bytes:
    """The InferItemReply that refuses one item (the session goes on, unless its transport cannot)."""
    return spb.InferItemReply(error=spb.ErrorReason.Value(refusal.reason),
                              message=str(refusal)[:MESSAGE_LIMIT]).SerializeToString()
