"""Python clients for the ranking service (sync and asyncio) and the CLI's --server path."""
from __future__ import annotations

from pathlib import Path

import grpc

from .core.errors import UserError
from .core.proto import request_to_proto, response_to_json
from .core.types import RerankRequest
from .v1 import ranker_pb2 as pb
from .v1 import ranker_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _credentials(root_cert: Path | None, client_cert: Path | None = None, client_key: Path | None = None):
    """TLS credentials when any TLS file is given (a client certificate for mutual TLS), else None."""
    if bool(client_cert) != bool(client_key):
        raise ValueError("a client certificate and its key go together")
    if not (root_cert or client_cert):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=root_cert.read_bytes() if root_cert else None,
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None)


def read_api_key(path: Path) -> str:
    """The first key in an API key file (same format as the server's --api-key-file)."""
    for line in path.read_text().splitlines():
        if line.strip() and not line.strip().startswith("#"):
            return line.strip()
    raise ValueError(f"{path}: holds no API key")


class RankerError(UserError):
    """A call the server refused or failed, as one line: ``[where: ]CODE: details``.

    The one wrapping of ``grpc.RpcError`` for the project's own tools (``pe-rank rerank --server``,
    ``pe-rank eval --server``); the clients themselves raise gRPC's errors, as gRPC users expect.
    """

    def __init__(self, error: grpc.RpcError, where: str = "") -> None:
        self.code, self.details = error.code(), error.details()
        super().__init__(f"{where + ': ' if where else ''}{self.code.name}: {self.details}")


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {api_key}"),) if api_key else None


class RankerClient:
    """Blocking client: ``RankerClient("127.0.0.1:50051").rerank(request)``.

    ``root_cert``: CA that signed the server's certificate (TLS); ``client_cert``/``client_key``:
    this client's certificate for mutual TLS; ``api_key``: sent as ``authorization: Bearer``.
    """

    def __init__(self, target: str, root_cert: Path | None = None, *, api_key: str | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None) -> None:
        creds = _credentials(root_cert, client_cert, client_key)
        self.channel = (grpc.secure_channel(target, creds, options=_OPTIONS) if creds
                        else grpc.insecure_channel(target, options=_OPTIONS))
        self.stub = pb_grpc.RankerStub(self.channel)
        self.metadata = _metadata(api_key)

    def rerank(self, request: RerankRequest | pb.RerankRequest, timeout: float | None = None) -> pb.RerankResponse:
        msg = request if isinstance(request, pb.RerankRequest) else request_to_proto(request)
        return self.stub.Rerank(msg, timeout=timeout, metadata=self.metadata)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RankerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRankerClient:
    """asyncio client: ``await AsyncRankerClient(target).rerank(request)``."""

    def __init__(self, target: str, root_cert: Path | None = None, *, api_key: str | None = None,
                 client_cert: Path | None = None, client_key: Path | None = None) -> None:
        creds = _credentials(root_cert, client_cert, client_key)
        self.channel = (grpc.aio.secure_channel(target, creds, options=_OPTIONS) if creds
                        else grpc.aio.insecure_channel(target, options=_OPTIONS))
        self.stub = pb_grpc.RankerStub(self.channel)
        self.metadata = _metadata(api_key)

    async def rerank(self, request: RerankRequest | pb.RerankRequest, timeout: float | None = None) -> pb.RerankResponse:
        msg = request if isinstance(request, pb.RerankRequest) else request_to_proto(request)
        return await self.stub.Rerank(msg, timeout=timeout, metadata=self.metadata)

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncRankerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def rerank_json(target: str, request: RerankRequest, timeout: float | None = None, **connection) -> dict:
    """For `pe-rank rerank --server`: gRPC errors become one-line user errors.

    ``connection``: RankerClient's keyword arguments (root_cert, api_key, client_cert, client_key).
    """
    with RankerClient(target, **connection) as client:
        try:
            return response_to_json(client.rerank(request, timeout=timeout))
        except grpc.RpcError as exc:
            raise RankerError(exc) from None
