"""Hugging Face TEI's gRPC API (tei.v1 Info and Rerank), a thin adapter over RankingService.

TEI ranks each (query, text) pair; PE-Rank ranks the texts listwise, so a Rank's score is
1 / rank and ``raw_scores`` cannot give logits. The texts' order is TEI's: best first.
"""
from __future__ import annotations

import re
from typing import AsyncIterator

import grpc

from ..core.types import ENCODER_MAX_TOKENS
from ..core.types import Passage, RerankRequest, RerankResult
from ..tei.v1 import tei_pb2 as tei
from ..tei.v1 import tei_pb2_grpc as tei_grpc
from .app import RankingService
from .errors import InvalidArgument, ServiceError, grpc_abort, grpc_deadline

API = "tei.v1"
SERVICE_NAMES = tuple(tei.DESCRIPTOR.services_by_name[name].full_name for name in ("Info", "Rerank"))
SCORE_NOTE = "score = 1/rank: a listwise order, not a calibrated relevance or a logit"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("pe-rank-service")
    except PackageNotFoundError:
        return "unknown"


def tei_field(name: str) -> str:
    """PE-Rank's field names as TEI's request spells them: passages[3].text -> texts[3]."""
    name = re.sub(r"^passages\[(\d+)\]\.(text|id)$", r"texts[\1]", name)
    return "texts" if name == "passages" else name


def tei_request(query: str, texts: list[str], truncate: bool, return_text: bool,
                left_truncation: bool, prerank: bool | None = None, depth: int | None = None) -> RerankRequest:
    """TEI's rerank fields (and pe-rank's prerank/depth) as a PE-Rank request (the gRPC and HTTP TEI APIs)."""
    if left_truncation:
        raise InvalidArgument("only right truncation is supported (the encoder keeps a text's start)",
                              field="truncation_direction")
    return RerankRequest(query=query, passages=tuple(Passage(id=str(i), text=t) for i, t in enumerate(texts)),
                         truncate=truncate, return_text=return_text, prerank=prerank, depth=depth)


def _optional(message, name: str):
    """A proto3 optional field's value, None when unset."""
    return getattr(message, name) if message.HasField(name) else None


def model_id(ranking: RankingService) -> str:
    """What TEI calls the model, as an id (no spaces): ``pe-rank/<LLM type>-<encoder type>``, e.g.
    ``pe-rank/embed_llama-bert`` for the demo. What scores mean is in the OpenAPI description (SCORE_NOTE)."""
    info, enc = ranking.repo.info, ranking.repo.encoder_config
    return "pe-rank/" + "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", str(part))
                                 for part in (info.config.get("model_type"), enc.get("model_type")))


class TeiInfo(tei_grpc.InfoServicer):
    def __init__(self, ranking: RankingService) -> None:
        self.ranking = ranking

    async def Info(self, request: tei.InfoRequest, context: grpc.aio.ServicerContext) -> tei.InfoResponse:
        c = self.ranking.config
        return tei.InfoResponse(
            version=version(), model_id=model_id(self.ranking), model_dtype="float32",
            model_type=tei.MODEL_TYPE_RERANKER, max_concurrent_requests=c.max_concurrent + c.max_queued,
            max_input_length=ENCODER_MAX_TOKENS, max_batch_tokens=ENCODER_MAX_TOKENS * c.limits.max_window_size,
            max_client_batch_size=c.max_passages, tokenization_workers=c.cpu_workers,
        )


class TeiRerank(tei_grpc.RerankServicer):
    def __init__(self, ranking: RankingService) -> None:
        self.ranking = ranking

    async def Rerank(self, request: tei.RerankRequest, context: grpc.aio.ServicerContext) -> tei.RerankResponse:
        request_id = self.ranking.new_request_id()
        try:
            result = await self.ranking.rank(lambda: tei_request(
                request.query, list(request.texts), request.truncate, request.return_text,
                request.truncation_direction == tei.TRUNCATION_DIRECTION_LEFT,
                _optional(request, "prerank"), _optional(request, "depth")),
                grpc_deadline(context), request_id, API, tei_field)
        except ServiceError as exc:
            await grpc_abort(context, exc, request_id)
        return _response(result, request.query, list(request.texts))

    async def RerankStream(self, request_iterator: AsyncIterator[tei.RerankStreamRequest],
                           context: grpc.aio.ServicerContext) -> tei.RerankResponse:
        """The whole stream is one listwise request: every message must carry the same query."""
        request_id = self.ranking.new_request_id()
        messages = [m async for m in request_iterator]
        try:
            def convert() -> RerankRequest:
                if not messages:
                    raise InvalidArgument("the stream carried no message", field="texts")
                first = messages[0]
                for i, m in enumerate(messages):
                    if m.query != first.query:
                        raise InvalidArgument(f"message {i} has another query than message 0; "
                                              "a stream is ranked as one list", field="query")
                return tei_request(first.query, [m.text for m in messages], first.truncate, first.return_text,
                                   first.truncation_direction == tei.TRUNCATION_DIRECTION_LEFT,
                                   _optional(first, "prerank"), _optional(first, "depth"))

            result = await self.ranking.rank(convert, grpc_deadline(context), request_id, API, tei_field)
        except ServiceError as exc:
            await grpc_abort(context, exc, request_id)
        return _response(result, messages[0].query, [m.text for m in messages])


def _response(result: RerankResult, query: str, texts: list[str]) -> tei.RerankResponse:
    t = result.timings
    response = tei.RerankResponse(metadata=tei.Metadata(
        compute_chars=len(query) + sum(len(x) for x in texts),
        compute_tokens=result.stats.prompt_tokens,
        total_time_ns=int(t.total_ms * 1e6), queue_time_ns=int(t.queue_ms * 1e6),
        inference_time_ns=int((t.encode_ms + t.prefill_ms + t.decode_ms) * 1e6),
    ))
    for r in result.ranking:
        rank = response.ranks.add(index=r.index, score=r.score)
        if r.text is not None:
            rank.text = r.text
    return response
