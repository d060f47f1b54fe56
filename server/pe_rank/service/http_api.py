"""The HTTP APIs rerank clients already speak: TEI's ``POST /rerank`` and Cohere/Jina's
``POST /v1/rerank`` and ``/v2/rerank``, plus ``GET /health``, ``GET /info`` and ``/openapi.json``.

A FastAPI app served by uvicorn on the gRPC server's own event loop. Pydantic checks only the
JSON's shape; every value goes through :meth:`RankingService.rank`, like the gRPC APIs, and
every error through :func:`.errors.http_status`.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from ..core.types import ENCODER_MAX_TOKENS
from ..core.types import Passage, RerankRequest, RerankResult
from .app import RankingService
from .errors import Cancelled, InvalidArgument, ServiceError, TooLarge, Unauthenticated, Unavailable, http_status
from .tei import SCORE_NOTE, model_id, tei_field, tei_request, version

# ---- request and response bodies (shapes only; values are checked by core/validation.py)


class TeiRerankRequest(BaseModel):
    query: str
    texts: list[str]
    truncate: bool | None = Field(False, description="false (TEI's default): a text over 512 encoder tokens is an "
                                                        "error; true: it is cut to its first 512 tokens")
    raw_scores: bool = Field(False, description="accepted; PE-Rank has no logits, so scores stay 1/rank")
    return_text: bool = False
    truncation_direction: Literal["Right", "Left", "right", "left"] | None = Field(
        None, description="only Right: the encoder keeps a text's beginning")


class TeiRank(BaseModel):
    index: int
    score: float = Field(description=SCORE_NOTE)
    text: str | None = None


class DocumentObject(BaseModel):
    text: str


class CohereRerankRequest(BaseModel):
    model: str | None = Field(None, description="accepted and echoed; the server ranks with the model it serves")
    query: str
    documents: list[str | DocumentObject]
    top_n: int | None = Field(None, description="only the best top_n, decoded exactly (partial decoding)")
    return_documents: bool = Field(False, description="echo each document as {text}")
    max_tokens_per_doc: int | None = Field(None, description=f"at least {ENCODER_MAX_TOKENS}: documents are cut to "
                                                             f"the encoder's {ENCODER_MAX_TOKENS} tokens")


class CohereDocument(BaseModel):
    text: str


class CohereResult(BaseModel):
    index: int
    relevance_score: float = Field(description=SCORE_NOTE)
    document: CohereDocument | None = None


class CohereRerankResponse(BaseModel):
    id: str
    model: str | None = None
    results: list[CohereResult]
    meta: dict[str, Any]
    usage: dict[str, int]


class ErrorBody(BaseModel):
    error: str
    error_type: str
    message: str
    request_id: str
    field: str | None = None


_DISCONNECT_POLL_S = 0.25
_ERRORS = {code: {"model": ErrorBody} for code in (413, 422, 429, 503, 504)}


def cohere_field(name: str) -> str:
    """PE-Rank's field names as the Cohere/Jina request spells them: passages[3].text -> documents[3]."""
    name = re.sub(r"^passages\[(\d+)\]\.(text|id)$", r"documents[\1]", name)
    return "documents" if name == "passages" else name


def _pydantic_field(loc: tuple) -> str:
    """("body", "documents", 0, "str") -> "documents[0]": the client's field, cut at its first index."""
    parts = [p for p in loc if p != "body"]
    name = ""
    for part in parts:
        if isinstance(part, int):
            if not name:  # a JSON syntax error: loc is the character position
                break
            name += f"[{part}]"
            break
        name += f".{part}" if name else str(part)
    return name or "body"


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
                    "TEI (`POST /rerank`) and Cohere/Jina (`POST /v1/rerank`, `/v2/rerank`). "
                    f"Scores: {SCORE_NOTE}.",
    )

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
        api = "tei-http" if request.url.path == "/rerank" else "cohere-http"
        field = _pydantic_field(tuple(first.get("loc", ())))
        return refuse(InvalidArgument(str(first.get("msg", "invalid")), field=field), api=api)

    async def run(http: Request, convert, request_id: str, api: str, field_name) -> RerankResult:
        """rank(), cancelled when the client disconnects (uvicorn lets a handler run on after that);
        HTTP has no deadline, so --max-request-time bounds it."""
        ranked = asyncio.ensure_future(ranking.rank(convert, None, request_id, api, field_name))
        while not (await asyncio.wait({ranked}, timeout=_DISCONNECT_POLL_S))[0]:
            if await http.is_disconnected():
                ranked.cancel()  # counted and logged as CANCELLED by rank()
                with contextlib.suppress(asyncio.CancelledError):
                    await ranked
                raise Cancelled("the client disconnected")
        return ranked.result()

    @app.post("/rerank", response_model=list[TeiRank], response_model_exclude_none=True, responses=_ERRORS,
              tags=["TEI"], summary="TEI: rank texts for a query, best first")
    async def tei_rerank(body: TeiRerankRequest, http: Request):
        request_id = ranking.new_request_id()
        try:
            result = await run(http, lambda: tei_request(body.query, body.texts, bool(body.truncate), body.return_text,
                                                   (body.truncation_direction or "right").lower() == "left"),
                               request_id, "tei-http", tei_field)
        except ServiceError as exc:
            return answer(exc, request_id)
        return [TeiRank(index=r.index, score=r.score, text=r.text) for r in result.ranking]

    async def cohere_rerank(body: CohereRerankRequest, api: str, http: Request) -> Any:
        request_id = ranking.new_request_id()
        if body.max_tokens_per_doc is not None and body.max_tokens_per_doc < ENCODER_MAX_TOKENS:
            return refuse(InvalidArgument(f"PE-Rank's encoder reads {ENCODER_MAX_TOKENS} tokens of each document; "
                                          f"a smaller limit is not supported", field="max_tokens_per_doc"),
                          request_id, api)
        def convert() -> RerankRequest:
            texts = [d if isinstance(d, str) else d.text for d in body.documents]
            return RerankRequest(query=body.query,
                                 passages=tuple(Passage(id=str(i), text=t) for i, t in enumerate(texts)),
                                 top_n=body.top_n or None,  # 0 and null: all; negative: refused by validation
                                 return_text=body.return_documents)

        try:
            result = await run(http, convert, request_id, api, cohere_field)
        except ServiceError as exc:
            return answer(exc, request_id)
        return CohereRerankResponse(
            id=request_id, model=body.model,
            results=[CohereResult(index=r.index, relevance_score=r.score,
                                  document=CohereDocument(text=r.text) if r.text is not None else None)
                     for r in result.ranking],
            meta={"api_version": {"version": "2" if api == "cohere-v2" else "1"},
                  "billed_units": {"search_units": 1}},
            usage={"total_tokens": result.stats.prompt_tokens},
        )

    @app.post("/v1/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True,
              responses=_ERRORS, tags=["Cohere/Jina"], summary="Cohere v1 / Jina: rank documents for a query")
    async def v1_rerank(body: CohereRerankRequest, http: Request):
        return await cohere_rerank(body, "cohere-v1", http)

    @app.post("/v2/rerank", response_model=CohereRerankResponse, response_model_exclude_none=True,
              responses=_ERRORS, tags=["Cohere/Jina"], summary="Cohere v2: rank documents for a query")
    async def v2_rerank(body: CohereRerankRequest, http: Request):
        return await cohere_rerank(body, "cohere-v2", http)

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


class HttpServer:
    """uvicorn on the running event loop (the gRPC server's); signals stay with the gRPC side."""

    def __init__(self, ranking: RankingService, host: str, port: int, ssl_certfile: str | None = None,
                 ssl_keyfile: str | None = None, grace_s: float = 30.0, api_keys=None,
                 ssl_client_ca: str | None = None) -> None:
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
                                timeout_graceful_shutdown=grace_s, **tls_client)
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

    async def stop(self) -> None:
        if self.task is not None:
            self.server.should_exit = True
            await self.task
            self.task = None
