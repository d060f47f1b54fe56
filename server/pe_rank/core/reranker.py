"""Request in, ranking out: the pre-rank (if asked), embeddings (query-independent), then the decoding loop."""
from __future__ import annotations

import time
from typing import Protocol, Sequence

import numpy as np

from .chunking import ChunkPlan
from .prerank import cosine_order, reranked_count
from .prompt import PromptBuilder
from .ranker import WindowBackend, WindowSource, rank_passages
from .types import Passage, RankedPassage, RankOptions, RerankRequest, RerankResult, Timings


class Embedder(Protocol):
    """Where a request's embeddings come from (a window source may count cache hits)."""

    async def prepare(self, passages: Sequence[Passage]) -> WindowSource: ...

    async def vectors(self, passages: Sequence[Passage]) -> np.ndarray: ...

    async def query_vector(self, query: str) -> np.ndarray: ...


class Reranker:
    def __init__(self, embedder: Embedder, backend: WindowBackend, prompts: PromptBuilder) -> None:
        self.embedder = embedder
        self.backend = backend
        self.prompts = prompts

    async def rerank(self, request: RerankRequest, timings: Timings | None = None,
                     plan: ChunkPlan | None = None) -> RerankResult:
        """Rank a request that has already been validated (its defaults applied).

        ``plan`` (core/chunking.py) says which passages are ranked as chunks; the pre-rank and PE-Rank
        rank what the plan ranks (chunks of a split passage, the others whole), and a passage's place
        is its best chunk's. With ``prerank`` they are first ordered by the encoder's cosine; PE-Rank
        then reorders the top ``depth`` of that order (0: all) and the rest keep it.
        """
        timings = timings if timings is not None else Timings()
        plan = plan if plan is not None else ChunkPlan.unchanged(request)
        ranked_request = plan.ranked
        t0 = time.perf_counter()
        n = len(ranked_request.passages)
        order = await self._prerank(ranked_request) if request.prerank else list(range(n))
        head = order[: reranked_count(n, request.depth)]
        source = await self.embedder.prepare([ranked_request.passages[i] for i in head])
        timings.encode_ms += (time.perf_counter() - t0) * 1e3
        options = RankOptions(request.window_size, request.stride, request.mode, plan.chunk_top_n())
        local, stats = await rank_passages(self.backend, self.prompts, request.query, len(head), source, options,
                                           timings)
        timings.rank_ms += (time.perf_counter() - t0) * 1e3 - timings.encode_ms
        passages, chunks = plan.fold([head[i] for i in local] + order[len(head):])
        return RerankResult(ranking=ranked(request, passages, chunks), stats=stats, timings=timings,
                            cache_hits=getattr(source, "cache_hits", 0), chunking=plan.stats,
                            prerank=bool(request.prerank), depth=len(head))

    async def _prerank(self, request: RerankRequest) -> list[int]:
        vectors = await self.embedder.vectors(request.passages)
        return cosine_order(await self.embedder.query_vector(request.query), vectors)


def ranked(request: RerankRequest, order: list[int], chunks: list[int] | None = None) -> list[RankedPassage]:
    """The response's ranking: the first top_n of ``order``, score 1 / rank (and each passage's best chunk)."""
    keep = order[: request.top_n] if request.top_n else order
    return [
        RankedPassage(index=i, id=request.passages[i].id, score=1.0 / (rank + 1),
                      text=request.passages[i].text if request.return_text else None,
                      chunk=chunks[rank] if chunks else 0)
        for rank, i in enumerate(keep)
    ]
