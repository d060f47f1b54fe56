"""The gRPC ranking service: validate once at the edge, rank through Triton, answer."""
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

import grpc

from ..core.checkpoint import read_checkpoint_info
from ..core.model import ENCODER_MAX_TOKENS
from ..core.prompt import PromptBuilder
from ..core.reranker import Reranker
from ..core.tokenization import load_prompt_tokenizer
from ..core.types import Timings
from ..core.validation import InvalidRequest, Limits, validate_request
from ..triton.remote import TritonStepBackend
from ..v1 import ranker_pb2 as pb
from ..v1 import ranker_pb2_grpc as pb_grpc
from .cache import EmbeddingCache
from .convert import request_from_proto, response_to_proto
from .embedder import TritonEmbedder
from .metrics import Metrics
from .pool import REQUIRED_MODELS, NoTritonAvailable, TritonPool

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


def _triton_status(exc: Exception) -> grpc.StatusCode | None:
    """The gRPC status a tritonclient error carries, if any."""
    status = str(getattr(exc, "status", lambda: "")() or "")
    for code in grpc.StatusCode:
        if status.endswith(code.name):
            return code
    return None


class RankerService(pb_grpc.RankerServicer):
    def __init__(self, config: ServiceConfig, repo: RepositoryView, pool: TritonPool, metrics: Metrics) -> None:
        self.config, self.repo, self.pool, self.metrics = config, repo, pool, metrics
        if repo.max_batch and repo.max_batch < config.limits.max_window_size:
            log.warning("windows capped at %d passages: the repository's max batch size", repo.max_batch)
            config.limits = dataclasses.replace(config.limits, max_window_size=repo.max_batch)
        self.cache = EmbeddingCache(config.cache_size)
        self.in_flight = 0

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        request_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        code, message = grpc.StatusCode.OK, ""
        if self.in_flight >= self.config.max_concurrent:
            self.metrics.requests.labels(grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {self.config.max_concurrent} requests in flight; retry later")
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            response = await self._rerank(request, context, request_id, started)
            return response
        except InvalidRequest as exc:
            code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        except asyncio.TimeoutError:
            code, message = grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded while ranking"
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except NoTritonAvailable as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, str(exc)
        except _TritonFailure as exc:
            code, message = exc.code, exc.message
        except Exception as exc:  # a bug or an unexpected model failure: never crash the server
            log.exception("request %s failed", request_id)
            code, message = grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}"
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(code.name).inc()
            log.info("request %s %s in %.1f ms%s", request_id, code.name, (time.perf_counter() - started) * 1e3,
                     f": {message}" if message else "")
        await context.abort(code, f"{message} (request {request_id})")
        raise AssertionError("unreachable")  # context.abort raises

    async def _rerank(self, request, context, request_id: str, started: float) -> pb.RerankResponse:
        req = request_from_proto(request)
        validate_request(req, self.repo.info.embedding_size, self.config.limits,
                         token_counts=self.repo.token_counts, max_tokens=ENCODER_MAX_TOKENS)
        self.metrics.passages.inc(len(req.passages))
        queue_ms = (time.perf_counter() - started) * 1e3
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        while True:
            try:
                result = await self._rank_on_one_server(req, Timings(queue_ms=queue_ms), deadline)
                break
            except _TritonFailure as exc:
                # windows are sequential and all their state lives on one server: a request whose
                # server went away can start again from scratch on another ready one
                if exc.code is not grpc.StatusCode.UNAVAILABLE or not self.pool.serving:
                    raise
                log.warning("request %s: %s; retrying on another Triton", request_id, exc.message)
        result.timings.total_ms = (time.perf_counter() - started) * 1e3
        self.metrics.observe(result)
        return response_to_proto(result, request_id)

    async def _rank_on_one_server(self, req, timings: Timings, deadline: float | None):
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        async with self.pool.acquire() as server:
            embedder = TritonEmbedder(server.client, self.cache, self.config.embedding_mode,
                                      batch=self.repo.max_batch or 64)
            reranker = Reranker(embedder, TritonStepBackend(server.client), self.repo.prompts)
            try:
                return await asyncio.wait_for(reranker.rerank(req, timings), timeout)
            except ValueError as exc:  # e.g. a query holding the placeholder token's text
                raise InvalidRequest("query", str(exc)) from None
            except asyncio.TimeoutError:
                raise
            except Exception as exc:
                raise self._triton_failure(server, exc) from exc

    def _triton_failure(self, server, exc: Exception) -> Exception:
        code = _triton_status(exc)
        if code is None:
            return exc
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
            self.pool.mark_down(server, str(exc)[:200])
            return _TritonFailure(grpc.StatusCode.UNAVAILABLE, f"Triton at {server.url} is unavailable")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return asyncio.TimeoutError()
        return _TritonFailure(grpc.StatusCode.INTERNAL, f"Triton error: {exc}")

    async def GetModelInfo(self, request: pb.ModelInfoRequest, context) -> pb.ModelInfo:
        info, c = self.repo.info, self.config
        llm_cfg = info.config
        enc = self.repo.encoder_config
        return pb.ModelInfo(
            llm=f"{llm_cfg.get('model_type')} (hidden {info.hidden_size}, {llm_cfg.get('num_hidden_layers')} layers, "
                f"vocab {llm_cfg.get('vocab_size')})",
            encoder=f"{enc.get('model_type')} (hidden {info.embedding_size}, {info.pooling} pooling, "
                    f"{info.projector_type} projector)",
            hidden_size=info.hidden_size, embedding_size=info.embedding_size,
            triton_models=list(REQUIRED_MODELS), triton_urls=[s.url for s in self.pool.servers],
            default_window_size=20, default_stride=10, max_passages=c.max_passages,
            max_window_size=c.limits.max_window_size, max_encoder_tokens=ENCODER_MAX_TOKENS,
            max_concurrent_requests=c.max_concurrent, embedding_mode=c.embedding_mode, cache_size=c.cache_size,
            max_query_chars=c.limits.max_query_chars, max_message_bytes=c.max_message_mb << 20, min_window_size=2,
        )


class _TritonFailure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message
