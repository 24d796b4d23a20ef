"""The gRPC servicer, protocol-unaware: authenticate, parse, dispatch, and map typed refusals to status codes.

Handlers get raw bytes (no gRPC (de)serializers), so malformed input gets a clear status. The token is
checked by an interceptor when a call starts, from its metadata alone: a refused call's body is never
read or parsed. Refusals are logged at a bounded rate.
"""
from __future__ import annotations

import hmac
import logging
from typing import Callable, Iterator

import grpc

from splitprune.errors import ProtocolError
from splitprune.proto import service_pb2 as spb
from splitprune.server import transfer
from splitprune.server.service import SplitService
from splitprune.server.inference.stream import InferSession
from splitprune.server.telemetry.metrics import Metrics
from splitprune.server.telemetry.ratelog import BoundedLog
from splitprune.server.validation import parse
from splitprune.wire.envelopes import AUTH_KEY, ERROR_KEY, SERVICE
from splitprune.wire.refusals import BadTensor, Refusal, ServerBusy, SessionReplaced, Unauthenticated

log = logging.getLogger("splitprune.serve")


def log_refusal(refusals: BoundedLog, what: str, peer: str, refusal: Refusal) -> None:
    refusals("%s from %s refused: %s %s: %s", what, peer, refusal.status, refusal.reason, refusal)


MAX_DETAILS = 1000  # characters of a refusal's message: it may quote what a peer sent


def _abort(context: grpc.ServicerContext, refusal: Refusal) -> None:
    context.set_trailing_metadata(((ERROR_KEY, refusal.reason),))
    context.abort(grpc.StatusCode[refusal.status], str(refusal)[:MAX_DETAILS])


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses a call without the bearer token before any of its body is read (`open_methods` excepted)."""

    def __init__(self, token: str, on_refusal: Callable[[str, str, Refusal], None],
                 open_methods: frozenset[str] = frozenset()) -> None:
        self.expected = f"Bearer {token}".encode()
        self.on_refusal = on_refusal
        self.open_methods = open_methods

    def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method in self.open_methods:
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get(AUTH_KEY)
        if given is not None and hmac.compare_digest(given.encode(), self.expected):
            return continuation(handler_call_details)
        refusal = Unauthenticated("this server requires a bearer token" if given is None else "wrong bearer token")
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def deny(_requests, context):  # a streaming handler never asks for the request's message
            self.on_refusal(method, context.peer(), refusal)
            _abort(context, refusal)

        return grpc.stream_unary_rpc_method_handler(deny)


class Servicer:
    """The six methods of splitprune.v1.SplitPrune over a SplitService; each request is timed and counted
    by `metrics` (one per server: a fresh one when not given)."""

    def __init__(self, service: SplitService, refusals: BoundedLog, metrics: Metrics | None = None) -> None:
        self.service = service
        self.refusals = refusals
        self.metrics = metrics if metrics is not None else Metrics(service)

    def handler(self) -> grpc.GenericRpcHandler:
        methods = {
            "Train": grpc.stream_stream_rpc_method_handler(self.Train),
            "FetchState": grpc.unary_stream_rpc_method_handler(self.FetchState),
            "PushState": grpc.stream_unary_rpc_method_handler(self.PushState),
            "Describe": grpc.unary_unary_rpc_method_handler(self.Describe),
            "Infer": grpc.unary_unary_rpc_method_handler(self.Infer),
            "InferStream": grpc.stream_stream_rpc_method_handler(self.InferStream),
        }
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _fail(self, context: grpc.ServicerContext, exc: BaseException, what: str) -> None:
        """Turn any exception into a status; the server itself goes on."""
        if isinstance(exc, Refusal):
            refusal = exc
        elif isinstance(exc, ProtocolError):  # the codec's rules: a bad tensor
            refusal = BadTensor(str(exc))
        else:
            log.exception("internal error in %s from %s", what, context.peer())
            self.service.count("errors")
            context.set_trailing_metadata(((ERROR_KEY, spb.ErrorReason.Name(spb.INTERNAL_ERROR)),))
            context.abort(grpc.StatusCode.INTERNAL, f"internal server error: {exc!r}")
            return
        self.service.count("errors")
        log_refusal(self.refusals, what, context.peer(), refusal)
        _abort(context, refusal)

    def Train(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        session = None
        try:
            first = next(requests, None)
            if first is None:
                return
            with self.metrics.call("hello", len(first)) as call:
                session, welcome = self.service.open(parse(spb.ClientMessage, first), context.peer(), context.cancel)
                call.reply(welcome)
            yield welcome
            for data in requests:
                session.touch()
                session.busy = True
                try:
                    with self.metrics.call("invalid", len(data)) as call:
                        msg = parse(spb.ClientMessage, data)
                        call.kind = msg.WhichOneof("body") or "invalid"
                        out = call.reply(self.service.handle(session, msg))
                finally:
                    session.busy = False
                yield out
                session.touch()
        except grpc.RpcError:
            pass  # the client went away (cancelled, disconnected): nothing to answer
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            if session is not None and session.replaced:
                exc = SessionReplaced("a newer stream of this client took over")
            self._fail(context, exc, "Train")
        finally:
            if session is not None:
                self.service.close(session)

    def FetchState(self, data: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        try:
            with self.metrics.call("fetch_state", len(data)) as call:
                for chunk in transfer.fetch_state(self.service, parse(spb.FetchStateRequest, data)):
                    yield call.reply(chunk.SerializeToString())
        except grpc.RpcError:
            pass
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc, "FetchState")

    def PushState(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        try:
            with self.metrics.call("push_state", 0) as call:
                chunks = (parse(spb.StateChunk, call.received(c)) for c in requests)
                return call.reply(transfer.push_state(self.service, chunks).SerializeToString())
        except grpc.RpcError:
            return b""
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc, "PushState")

    def Describe(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            with self.metrics.call("describe", len(data)) as call:
                return call.reply(transfer.describe(self.service, parse(spb.DescribeRequest, data)).SerializeToString())
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc, "Describe")

    def InferStream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        """One inference session: the InferOpen checked once, then one reply per item, in order."""
        if not self.service.infer_streams.acquire(blocking=False):
            self._fail(context, ServerBusy(f"this server holds {self.service.config.max_sessions} inference "
                                           "streams already (--max-sessions)"), "InferStream")
            return
        try:
            first = next(requests, None)
            if first is None:
                return
            with self.metrics.call("infer_open", len(first)) as call:
                session = InferSession(self.service, parse(spb.InferOpen, first))
                opened = call.reply(session.opened())
            yield opened
            for data in requests:
                with self.metrics.call("infer_item", len(data)) as call:
                    out = call.reply(session.answer(data))
                yield out
        except grpc.RpcError:
            pass
        except Exception as exc:  # noqa: BLE001 - a bad InferOpen (or a failure) ends the stream with a status
            self._fail(context, exc, "InferStream")
        finally:
            self.service.infer_streams.release()

    def Infer(self, data: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            with self.metrics.call("infer", len(data)) as call:
                return call.reply(transfer.infer(self.service, parse(spb.InferRequest, data)).SerializeToString())
        except Exception as exc:  # noqa: BLE001
            self._fail(context, exc, "Infer")
