"""The ranking service: validate once at the edge, rank through Triton, answer (every API, one path)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import grpc

from ..core.checkpoint import read_checkpoint_info
from ..core.model import ENCODER_MAX_TOKENS
from ..core.prompt import PromptBuilder
from ..core.reranker import Reranker
from ..core.tokenization import load_prompt_tokenizer
from ..core.types import RerankRequest, RerankResult, Timings
from ..core.validation import InvalidRequest, Limits, RequestTooLarge, validate_request
from ..triton.remote import TritonWindowBackend
from ..v1 import ranker_pb2 as pb
from ..v1 import ranker_pb2_grpc as pb_grpc
from .cache import EmbeddingCache
from .convert import request_from_proto, response_to_proto
from .embedder import TritonEmbedder
from .errors import (Cancelled, DeadlineExceeded, Internal, InvalidArgument, Overloaded, ServiceError, TooLarge,
                     Unavailable, grpc_abort, grpc_deadline, metric_label)
from .metrics import Metrics
from .pool import REQUIRED_MODELS, NoTritonAvailable, TritonPool, triton_status

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
    max_concurrent: int = 64
    cache_size: int = 10_000
    embedding_mode: str = "exact"
    metrics_port: int | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    max_message_mb: int = 64
    grace_s: float = 30.0
    health_poll_s: float = 1.0
    http_port: int | None = None  # TEI and Cohere/Jina HTTP APIs; None: off
    limits: Limits = field(init=False)

    def __post_init__(self) -> None:
        self.limits = Limits(max_passages=self.max_passages, max_window_size=self.max_window_size)


class RepositoryView:
    """What the server reads from the exported repository: tokenizers and sizes."""

    def __init__(self, repository: Path) -> None:
        from transformers import AutoTokenizer

        checkpoint = repository / "pe_llm" / "1" / "checkpoint"
        tokenizer = repository / "pe_tokenizer" / "1" / "tokenizer"
        if not checkpoint.is_dir() or not tokenizer.is_dir():
            raise FileNotFoundError(f"{repository}: not an exported repository (run `pe-rank export` first)")
        self.info = read_checkpoint_info(checkpoint)
        self.prompts = PromptBuilder(load_prompt_tokenizer(checkpoint))
        self.encoder_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.encoder_config = json.loads((self.info.encoder_dir / "config.json").read_text())
        self.max_batch = _max_batch_size(repository / "pe_encoder" / "config.pbtxt")

    def token_counts(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.encoder_tokenizer(texts, truncation=False)["input_ids"]]


def _max_batch_size(config_pbtxt: Path) -> int:
    """A window is one pe_embed request, so windows may not exceed the encoder's max batch."""
    match = re.search(r"^max_batch_size:\s*(\d+)", config_pbtxt.read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


class RankingService:
    """The one ranking path behind every API (pe_rank.v1, tei.v1, TEI and Cohere HTTP).

    :meth:`rank` is transport-independent: admission by --max-concurrent, validation
    (core/validation.py, once), ranking on a ready Triton, metrics and the log line. It raises
    :class:`~.errors.ServiceError`; each API only converts its request in and the answer out.
    """

    def __init__(self, config: ServiceConfig, repo: RepositoryView, pool: TritonPool, metrics: Metrics) -> None:
        self.config, self.repo, self.pool, self.metrics = config, repo, pool, metrics
        if repo.max_batch and repo.max_batch < config.limits.max_window_size:
            log.warning("windows capped at %d passages: the repository's max batch size", repo.max_batch)
            config.limits = dataclasses.replace(config.limits, max_window_size=repo.max_batch)
        self.cache = EmbeddingCache(config.cache_size)
        self.in_flight = 0

    @staticmethod
    def new_request_id() -> str:
        return uuid.uuid4().hex[:16]

    async def rank(self, req: RerankRequest, deadline: float | None, request_id: str, api: str = "pe_rank.v1",
                   field_name: Callable[[str], str] = str) -> RerankResult:
        """Rank one request; ``deadline`` is on time.monotonic()'s clock (None: no deadline).

        ``field_name`` renames validation fields into the API's own (TEI's ``texts[3]`` for
        ``passages[3].text``), so a client reads the name it sent.
        """
        started = time.perf_counter()
        if self.in_flight >= self.config.max_concurrent:
            error = Overloaded(f"more than {self.config.max_concurrent} requests in flight; retry later")
            self.refused(error, request_id, api, started)
            raise error
        self.in_flight += 1
        self.metrics.in_flight.inc()
        error: ServiceError | None = None
        detail = ""
        try:
            return await self._rerank(req, request_id, started, deadline)
        except InvalidRequest as exc:
            kind = TooLarge if isinstance(exc, RequestTooLarge) else InvalidArgument
            error = kind(exc.reason, field=field_name(exc.field))
        except asyncio.TimeoutError:
            error = DeadlineExceeded("deadline exceeded while ranking")
        except asyncio.CancelledError:
            error = Cancelled("cancelled by the client")
            raise
        except NoTritonAvailable as exc:
            error, detail = Unavailable("no model server is ready; retry later"), str(exc)
        except _TritonFailure as exc:
            if exc.code is grpc.StatusCode.UNAVAILABLE:
                error = Unavailable("the model server went away; retry later")
            else:
                error = Internal("the model server failed")
            detail = exc.message
        except Exception as exc:  # a bug or an unexpected model failure: never crash the server
            log.exception("request %s failed", request_id)
            error, detail = Internal("internal error"), f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self._record(error, request_id, api, started, detail)
        raise error

    def refused(self, error: ServiceError, request_id: str, api: str, started: float | None = None) -> None:
        """Count and log a request an API refused before :meth:`rank` (its shape, or no slot)."""
        self._record(error, request_id, api, time.perf_counter() if started is None else started)

    def _record(self, error: ServiceError | None, request_id: str, api: str, started: float, detail: str = "") -> None:
        status = metric_label(error)
        self.metrics.requests.labels(status).inc()
        said = f": {error.text(request_id)}" if error is not None else ""
        log.info("request %s %s %s in %.1f ms%s%s", request_id, api, status, (time.perf_counter() - started) * 1e3,
                 said, f" [{detail}]" if detail else "")

    async def _rerank(self, req: RerankRequest, request_id: str, started: float,
                      deadline: float | None) -> RerankResult:
        validate_request(req, self.repo.info.embedding_size, self.config.limits,
                         token_counts=self.repo.token_counts, max_tokens=ENCODER_MAX_TOKENS,
                         prompts=self.repo.prompts)
        self.metrics.passages.inc(len(req.passages))
        queue_ms = (time.perf_counter() - started) * 1e3
        result = await self._rank(req, Timings(queue_ms=queue_ms), deadline)
        result.timings.total_ms = (time.perf_counter() - started) * 1e3
        self.metrics.observe(result)
        return result

    async def _rank(self, req, timings: Timings, deadline: float | None):
        """Embeddings and windows through Triton: one pe_llm call per window, any ready Triton each time.

        Cancellation (the client left) cancels this coroutine, and with it the Triton call in
        flight, which makes pe_llm drop the window at its next step; later windows are never sent.
        """
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        client = self.pool.acquire()
        embedder = TritonEmbedder(client, self.cache, self.config.embedding_mode, batch=self.repo.max_batch or 64)
        reranker = Reranker(embedder, TritonWindowBackend(client, deadline), self.repo.prompts)
        try:
            return await asyncio.wait_for(reranker.rerank(req, timings), timeout)
        except ValueError as exc:  # e.g. a query holding the placeholder token's text
            raise InvalidRequest("query", str(exc)) from None
        except (asyncio.TimeoutError, TimeoutError):
            raise asyncio.TimeoutError() from None
        except Exception as exc:
            raise self._triton_failure(exc) from exc

    def _triton_failure(self, exc: Exception) -> Exception:
        code = triton_status(exc)
        if code is None:
            return exc
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self.pool.mark_down(str(exc)[:200])
            return _TritonFailure(grpc.StatusCode.UNAVAILABLE, "no Triton could take the request")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return asyncio.TimeoutError()
        return _TritonFailure(grpc.StatusCode.INTERNAL, f"Triton error: {exc}")


class _TritonFailure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


class RankerService(pb_grpc.RankerServicer):
    """pe_rank.v1 over gRPC: proto in, :meth:`RankingService.rank`, proto out."""

    def __init__(self, ranking: RankingService) -> None:
        self.ranking = ranking

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        request_id = self.ranking.new_request_id()
        try:
            try:
                req = request_from_proto(request)
            except InvalidRequest as exc:
                error = InvalidArgument(exc.reason, field=exc.field)
                self.ranking.refused(error, request_id, "pe_rank.v1")
                raise error from None
            result = await self.ranking.rank(req, grpc_deadline(context), request_id)
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
            triton_models=list(REQUIRED_MODELS), triton_urls=[s.url for s in self.ranking.pool.servers],
            default_window_size=20, default_stride=10, max_passages=c.max_passages,
            max_window_size=c.limits.max_window_size, max_encoder_tokens=ENCODER_MAX_TOKENS,
            max_concurrent_requests=c.max_concurrent, embedding_mode=c.embedding_mode, cache_size=c.cache_size,
            max_query_chars=c.limits.max_query_chars, max_message_bytes=c.max_message_mb << 20, min_window_size=2,
        )
