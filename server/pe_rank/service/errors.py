"""The service's typed errors and their one mapping to gRPC and HTTP statuses.

Every API (pe_rank.v1 and tei.v1 over gRPC, TEI, Cohere/Jina, vLLM, Infinity and NIM over HTTP) raises these and
answers them through :func:`grpc_status` or :func:`http_status`, so one fault gets one status
and one message everywhere. Messages are short, stable and end with the request id; what
went wrong inside (Triton URLs, exception types) goes to the log only.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import NoReturn

import grpc


class ServiceError(Exception):
    """A request the service did not answer; ``message`` is what the client sees."""

    kind = "internal"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message, self.field = message, field

    def text(self, request_id: str) -> str:
        """``field: message (request ID)``: the field first, so clients can match on it."""
        head = f"{self.field}: {self.message}" if self.field else self.message
        return f"{head} (request {request_id})"


class InvalidArgument(ServiceError):
    kind = "validation"


class TooLarge(ServiceError):
    """Over a size limit (passages, query length, tokens with truncate=false, body size)."""

    kind = "too_large"


class Overloaded(ServiceError):
    """No capacity now; ``retry_after_s`` is when a slot is expected to be free."""

    kind = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(ServiceError):
    """No model server is ready; ``retry_after_s`` is when to try again (HTTP ``Retry-After``, as on 429)."""

    kind = "unhealthy"

    def __init__(self, message: str, field: str | None = None, retry_after_s: float = 1.0) -> None:
        super().__init__(message, field)
        self.retry_after_s = retry_after_s


class Unauthenticated(ServiceError):
    """No API key, or a wrong one (``reason``: missing or invalid); HTTP adds ``WWW-Authenticate``."""

    kind = "unauthenticated"

    def __init__(self, message: str, reason: str = "missing") -> None:
        super().__init__(message)
        self.reason = reason


class DeadlineExceeded(ServiceError):
    kind = "deadline"


class ShuttingDown(Unavailable):
    """The server is draining after SIGTERM: refused by the service itself (UNAVAILABLE, HTTP 503), so a
    client's retry goes to another replica instead of meeting a transport-level cancel."""

    kind = "shutting_down"


GRACE_OVER = "the shutdown grace (--grace) ran out before the ranking finished"  # a request cut at the end of a drain


class ModelServerGone(Unavailable):
    """A Triton went away mid-request (UNAVAILABLE or CANCELLED from it): mark it down, retry later."""


class Internal(ServiceError):
    kind = "internal"


class Bug(Internal):
    """A fault in this server's own code: logged whole, reported as INTERNAL, never as the client's fault."""


class Cancelled(ServiceError):
    """The client went away; never sent, only counted."""

    kind = "cancelled"


_GRPC = {
    ServiceError: grpc.StatusCode.INTERNAL,
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.INVALID_ARGUMENT,  # as TEI's gRPC router answers validation errors
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Internal: grpc.StatusCode.INTERNAL,
    Cancelled: grpc.StatusCode.CANCELLED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}

_HTTP = {
    ServiceError: 500,
    InvalidArgument: 422,
    TooLarge: 413,
    Overloaded: 429,
    Unavailable: 503,
    DeadlineExceeded: 504,
    Internal: 500,
    Cancelled: 499,
    Unauthenticated: 401,
}


def from_exception(exc: Exception) -> tuple[ServiceError, str]:
    """Any failure of a request as what its client is told, and a detail for the log only.

    The one conversion into :class:`ServiceError` (as TEI's router has one from its error type):
    validation errors keep their field; Triton's faults become short, stable messages.
    """
    from ..core.errors import InvalidRequest, RequestTooLarge
    from .pool import NoTritonAvailable, triton_status

    if isinstance(exc, ServiceError):
        return exc, ""
    if isinstance(exc, RequestTooLarge):
        return TooLarge(exc.reason, field=exc.field), ""
    if isinstance(exc, InvalidRequest):
        return InvalidArgument(exc.reason, field=exc.field), ""
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return DeadlineExceeded("deadline exceeded while ranking"), ""
    if isinstance(exc, NoTritonAvailable):
        return Unavailable("no model server is ready; retry later"), str(exc)
    code = triton_status(exc)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return ModelServerGone("the model server went away; retry later"), f"Triton: {str(exc)[:300]}"
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded("deadline exceeded while ranking"), ""
    if code is not None:
        return Internal("the model server failed"), f"Triton: {str(exc)[:300]}"
    return Bug("internal error"), f"{type(exc).__name__}: {exc}"


def _lookup(table: dict, error: ServiceError):
    """The entry of the error's nearest class in ``table`` (every ServiceError has one)."""
    return next(table[cls] for cls in type(error).__mro__ if cls in table)


def grpc_status(error: ServiceError) -> grpc.StatusCode:
    return _lookup(_GRPC, error)


def http_status(error: ServiceError, request_id: str) -> tuple[int, dict, dict[str, str]]:
    """Status, JSON body (TEI's ``error``/``error_type``, Cohere's and NIM's ``message``, NIM's ``object``,
    the field) and headers: ``Retry-After`` in whole seconds on 429 and 503, ``WWW-Authenticate`` on 401
    (RFC 6750)."""
    text = error.text(request_id)
    body = {"error": text, "error_type": error.kind, "message": text, "object": "error", "request_id": request_id}
    if error.field:
        body["field"] = error.field
    headers = {}
    if isinstance(error, (Overloaded, Unavailable)):
        headers["Retry-After"] = str(max(math.ceil(error.retry_after_s), 1))
    if isinstance(error, Unauthenticated):
        headers["WWW-Authenticate"] = ('Bearer realm="pe-rank"' if error.reason == "missing"
                                       else 'Bearer realm="pe-rank", error="invalid_token"')
    return _lookup(_HTTP, error), body, headers


def retry_metadata(error: ServiceError) -> tuple[tuple[str, str], ...]:
    """gRPC trailers of a refusal: ``grpc-retry-pushback-ms`` is what gRPC's own retry policy obeys."""
    if not isinstance(error, (Overloaded, Unavailable)):
        return ()
    ms = str(max(int(error.retry_after_s * 1e3), 1))
    return (("grpc-retry-pushback-ms", ms), ("retry-after-ms", ms))


def metric_label(error: ServiceError | None) -> str:
    """The ``status`` label of pe_rank_requests_total: gRPC code names, whatever the API."""
    return "OK" if error is None else grpc_status(error).name


async def grpc_abort(context: grpc.aio.ServicerContext, error: ServiceError, request_id: str) -> NoReturn:
    await context.abort(grpc_status(error), error.text(request_id), trailing_metadata=retry_metadata(error))
    raise AssertionError("unreachable")  # context.abort raises


def grpc_deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on time.monotonic()'s clock, None if the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining
