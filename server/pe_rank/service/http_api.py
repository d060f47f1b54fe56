"""The HTTP APIs rerank clients already speak, plus ``GET /health``, ``GET /info`` and ``/openapi.json``:

- TEI's ``POST /rerank`` (``texts``), which also takes the Cohere-shaped body vLLM and Infinity serve
  there (``documents``): the body tells them apart, and the documents shape answers as vLLM does;
- Cohere/Jina's ``POST /v1/rerank`` and ``/v2/rerank``;
- Infinity's ``POST /infinity/rerank`` (its ``document`` is a string; the same body as vLLM's, which
  no client lets a server tell apart, hence a path of its own);
- NVIDIA NIM's ``POST /v1/ranking``, the per-model ``POST /v1/retrieval/{model}/reranking`` and
  ``GET /v1/models``.

A FastAPI app served by uvicorn on the gRPC server's own event loop. Pydantic checks only the
JSON's shape; every value goes through :meth:`RankingService.rank`, like the gRPC APIs, and
every error through :func:`.errors.http_status`.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from typing import Annotated, Any, Literal, Union

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Discriminator, Field, Tag
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.types import ENCODER_MAX_TOKENS, Passage, RerankRequest, RerankResult
from .app import RankingService
from .errors import (GRACE_OVER, Cancelled, InvalidArgument, ServiceError, ShuttingDown, TooLarge, Unauthenticated,
                     Unavailable, http_status)
from .tei import SCORE_NOTE, model_id, tei_field, tei_request, version

# ---- request and response bodies (shapes only; values are checked by core/validation.py)

PRERANK_NOTE = ("pe-rank's own: order the documents by the encoder's query-document cosine first, then PE-Rank "
                "reorders only the top `depth`; null: the model's default (GetModelInfo / ranking.json)")
DEPTH_NOTE = "pe-rank's own: how many of the (pre-ranked) documents PE-Rank reorders; 0: all; null: the model's default"
_CHUNKS = ("long documents are split into chunks of at most 512 encoder tokens and ranked by their best "
           "chunk; 1: cut at 512 tokens")


class TeiRerankRequest(BaseModel):
    query: str
    texts: list[str]
    truncate: bool | None = Field(False, description="false (TEI's default): a text over 512 encoder tokens is an "
                                                        "error; true: a long text is ranked as chunks of at most "
                                                        "512 tokens (--max-chunks-per-doc of them)")
    raw_scores: bool = Field(False, description="accepted; PE-Rank has no logits, so scores stay 1/rank")
    return_text: bool = False
    truncation_direction: Literal["Right", "Left", "right", "left"] | None = Field(
        None, description="only Right: the encoder keeps a text's beginning")
    prerank: bool | None = Field(None, description=PRERANK_NOTE)
    depth: int | None = Field(None, description=DEPTH_NOTE)


class TeiRank(BaseModel):
    index: int
    score: float = Field(description=SCORE_NOTE)
    text: str | None = None


class DocumentsRerankRequest(BaseModel):
    """Cohere's body (v1 and v2), as Jina, vLLM and Infinity take it too."""

    model: str | None = Field(None, description="accepted and echoed; the server ranks with the model it serves")
    query: str
    documents: list[str | dict[str, Any]] = Field(
        description="strings, or objects ranked on their `text` (or on `rank_fields`)")
    top_n: int | None = Field(None, description="only the best top_n, decoded exactly (partial decoding)")
    return_documents: bool = Field(False, description="echo each document (an object as sent; a string as "
                                                      "{text}, or the string itself on /infinity/rerank)")
    max_tokens_per_doc: int | None = Field(None, ge=1, description="text tokens read per document: up to 512 "
                                                                   "it is cut there, above across its chunks")
    max_chunks_per_doc: int | None = Field(None, ge=1, description=f"chunks per document (default 10): {_CHUNKS}")
    rank_fields: list[str] | None = Field(None, description="object documents: rank on these fields' values, "
                                                            "joined with newlines in this order (default: text)")
    raw_scores: bool = Field(False, description="Infinity's; accepted, scores stay 1/rank")
    # vLLM's options PE-Rank cannot honour: refused when set, never ignored
    truncate_prompt_tokens: int | None = Field(None, description="not supported (use max_tokens_per_doc)")
    truncation_side: Literal["left", "right"] | None = Field(None, description="only right")
    max_tokens_per_query: int | None = Field(None, description="not supported")
    instruction: str | None = Field(None, description="not supported")
    prerank: bool | None = Field(None, description=PRERANK_NOTE)
    depth: int | None = Field(None, description=DEPTH_NOTE)


class CohereResult(BaseModel):
    index: int
    relevance_score: float = Field(description=SCORE_NOTE)
    document: dict[str, Any] | None = None


class CohereRerankResponse(BaseModel):
    id: str
    model: str | None = None
    results: list[CohereResult]
    meta: dict[str, Any]
    usage: dict[str, int]


class InfinityResult(BaseModel):
    index: int
    relevance_score: float = Field(description=SCORE_NOTE)
    document: str | None = None


class InfinityRerankResponse(BaseModel):
    object: Literal["rerank"] = "rerank"
    id: str
    model: str | None = None
    created: int
    results: list[InfinityResult]
    usage: dict[str, int]


class NimText(BaseModel):
    text: str
    image: str | None = Field(None, description="not supported: PE-Rank ranks text")


class NimRankingRequest(BaseModel):
    model: str | None = Field(None, description="accepted; the server ranks with the model it serves")
    query: NimText
    passages: list[NimText]
    truncate: Literal["NONE", "END"] | None = Field(
        None, description="NONE (NIM's default): a passage over 512 encoder tokens is an error; END: a long "
                          "passage is ranked as chunks of at most 512 tokens (--max-chunks-per-doc of them)")
    top_k: int | None = Field(None, description="only the best top_k (the per-model path's field), decoded exactly")
    prerank: bool | None = Field(None, description=PRERANK_NOTE)
    depth: int | None = Field(None, description=DEPTH_NOTE)


class NimRanking(BaseModel):
    index: int
    logit: float = Field(description="1/rank: " + SCORE_NOTE)


class NimRankingResponse(BaseModel):
    rankings: list[NimRanking]
    usage: dict[str, int]


class ErrorBody(BaseModel):
    error: str
    error_type: str
    message: str
    object: Literal["error"] = "error"
    request_id: str
    field: str | None = None


_DISCONNECT_POLL_S = 0.25
_ERRORS = {code: {"model": ErrorBody} for code in (413, 422, 429, 503, 504)}
SERVED_MODEL = "pe-rank"  # the id GET /v1/models lists (NIM clients without a model pick it)
_BODY_TAGS = {"TEI-body", "documents-body"}  # /rerank's two body shapes (pydantic puts the tag in an error's loc)


def cohere_field(name: str) -> str:
    """PE-Rank's field names as the Cohere/Jina request spells them: passages[3].text -> documents[3]."""
    name = re.sub(r"^passages\[(\d+)\]\.(text|id)$", r"documents[\1]", name)
    return "documents" if name == "passages" else name


def nim_field(name: str) -> str:
    """As NIM's request spells them: query -> query.text, top_n -> top_k (passages[3].text as it is)."""
    return {"query": "query.text", "top_n": "top_k"}.get(name, name)


def _pydantic_field(loc: tuple) -> str:
    """("body", "documents", 0, "str") -> "documents[0]": the client's field, cut at its first index."""
    parts = [p for p in loc if p != "body" and p not in _BODY_TAGS]
    name = ""
    for part in parts:
        if isinstance(part, int):
            if not name:  # a JSON syntax error: loc is the character position
                break
            name += f"[{part}]"
            break
        name += f".{part}" if name else str(part)
    return name or "body"


def _body_shape(body: Any) -> str:
    """/rerank: vLLM's (Cohere's) shape when the body has ``documents`` and no ``texts``; TEI's otherwise
    (so a body with neither is told TEI's ``texts`` is missing)."""
    return "documents-body" if isinstance(body, dict) and "documents" in body and "texts" not in body else "TEI-body"


RerankBody = Annotated[Union[Annotated[TeiRerankRequest, Tag("TEI-body")],
                             Annotated[DocumentsRerankRequest, Tag("documents-body")]], Discriminator(_body_shape)]


def document_texts(documents: list[str | dict[str, Any]], rank_fields: list[str] | None) -> list[str]:
    """The text ranked for each document: a string as it is; an object's ``text``, or its ``rank_fields``'
    values joined with newlines in that order. Refused naming the document and field, never ignored."""
    if rank_fields is not None:
        if not rank_fields or any(not isinstance(f, str) or not f for f in rank_fields) \
                or len(set(rank_fields)) != len(rank_fields):
            raise InvalidArgument("must name one or more distinct fields", field="rank_fields")
    fields = rank_fields or ["text"]
    texts = []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            if fields != ["text"]:
                raise InvalidArgument(f"a string document has no field {next(f for f in fields if f != 'text')!r} "
                                      "(rank_fields)", field=f"documents[{i}]")
            texts.append(doc)
            continue
        values = []
        for name in fields:
            if name not in doc:
                raise InvalidArgument("missing" + (" (named in rank_fields)" if rank_fields else ""),
                                      field=f"documents[{i}].{name}")
            value = doc[name]
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise InvalidArgument(f"must be a string, got {type(value).__name__}", field=f"documents[{i}].{name}")
            values.append(str(value))
        texts.append("\n".join(values))
    return texts


def _refuse_unsupported(body: DocumentsRerankRequest) -> None:
    """vLLM's options PE-Rank cannot honour are refused by name, not ignored."""
    for name, why in (("truncate_prompt_tokens", "not supported; max_tokens_per_doc cuts each document"),
                      ("max_tokens_per_query", "not supported; the query is read whole (at most 4096 characters)"),
                      ("instruction", "not supported: PE-Rank's prompt is fixed")):
        if getattr(body, name) is not None:
            raise InvalidArgument(why, field=name)
    if body.truncation_side == "left":
        raise InvalidArgument("only right truncation is supported (the encoder keeps a text's start)",
                              field="truncation_side")


def chunk_headers(result: RerankResult, request_id: str) -> dict[str, str]:
    """What chunking did, on every HTTP API's answer (TEI's and NIM's bodies have no room for it)."""
    c = result.chunking
    return {"X-Request-Id": request_id, "X-PE-Rank-Chunks": str(c.chunks),
            "X-PE-Rank-Chunked-Documents": str(c.chunked_passages), "X-PE-Rank-Tokens-Cut": str(c.tokens_cut),
            "X-PE-Rank-Cut-Documents": str(c.cut_passages)}


class _BodyTooLarge(HTTPException):
    """Raised while a body without Content-Length (chunked) is read past the limit; FastAPI passes an
    HTTPException through its body parsing, so the app's handler answers it as every 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413)
        self.limit = limit


def http_body_limit(config) -> int:
    """The HTTP APIs carry texts only: twice the text limit (JSON escapes) plus room for the rest,
    so the JSON parse on the event loop stays short, and never past the gRPC message limit."""
    return min(config.max_message_mb << 20, 2 * config.limits.max_text_bytes + (1 << 20))


class _BodyLimit:
    """413 before the body is read when Content-Length is over the limit, and as soon as a chunked
    body passes it (uvicorn reads any body whole otherwise)."""

    def __init__(self, app: ASGIApp, limit: int, on_refused) -> None:
        self.app, self.limit, self.on_refused = app, limit, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            response = self.on_refused(TooLarge(f"body of {int(length)} bytes is over the {self.limit} byte limit",
                                                field="body"))
            return await response(scope, receive, send)
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge(self.limit)
            return message

        await self.app(scope, counted, send)


# what anyone may call without a key: the probe and the API's description (as gRPC's health and reflection)
OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})


class _ApiKeyCheck:
    """With ``--api-key-file``: every path but :data:`OPEN_PATHS` needs ``Authorization: Bearer <key>``;
    anything else is 401 with ``WWW-Authenticate`` before the body is read, counted by ``on_refused``."""

    def __init__(self, app: ASGIApp, keys, on_refused) -> None:
        self.app, self.keys, self.on_refused = app, keys, on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        values = [v for k, v in scope.get("headers") or [] if k == b"authorization"]
        if len(values) == 1 and self.keys.check_bearer(values[0].decode("latin-1")):
            return await self.app(scope, receive, send)
        error = (Unauthenticated("missing API key: send the header 'Authorization: Bearer <key>'", reason="missing")
                 if not values else Unauthenticated("invalid API key", reason="invalid"))
        response = self.on_refused(error)
        await response(scope, receive, send)


def build_app(ranking: RankingService, api_keys=None) -> FastAPI:
    app = FastAPI(
        title="PE-Rank",
        version=version(),
        description="Listwise passage reranking (PE-Rank) behind the rerank APIs clients already use: "
                    "TEI and vLLM (`POST /rerank`), Cohere/Jina (`POST /v1/rerank`, `/v2/rerank`), Infinity "
                    "(`POST /infinity/rerank`) and NVIDIA NIM (`POST /v1/ranking`, "
                    "`POST /v1/retrieval/{model}/reranking`, `GET /v1/models`). "
                    f"Scores: {SCORE_NOTE}. Long documents: {_CHUNKS}.",
    )
    started = int(time.time())

    def refuse(error: ServiceError, request_id: str | None = None, api: str = "http") -> JSONResponse:
        request_id = request_id or ranking.new_request_id()
        ranking.refused(error, request_id, api)
        return answer(error, request_id)

    def answer(error: ServiceError, request_id: str) -> JSONResponse:
        status, body, headers = http_status(error, request_id)  # counted and logged by rank() or refuse()
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(_BodyTooLarge)
    async def _body_too_large(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return refuse(TooLarge(f"body over the {exc.limit} byte limit", field="body"))

    @app.exception_handler(RequestValidationError)
    async def _shape_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = tuple(first.get("loc", ()))
        return refuse(InvalidArgument(str(first.get("msg", "invalid")), field=_pydantic_field(loc)),
                      api=_api_of(request.url.path, loc))

    async def run(http: Request, convert, request_id: str, api: str, field_name) -> RerankResult:
        """rank(), cancelled when the client disconnects (uvicorn lets a handler run on after that);
        HTTP has no deadline, so --max-request-time bounds it."""
        ranked = asyncio.ensure_future(ranking.rank(convert, None, request_id, api, field_name))
        try:
            while not (await asyncio.wait({ranked}, timeout=_DISCONNECT_POLL_S))[0]:
                if await http.is_disconnected():
                    ranked.cancel()  # counted and logged as CANCELLED by rank()
                    with contextlib.suppress(asyncio.CancelledError):
                        await ranked
                    raise Cancelled("the client disconnected")
        except asyncio.CancelledError:  # uvicorn cancels what still runs when the shutdown grace ends
            ranked.cancel()  # the ranking stops with its handler, never runs on alone
            if not ranking.grace_over:
                raise
            asyncio.current_task().uncancel()  # answered as the gRPC clients are: retryable, not a bare 500
            raise ShuttingDown(GRACE_OVER) from None
        return ranked.result()

    async def ranked_json(http: Request, convert, api: str, field_name, shape) -> JSONResponse:
        """One request through rank(), answered as ``shape(result, request_id)`` with the chunk headers."""
        request_id = ranking.new_request_id()
        try:
            result = await run(http, convert, request_id, api, field_name)
        except ServiceError as exc:
            return answer(exc, request_id)
        body = shape(result, request_id)
        content = body.model_dump(exclude_none=True) if isinstance(body, BaseModel) else \
            [item.model_dump(exclude_none=True) for item in body]
        return JSONResponse(content, headers=chunk_headers(result, request_id))

    # ---- TEI (texts) and vLLM (documents) on /rerank

    async def tei_rerank(body: TeiRerankRequest, http: Request) -> JSONResponse:
        def convert() -> RerankRequest:
            return tei_request(body.query, body.texts, bool(body.truncate), body.return_text,
                               (body.truncation_direction or "right").lower() == "left", body.prerank, body.depth)

        return await ranked_json(http, convert, "tei-http", tei_field, lambda result, _: [
            TeiRank(index=r.index, score=r.score, text=r.text) for r in result.ranking])

    @app.post("/rerank", response_model=Union[list[TeiRank], CohereRerankResponse], responses=_ERRORS,
              tags=["TEI", "vLLM"],
              summary="TEI (`texts`) or vLLM (`documents`, answered as vLLM): rank texts for a query, best first")
    async def rerank(body: RerankBody, http: Request):
        if isinstance(body, TeiRerankRequest):
            return await tei_rerank(body, http)
        return await documents_rerank(body, "vllm-http", http)

    # ---- Cohere/Jina (and vLLM, Infinity): documents

    def documents_request(body: DocumentsRerankRequest) -> RerankRequest:
        _refuse_unsupported(body)
        texts = document_texts(body.documents, body.rank_fields)
        return RerankRequest(query=body.query, passages=tuple(Passage(id=str(i), text=t) for i, t in enumerate(texts)),
                             top_n=body.top_n or None,  # 0 and null: all; negative: refused by validation
                             max_chunks_per_doc=body.max_chunks_per_doc, max_tokens_per_doc=body.max_tokens_per_doc,
                             prerank=body.prerank, depth=body.depth)

    async def documents_rerank(body: DocumentsRerankRequest, api: str, http: Request) -> JSONResponse:
        def shape(result: RerankResult, request_id: str) -> CohereRerankResponse:
            c = result.chunking
            meta: dict[str, Any] = {
                "api_version": {"version": "2" if api == "cohere-v2" else "1"},
                # Cohere's rule: a search unit is up to 100 documents, each chunk counting as one
                "billed_units": {"search_units": max(1, math.ceil(c.chunks / 100))},
                "chunks": {"chunks": c.chunks, "chunked_documents": c.chunked_passages,
                           "tokens_cut": c.tokens_cut, "cut_documents": c.cut_passages},
            }
            if c.tokens_cut:
                meta["warnings"] = [f"{c.cut_passages} document(s) longer than max_tokens_per_doc or "
                                    f"max_chunks_per_doc: {c.tokens_cut} tokens were not read"]
            return CohereRerankResponse(
                id=request_id, model=body.model, meta=meta, usage={"total_tokens": result.stats.prompt_tokens},
                results=[CohereResult(index=r.index, relevance_score=r.score,
                                      document=_cohere_document(body.documents[r.index]) if body.return_documents
                                      else None) for r in result.ranking])

        return await ranked_json(http, lambda: documents_request(body), api, cohere_field, shape)

    @app.post("/v1/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True,
              responses=_ERRORS, tags=["Cohere/Jina"], summary="Cohere v1 / Jina: rank documents for a query")
    async def v1_rerank(body: DocumentsRerankRequest, http: Request):
        return await documents_rerank(body, "cohere-v1", http)

    @app.post("/v2/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True,
              responses=_ERRORS, tags=["Cohere/Jina"], summary="Cohere v2: rank documents for a query")
    async def v2_rerank(body: DocumentsRerankRequest, http: Request):
        return await documents_rerank(body, "cohere-v2", http)

    @app.post("/infinity/rerank", response_model=InfinityRerankResponse, response_model_exclude_none=True,
              responses=_ERRORS, tags=["Infinity"],
              summary="Infinity: rank documents for a query (a document comes back as a string)")
    async def infinity_rerank(body: DocumentsRerankRequest, http: Request):
        def shape(result: RerankResult, request_id: str) -> InfinityRerankResponse:
            texts = document_texts(body.documents, body.rank_fields) if body.return_documents else None
            tokens = result.stats.prompt_tokens
            return InfinityRerankResponse(
                id=request_id, model=body.model, created=int(time.time()),
                usage={"prompt_tokens": tokens, "total_tokens": tokens},
                results=[InfinityResult(index=r.index, relevance_score=r.score,
                                        document=texts[r.index] if texts else None) for r in result.ranking])

        return await ranked_json(http, lambda: documents_request(body), "infinity-http", cohere_field, shape)

    # ---- NVIDIA NIM

    async def nim_ranking(body: NimRankingRequest, http: Request) -> JSONResponse:
        def convert() -> RerankRequest:
            if body.query.image is not None:
                raise InvalidArgument("images are not supported: PE-Rank ranks text", field="query.image")
            for i, p in enumerate(body.passages):
                if p.image is not None:
                    raise InvalidArgument("images are not supported: PE-Rank ranks text", field=f"passages[{i}].image")
            return RerankRequest(query=body.query.text,
                                 passages=tuple(Passage(id=str(i), text=p.text) for i, p in enumerate(body.passages)),
                                 top_n=body.top_k or None, truncate=body.truncate == "END", prerank=body.prerank,
                                 depth=body.depth)

        def shape(result: RerankResult, request_id: str) -> NimRankingResponse:
            tokens = result.stats.prompt_tokens
            return NimRankingResponse(rankings=[NimRanking(index=r.index, logit=r.score) for r in result.ranking],
                                      usage={"prompt_tokens": tokens, "total_tokens": tokens})

        return await ranked_json(http, convert, "nim-http", nim_field, shape)

    @app.post("/v1/ranking", response_model=NimRankingResponse, responses=_ERRORS, tags=["NVIDIA NIM"],
              summary="NIM: rank passages for a query, best first (logit = 1/rank)")
    async def v1_ranking(body: NimRankingRequest, http: Request):
        return await nim_ranking(body, http)

    @app.post("/v1/retrieval/{model:path}/reranking", response_model=NimRankingResponse, responses=_ERRORS,
              tags=["NVIDIA NIM"], summary="NIM's per-model path (LiteLLM's nvidia_nim/): as /v1/ranking")
    async def retrieval_reranking(model: str, body: NimRankingRequest, http: Request):
        return await nim_ranking(body, http)

    @app.get("/v1/models", tags=["NVIDIA NIM"], summary="the model served (OpenAI's list shape, as NIM's)")
    async def models():
        return {"object": "list", "data": [{"id": SERVED_MODEL, "object": "model", "created": started,
                                            "owned_by": "pe-rank", "root": SERVED_MODEL,
                                            "max_model_len": ENCODER_MAX_TOKENS}]}

    # ---- service

    @app.get("/health", tags=["service"], summary="200 when a Triton server is ready, else 503",
             responses={503: {"model": ErrorBody}})
    async def health():
        if ranking.pool.serving:
            return {"status": "ok"}
        return answer(Unavailable("no model server is ready"), ranking.new_request_id())

    @app.get("/info", tags=["service"], summary="TEI's /info: what is served, its limits, what scores mean")
    async def info():
        c = ranking.config
        return {
            "model_id": model_id(ranking), "model_sha": None, "model_dtype": "float32",
            "model_type": {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}},
            "max_concurrent_requests": c.max_concurrent + c.max_queued, "max_input_length": ENCODER_MAX_TOKENS,
            "max_batch_tokens": ENCODER_MAX_TOKENS * c.limits.max_window_size, "max_batch_requests": None,
            "max_client_batch_size": c.max_passages, "tokenization_workers": c.cpu_workers, "version": version(),
            "sha": None, "docker_label": None,
        }

    app.add_middleware(_BodyLimit, limit=http_body_limit(ranking.config),
                       on_refused=lambda error: refuse(error, api="http"))
    if api_keys is not None:  # added last: the outermost check, before the body limit and the routes

        def unauthenticated(error: Unauthenticated) -> JSONResponse:
            ranking.metrics.unauthenticated.labels(error.reason).inc()  # as the gRPC interceptor counts
            return answer(error, ranking.new_request_id())

        app.add_middleware(_ApiKeyCheck, keys=api_keys, on_refused=unauthenticated)
    return app


def _cohere_document(doc: str | dict[str, Any]) -> dict[str, Any]:
    """Cohere's (and vLLM's) returned document: an object as sent, a string as {"text": ...}."""
    return {"text": doc} if isinstance(doc, str) else doc


def _api_of(path: str, loc: tuple) -> str:
    """The API a shape error belongs to, for the log and the request counter."""
    if path == "/rerank":
        return "vllm-http" if "documents-body" in loc[1:2] else "tei-http"
    if path.startswith("/infinity/"):
        return "infinity-http"
    if path == "/v1/ranking" or path.startswith("/v1/retrieval/"):
        return "nim-http"
    return "cohere-http"


class HttpServer:
    """uvicorn on the running event loop (the gRPC server's); signals stay with the gRPC side."""

    def __init__(self, ranking: RankingService, host: str, port: int, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, api_keys=None, ssl_client_ca: str | None = None) -> None:
        """``api_keys``: an :class:`~.auth.ApiKeys` every ranking route checks; ``ssl_client_ca``: mutual
        TLS, the TLS handshake requires a client certificate signed by that CA (as on the gRPC port)."""
        import ssl

        import uvicorn

        class _Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self):  # serve_until_signalled owns SIGINT/SIGTERM
                yield

        tls_client = dict(ssl_ca_certs=ssl_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED) if ssl_client_ca else {}
        config = uvicorn.Config(build_app(ranking, api_keys), host=host, port=port, log_level="warning",
                                lifespan="off", ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, access_log=False,
                                **tls_client)
        self.server = _Server(config)
        self.task = None
        self.port: int | None = None

    async def start(self) -> int:
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()  # raises why it could not start (e.g. the port is taken)
                raise RuntimeError("the HTTP server stopped while starting")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Close the port, then give running requests ``grace_s`` (what is left of the server's drain)."""
        if self.task is not None:
            self.server.config.timeout_graceful_shutdown = grace_s
            self.server.should_exit = True
            await self.task
            self.task = None
