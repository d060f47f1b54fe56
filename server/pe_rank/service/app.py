"""The ranking service: validate once at the edge, rank through Triton, answer (every API, one path)."""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc
from pe_rank_export.configs import max_batch_size

from ..core.checkpoint import read_checkpoint_info
from ..core.chunking import DEFAULT_MAX_CHUNKS, DEFAULT_MAX_CHUNKS_PER_DOC, ChunkPlan, Chunker
from ..core.embeddings import EmbeddingCache, WindowEmbeddings
from ..core.prompt import PromptBuilder
from ..core.prerank import reranked_count, with_defaults
from ..core.proto import request_from_proto, response_to_proto
from ..core.ranker import window_bounds
from ..core.reranker import Reranker
from ..core.tokenization import EncoderTokenizer, load_prompt_tokenizer
from ..core.types import ENCODER_MAX_TOKENS, RerankRequest, RerankResult, Timings
from ..core.validation import Limits, validate_request
from ..v1 import ranker_pb2 as pb
from ..v1 import ranker_pb2_grpc as pb_grpc
from .admission import Admission, AdmissionLimits
from .errors import (GRACE_OVER, Bug, Cancelled, DeadlineExceeded, ModelServerGone, ServiceError, ShuttingDown,
                     from_exception, grpc_abort, grpc_deadline, metric_label)
from .metrics import Metrics
from .pool import REQUIRED_MODELS, TritonPool
from .triton_client import TritonEncoder, TritonWindowBackend

log = logging.getLogger("pe_rank.service")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ranker"].full_name


@dataclass
class ServiceConfig:
    repository: Path
    triton_urls: list[str]
    host: str = "127.0.0.1"
    port: int = 50051
    max_passages: int = 1000
    max_window_size: int = 100
    max_concurrent: int = 8       # requests ranked at once
    max_queued: int = 16          # requests waiting for a slot
    max_queue_wait_s: float = 2.0
    max_request_s: float = 60.0   # server-side bound on a request's time; 0: none
    max_text_bytes: int = 8 << 20
    max_chunks_per_doc: int = DEFAULT_MAX_CHUNKS_PER_DOC  # chunks of a long passage when the request says none
    max_chunks: int = DEFAULT_MAX_CHUNKS  # passages ranked per request once long ones are split
    cpu_workers: int = 2          # threads converting and validating requests off the event loop
    cache_size: int = 10_000
    embedding_mode: str = "exact"
    metrics_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_mb: int = 64
    grace_s: float = 30.0
    health_poll_s: float = 1.0
    http_port: int | None = None  # TEI and Cohere/Jina HTTP APIs; None: off
    triton_credentials: object = None  # grpc.ChannelCredentials of a locked embedded Triton; None: plaintext
    triton_metrics_port: int | None = None  # the embedded Triton's (loopback, no auth): named in the start-up warnings
    limits: Limits = field(init=False)
    admission: AdmissionLimits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = Limits(max_passages=self.max_passages, max_window_size=self.max_window_size,
                             max_text_bytes=self.max_text_bytes, max_chunks=self.max_chunks)
        self.admission = AdmissionLimits(self.max_concurrent, self.max_queued, self.max_queue_wait_s)


class RepositoryView:
    """What the server reads from the exported repository: tokenizers and sizes."""

    def __init__(self, repository: Path) -> None:
        checkpoint = repository / "pe_llm" / "1" / "checkpoint"
        tokenizer = repository / "pe_tokenizer" / "1" / "tokenizer"
        if not checkpoint.is_dir() or not tokenizer.is_dir():
            raise FileNotFoundError(f"{repository}: not an exported repository (run `pe-rank export` first)")
        self.info = read_checkpoint_info(checkpoint)
        self.prompts = PromptBuilder(load_prompt_tokenizer(checkpoint))
        self.encoder_tokenizer = EncoderTokenizer(tokenizer)
        self.chunker = Chunker.from_file(tokenizer / "tokenizer.json")  # long passages as chunks (core/chunking.py)
        self.encoder_config = json.loads((self.info.encoder_dir / "config.json").read_text())
        # a window is one pe_embed request, so windows may not exceed the encoder's max batch
        self.max_batch = max_batch_size(repository / "pe_encoder" / "config.pbtxt")

    def token_counts(self, texts: list[str]) -> list[int]:
        """Encoder tokens per text, capped at one past the limit: all validation needs to know.

        A long text's first ``_PREFIX_CHARS`` (cut at a space, so its words tokenize as in the
        whole) usually already hold more tokens than the limit, so a multi-megabyte text costs
        milliseconds; only texts whose prefix stays under the limit are tokenized whole.
        """
        cap = ENCODER_MAX_TOKENS + 1
        prefixes = [_prefix(t) for t in texts]
        counts = self._counts(prefixes, cap)
        whole = [i for i, (t, p, c) in enumerate(zip(texts, prefixes, counts)) if c < cap and len(p) < len(t)]
        for i, c in zip(whole, self._counts([texts[i] for i in whole], cap)):
            counts[i] = c
        return counts

    def _counts(self, texts: list[str], cap: int) -> list[int]:
        if not texts:
            return []
        return self.encoder_tokenizer.counts(texts, cap)


_PREFIX_CHARS = 16 * (ENCODER_MAX_TOKENS + 1)


def _prefix(text: str) -> str:
    if len(text) <= _PREFIX_CHARS:
        return text
    cut = text.rfind(" ", 0, _PREFIX_CHARS)
    return text[:cut] if cut > 0 else text


class RankingService:
    """The one ranking path behind every API (pe_rank.v1, tei.v1, TEI and Cohere HTTP).

    :meth:`rank` is transport-independent: conversion and validation (core/validation.py, once)
    on CPU workers, admission (:mod:`.admission`), ranking on a ready Triton, metrics and the log
    line. It raises :class:`~.errors.ServiceError`; each API only hands over a conversion of its
    request and converts the answer out.
    """

    def __init__(self, config: ServiceConfig, repo: RepositoryView, pool: TritonPool, metrics: Metrics) -> None:
        self.config, self.repo, self.pool, self.metrics = config, repo, pool, metrics
        if repo.max_batch and repo.max_batch < config.limits.max_window_size:
            log.warning("windows capped at %d passages: the repository's max batch size", repo.max_batch)
            config.limits = dataclasses.replace(config.limits, max_window_size=repo.max_batch)
        self.cache = EmbeddingCache(config.cache_size)
        self.admission = Admission(config.admission)
        metrics.running.set_function(lambda: self.admission.running)
        metrics.queued.set_function(lambda: self.admission.queued)
        # as TEI's tokenization workers: conversion, validation and token counting of big requests
        # must not hold the event loop (health checks and every other request wait on it)
        self.workers = ThreadPoolExecutor(config.cpu_workers, thread_name_prefix="pe-rank-validate")
        self.closing = False  # set on stop: every request after it is refused with ShuttingDown
        self.grace_over = False  # set on stop when --grace ran out: what is still ranking is cancelled by us
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex[:16]

    async def rank(self, convert: Callable[[], RerankRequest], deadline: float | None, request_id: str,
                   api: str = "pe_rank.v1", field_name: Callable[[str], str] = str) -> RerankResult:
        """Rank one request; ``convert()`` builds it from the API's message (run off the event loop).

        ``deadline`` is the client's, on time.monotonic()'s clock (None: none); --max-request-time
        bounds it. ``field_name`` renames validation fields into the API's own (TEI's ``texts[3]``
        for ``passages[3].text``), so a client reads the name it sent.
        """
        started = time.perf_counter()
        deadline = self._deadline(deadline)
        error: ServiceError | None = None
        detail = ""
        try:
            with self._taken():
                req, plan = await asyncio.get_running_loop().run_in_executor(self.workers, self._validated, convert)
                windows = len(window_bounds(reranked_count(len(plan.ranked.passages), req.depth), req.window_size,
                                            req.stride))
                async with self.admission.slot(windows, deadline) as queued_s:
                    ranked = time.perf_counter()
                    result = await self._rank(req, plan, Timings(queue_ms=queued_s * 1e3), deadline)
                    self.admission.record(time.perf_counter() - ranked, windows)
            result.timings.total_ms = (time.perf_counter() - started) * 1e3
            self.metrics.passages.inc(len(req.passages))
            self.metrics.observe(result)
            return result
        except asyncio.CancelledError:
            # gRPC cancels the handler both when the client leaves and when its deadline passes
            past = deadline is not None and time.monotonic() >= deadline - _DEADLINE_SLACK_S
            if self.grace_over:  # the client was told UNAVAILABLE by the stopping transport
                error = ShuttingDown(GRACE_OVER)
            else:
                error = DeadlineExceeded("deadline exceeded") if past else Cancelled("cancelled by the client")
            raise
        except Exception as exc:
            error, detail = from_exception(exc)
            if isinstance(error, ModelServerGone):
                self.pool.mark_down(detail)
            if error.field:
                error.field = field_name(error.field)
            if isinstance(error, Bug):  # never crash the server, log it whole
                log.exception("request %s failed", request_id)
        finally:
            self._record(error, request_id, api, started, detail)
        raise error

    @contextlib.contextmanager
    def _taken(self) -> Iterator[None]:
        """Count the request as in flight, or refuse it once draining began (no call slips in after)."""
        if self.closing:
            raise ShuttingDown("the server is shutting down; retry on another replica")
        self.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def drained(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the requests in flight to finish; True if none is left.

        With :attr:`closing` set first, the gRPC and HTTP servers can keep accepting meanwhile: a call that
        arrives during the drain gets a clear UNAVAILABLE / 503 from here, not a cancel from a stopping transport.
        """
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    def _deadline(self, client: float | None) -> float | None:
        limit = self.config.max_request_s
        if not limit:
            return client
        server = time.monotonic() + limit
        return server if client is None else min(client, server)

    def _validated(self, convert: Callable[[], RerankRequest]) -> tuple[RerankRequest, ChunkPlan]:
        """Convert, apply the model's defaults, validate, and plan the chunks of long passages (tokenizing:
        a worker thread's job)."""
        req = with_defaults(convert(), self.repo.info.defaults)
        validate_request(req, self.repo.info.embedding_size, self.config.limits,
                         token_counts=self.repo.token_counts, max_tokens=ENCODER_MAX_TOKENS,
                         prompts=self.repo.prompts)
        return req, self.repo.chunker.plan(req, self.config.max_chunks_per_doc, self.config.limits.max_chunks)

    def refused(self, error: ServiceError, request_id: str, api: str, started: float | None = None) -> None:
        """Count and log a request an API refused before :meth:`rank` (its JSON shape, its size)."""
        self._record(error, request_id, api, time.perf_counter() if started is None else started)

    def _record(self, error: ServiceError | None, request_id: str, api: str, started: float, detail: str = "") -> None:
        status = metric_label(error)
        self.metrics.requests.labels(status).inc()
        said = f": {error.text(request_id)}" if error is not None else ""
        log.info("request %s %s %s in %.1f ms%s%s", request_id, api, status, (time.perf_counter() - started) * 1e3,
                 said, f" [{detail}]" if detail else "")

    async def _rank(self, req: RerankRequest, plan: ChunkPlan, timings: Timings,
                    deadline: float | None) -> RerankResult:
        """Embeddings and windows through Triton: one pe_llm call per window, any ready Triton each time.

        Cancellation (the client left) cancels this coroutine, and with it the Triton call in
        flight, which makes pe_llm drop the window at its next step; later windows are never sent.
        """
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        client = self.pool.acquire()
        embedder = WindowEmbeddings(TritonEncoder(client), self.config.embedding_mode, self.cache,
                                    batch=self.repo.max_batch or 64)
        reranker = Reranker(embedder, TritonWindowBackend(client, deadline), self.repo.prompts)
        return await asyncio.wait_for(reranker.rerank(req, timings, plan), timeout)


_DEADLINE_SLACK_S = 0.05  # gRPC's deadline timer may fire a little before our clock says so


class RankerService(pb_grpc.RankerServicer):
    """pe_rank.v1 over gRPC: proto in, :meth:`RankingService.rank`, proto out."""

    def __init__(self, ranking: RankingService) -> None:
        self.ranking = ranking

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        request_id = self.ranking.new_request_id()
        try:
            result = await self.ranking.rank(lambda: request_from_proto(request), grpc_deadline(context), request_id)
        except ServiceError as exc:
            await grpc_abort(context, exc, request_id)
        return response_to_proto(result, request_id)

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        info, c = self.ranking.repo.info, self.ranking.config
        llm_cfg = info.config
        enc = self.ranking.repo.encoder_config
        return pb.ModelInfo(
            llm=f"{llm_cfg.get('model_type')} (hidden {info.hidden_size}, {llm_cfg.get('num_hidden_layers')} layers, "
                f"vocab {llm_cfg.get('vocab_size')})",
            encoder=f"{enc.get('model_type')} (hidden {info.embedding_size}, {info.pooling} pooling, "
                    f"{info.projector_type} projector)",
            hidden_size=info.hidden_size, embedding_size=info.embedding_size,
            triton_models=list(REQUIRED_MODELS),
            default_window_size=20, default_stride=10, max_passages=c.max_passages,
            max_window_size=c.limits.max_window_size, max_encoder_tokens=ENCODER_MAX_TOKENS,
            max_concurrent_requests=c.max_concurrent, embedding_mode=c.embedding_mode, cache_size=c.cache_size,
            max_query_chars=c.limits.max_query_chars, max_message_bytes=c.max_message_mb << 20, min_window_size=2,
            max_queued_requests=c.max_queued, max_queue_wait_ms=round(c.max_queue_wait_s * 1e3),
            max_request_ms=round(c.max_request_s * 1e3), max_text_bytes=c.limits.max_text_bytes,
            default_prerank=info.defaults.prerank, default_depth=info.defaults.depth,
            default_max_chunks_per_doc=c.max_chunks_per_doc, max_chunks=c.limits.max_chunks,
            chunk_tokens=self.ranking.repo.chunker.chunk_tokens,
        )
