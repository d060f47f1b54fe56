"""Ranking in this process: the encoder, projector and decode engine of a loaded checkpoint.

The one in-process path of the CLI (``pe-rank rerank --model``), ``pe-rank eval --model`` and
``pe-rank bench``: :class:`InProcessRanker` validates a request once and ranks it, PE-Rank's
modes through the shared :class:`~pe_rank.core.reranker.Reranker`, mode ``text`` through the
text-listwise baseline.
"""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from ..core.chunking import ChunkPlan, Chunker
from ..core.embeddings import WindowEmbeddings
from ..core.prerank import with_defaults
from ..core.reranker import Reranker, ranked
from ..core.types import ENCODER_MAX_TOKENS, Mode, RankOptions, RerankRequest, RerankResult, Timings
from ..core.validation import validate_request
from .engine import DecodeEngine, EngineBackend, EngineLimits
from .model import PeRankModel, load_model
from .steps import TorchStepper
from .text_listwise import rank_text_listwise


# one process ranks a few requests at once: 8 slots (the demo's pool: ~380 MB of float32 keys/values)
IN_PROCESS_LIMITS = EngineLimits(max_live=8)


class TorchEncoder:
    """:class:`~pe_rank.core.embeddings.Encoder` on the model in this process."""

    def __init__(self, model: PeRankModel) -> None:
        self.model = model

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        encoded = self.model.encode(texts)
        return self.model.project(encoded), encoded

    async def project(self, vectors: np.ndarray) -> np.ndarray:
        return self.model.project(vectors)


def stepper_for(model: PeRankModel) -> TorchStepper:
    return TorchStepper(model.llm, model.prompts, model.dtype, model.device)


def engine_for(model: PeRankModel) -> DecodeEngine:
    """One engine per model: concurrent in-process requests share its batched decode steps."""
    if model.engine is None:
        model.engine = DecodeEngine(stepper_for(model), limits=IN_PROCESS_LIMITS)
    return model.engine


def in_process_reranker(model: PeRankModel, embedding_mode: str = "exact") -> Reranker:
    """``exact`` is bit-faithful to the reference; ``cached`` encodes each passage once."""
    return Reranker(WindowEmbeddings(TorchEncoder(model), embedding_mode), EngineBackend(engine_for(model)),
                    model.prompts)


class InProcessRanker:
    """A loaded checkpoint that ranks validated requests (every mode, the baseline's ``text`` too)."""

    def __init__(self, model: PeRankModel, embedding_mode: str = "exact") -> None:
        self.model = model
        self.reranker = in_process_reranker(model, embedding_mode)
        # long passages as chunks, planned on the encoder's own tokenizer (as the server does)
        self.chunker = Chunker(model.encoder_tokenizer.backend_tokenizer)

    def validate(self, request: RerankRequest) -> ChunkPlan:
        """Apply the model's defaults, validate once, then plan the chunks of long passages (mode ``text``
        reads texts whole); the plan holds the request as it will be ranked."""
        request = with_defaults(request, self.model.info.defaults)
        validate_request(request, self.model.embedding_size, token_counts=self.model.passage_token_counts,
                         max_tokens=ENCODER_MAX_TOKENS, allow_text=True, prompts=self.model.prompts)
        if request.mode is Mode.TEXT:
            return ChunkPlan.unchanged(request)
        return self.chunker.plan(request)

    def rank_sync(self, request: RerankRequest) -> RerankResult:
        """Validate, then rank on a new event loop (a refused request never starts one)."""
        return asyncio.run(self.rank(request, plan=self.validate(request)))

    async def rank(self, request: RerankRequest, plan: ChunkPlan | None = None) -> RerankResult:
        """Validate and plan (unless ``plan`` is given), then rank; ``timings.total_ms`` is the whole call."""
        t0 = time.perf_counter()
        if plan is None:
            plan = self.validate(request)
        request = plan.request
        if request.mode is Mode.TEXT:
            result = await self._rank_text(request)
        else:
            result = await self.reranker.rerank(request, plan=plan)
        result.timings.total_ms = (time.perf_counter() - t0) * 1e3
        return result

    async def _rank_text(self, request: RerankRequest) -> RerankResult:
        """The text-listwise baseline: same result type, decode_steps = generated tokens."""
        timings = Timings()
        t0 = time.perf_counter()
        options = RankOptions(request.window_size, request.stride, request.mode, request.top_n or None)
        order, stats = await rank_text_listwise(self.model, request.query, [p.text for p in request.passages],
                                                options, timings)
        timings.rank_ms = (time.perf_counter() - t0) * 1e3
        return RerankResult(ranking=ranked(request, order), stats=stats, timings=timings)


def load_in_process(folder: Path | str, dtype: str = "float32", device: str = "cpu",
                    embedding_mode: str = "exact") -> tuple[PeRankModel, Reranker]:
    model = load_model(folder, dtype=dtype, device=device)
    return model, in_process_reranker(model, embedding_mode)


def load_ranker(folder: Path | str, dtype: str = "float32", device: str = "cpu") -> InProcessRanker:
    return InProcessRanker(load_model(folder, dtype=dtype, device=device))
