"""Who may call the service: optional API keys (bearer tokens) and mutual TLS.

API keys: ``--api-key-file`` holds one key per line; a call carries ``authorization: Bearer
<key>`` metadata. Keys are compared in constant time (hmac.compare_digest, against every key,
so the time taken does not tell which key nearly matched). Health and reflection stay open
so probes and tools such as grpcurl work without a key. ``ApiKeys.check_bearer`` is a plain
function of the header value, for any transport (an HTTP middleware can call it too).

Mutual TLS: ``client_ca`` makes the server require a client certificate signed by that CA.
That check happens in the TLS handshake, before any call exists: a client without a valid
certificate cannot connect (it sees UNAVAILABLE with a handshake error), and gRPC Python gives
the server no hook to count those.
"""
from __future__ import annotations

import hmac
from pathlib import Path
from typing import Awaitable, Callable

import grpc

# methods anyone may call: probes and service discovery
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")
AUTH_HEADER = "authorization"


class AuthConfigError(ValueError):
    """An API key file that cannot be used (missing, empty, a key with spaces)."""


class ApiKeys:
    """The accepted keys; ``check_bearer("Bearer KEY")`` says whether a call may proceed."""

    def __init__(self, keys: list[str]) -> None:
        if not keys:
            raise AuthConfigError("no API keys given")
        for key in keys:
            if not key or any(c.isspace() for c in key):
                raise AuthConfigError("an API key must be one non-empty word")
        self._keys = [k.encode() for k in keys]

    @classmethod
    def from_file(cls, path: Path) -> "ApiKeys":
        """One key per line; blank lines and lines starting with ``#`` are skipped."""
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise AuthConfigError(f"{path}: {exc.strerror or exc}") from None
        keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
        if not keys:
            raise AuthConfigError(f"{path}: holds no API key (one key per line)")
        try:
            return cls(keys)
        except AuthConfigError as exc:
            raise AuthConfigError(f"{path}: {exc}") from None

    def __len__(self) -> int:
        return len(self._keys)

    def check_bearer(self, header_value: str | None) -> bool:
        """True for ``Bearer <a known key>`` (scheme case-insensitive), False for anything else."""
        token = bearer_token(header_value)
        if token is None:
            return False
        candidate = token.encode()
        matched = False
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            matched |= hmac.compare_digest(candidate, key)
        return matched


def bearer_token(header_value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def is_open(method: str) -> bool:
    return method.startswith(OPEN_SERVICES)


def _refusing_handler(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    async def refuse(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(request_or_iterator, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raises

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, **kwargs)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **kwargs)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls to non-open methods without a valid bearer key; ``on_refused(reason)`` counts them."""

    def __init__(self, keys: ApiKeys, on_refused: Callable[[str], None] = lambda reason: None) -> None:
        self.keys = keys
        self.on_refused = on_refused

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or is_open(handler_call_details.method):
            return handler
        values = [v for k, v in (handler_call_details.invocation_metadata or ()) if k == AUTH_HEADER]
        if len(values) == 1 and isinstance(values[0], str) and self.keys.check_bearer(values[0]):
            return handler
        reason = "missing" if not values else "invalid"
        self.on_refused(reason)
        message = ("missing API key: send metadata 'authorization: Bearer <key>'" if reason == "missing"
                   else "invalid API key")
        return _refusing_handler(handler, message)


class AuthOptions:
    """What ``pe-rank serve`` was asked to enforce: API keys and/or a client CA (mutual TLS)."""

    def __init__(self, api_keys: ApiKeys | None = None, client_ca: Path | None = None,
                 api_key_file: Path | None = None) -> None:
        self.api_keys = api_keys
        self.client_ca = client_ca
        self.api_key_file = api_key_file  # where the keys came from, for the start-up banner's example

    @property
    def enabled(self) -> bool:
        """Whether callers are authenticated at all (keys, client certificates or both)."""
        return self.api_keys is not None or self.client_ca is not None

    def interceptors(self, on_refused: Callable[[str], None]) -> list[grpc.aio.ServerInterceptor]:
        return [ApiKeyInterceptor(self.api_keys, on_refused)] if self.api_keys else []
