"""Python clients for the ranking service (sync and asyncio) and the CLI's --server path."""
from __future__ import annotations

from pathlib import Path

import grpc

from .core.types import RerankRequest
from .service.convert import request_to_proto, response_to_json
from .v1 import ranker_pb2 as pb
from .v1 import ranker_pb2_grpc as pb_grpc

_OPTIONS = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]


def _credentials(root_cert: Path | None):
    return grpc.ssl_channel_credentials(root_cert.read_bytes()) if root_cert else None


class RankerClient:
    """Blocking client: ``RankerClient("127.0.0.1:50051").rerank(request)``."""

    def __init__(self, target: str, root_cert: Path | None = None) -> None:
        creds = _credentials(root_cert)
        self.channel = (grpc.secure_channel(target, creds, options=_OPTIONS) if creds
                        else grpc.insecure_channel(target, options=_OPTIONS))
        self.stub = pb_grpc.RankerStub(self.channel)

    def rerank(self, request: RerankRequest | pb.RerankRequest, timeout: float | None = None) -> pb.RerankResponse:
        msg = request if isinstance(request, pb.RerankRequest) else request_to_proto(request)
        return self.stub.Rerank(msg, timeout=timeout)

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "RankerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRankerClient:
    """asyncio client: ``await AsyncRankerClient(target).rerank(request)``."""

    def __init__(self, target: str, root_cert: Path | None = None) -> None:
        creds = _credentials(root_cert)
        self.channel = (grpc.aio.secure_channel(target, creds, options=_OPTIONS) if creds
                        else grpc.aio.insecure_channel(target, options=_OPTIONS))
        self.stub = pb_grpc.RankerStub(self.channel)

    async def rerank(self, request: RerankRequest | pb.RerankRequest, timeout: float | None = None) -> pb.RerankResponse:
        msg = request if isinstance(request, pb.RerankRequest) else request_to_proto(request)
        return await self.stub.Rerank(msg, timeout=timeout)

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.ModelInfoRequest(), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> "AsyncRankerClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


def rerank_json(target: str, request: RerankRequest, timeout: float | None = None) -> dict:
    """For `pe-rank rerank --server`: gRPC errors become one-line user errors."""
    from .cli import UserError

    with RankerClient(target) as client:
        try:
            return response_to_json(client.rerank(request, timeout=timeout))
        except grpc.RpcError as exc:
            raise UserError(f"{exc.code().name}: {exc.details()}") from None
