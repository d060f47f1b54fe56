"""Undecodable requests are the client's fault: INVALID_ARGUMENT and one log line.

gRPC parses a request before any handler runs; a message protobuf cannot parse (invalid UTF-8
in a string field, bytes that are not a message) made grpcio answer UNKNOWN with the Python
exception's class name and log a traceback at ERROR. This interceptor wraps every method's
deserializer so a parse failure becomes a marker, and the method answers INVALID_ARGUMENT.
"""
from __future__ import annotations

from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from google.protobuf.message import DecodeError

from .errors import InvalidArgument, grpc_abort


class Undecodable:
    """What a request that could not be parsed is replaced with."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Refuse = Callable[[InvalidArgument, str], str]  # (error, method) -> request id; counts and logs it


def _safe(deserialize: Callable[[bytes], Any], message_type: str) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError):
            return Undecodable(f"not a valid {message_type} message (invalid UTF-8 in a string field, "
                               "or not protobuf at all)")
    return parse


class DecodeGuard(grpc.aio.ServerInterceptor):
    """Answers INVALID_ARGUMENT to a request gRPC could not parse; ``refuse`` counts and logs it."""

    def __init__(self, refuse: Refuse, services: tuple[str, ...]) -> None:
        self.refuse = refuse
        self.services = tuple(f"/{name}/" for name in services)  # ours; health and reflection stay grpcio's

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.request_deserializer is None or not method.startswith(self.services) \
                or handler.response_streaming:  # our services answer with one message each
            return handler
        message_type = getattr(handler.request_deserializer, "__self__", None)
        name = getattr(getattr(message_type, "DESCRIPTOR", None), "full_name", "request")
        kwargs = dict(request_deserializer=_safe(handler.request_deserializer, name),
                      response_serializer=handler.response_serializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(self._unary(handler.unary_unary, method), **kwargs)
        return grpc.stream_unary_rpc_method_handler(self._streamed(handler.stream_unary, method), **kwargs)

    async def _abort(self, context: grpc.aio.ServicerContext, bad: Undecodable, method: str) -> None:
        error = InvalidArgument(bad.reason)
        await grpc_abort(context, error, self.refuse(error, method))

    def _unary(self, behaviour, method: str):
        async def call(request, context):
            if isinstance(request, Undecodable):
                await self._abort(context, request, method)
            return await behaviour(request, context)
        return call

    def _checked(self, requests: AsyncIterator, context, method: str) -> AsyncIterator:
        async def each():
            async for request in requests:
                if isinstance(request, Undecodable):
                    await self._abort(context, request, method)
                yield request
        return each()

    def _streamed(self, behaviour, method: str):
        async def call(requests, context):
            return await behaviour(self._checked(requests, context, method), context)
        return call
