"""Request in, ranking out: embeddings first (query-independent), then the decoding loop."""
from __future__ import annotations

import time
from typing import Protocol, Sequence

from .chunking import ChunkPlan
from .prompt import PromptBuilder
from .ranker import WindowBackend, WindowSource, rank_passages
from .types import Passage, RankedPassage, RankOptions, RerankRequest, RerankResult, Timings


class Embedder(Protocol):
    """Where a request's projected passage embeddings come from (a source may count cache hits)."""

    async def prepare(self, passages: Sequence[Passage]) -> WindowSource: ...


class Reranker:
    def __init__(self, embedder: Embedder, backend: WindowBackend, prompts: PromptBuilder) -> None:
        self.embedder = embedder
        self.backend = backend
        self.prompts = prompts

    async def rerank(self, request: RerankRequest, timings: Timings | None = None,
                     plan: ChunkPlan | None = None) -> RerankResult:
        """Rank a request that has already been validated; ``plan`` (core/chunking.py) says which
        passages are ranked as chunks, and a passage's place is its best chunk's."""
        timings = timings if timings is not None else Timings()
        plan = plan if plan is not None else ChunkPlan.unchanged(request)
        ranked_request = plan.ranked
        t0 = time.perf_counter()
        source = await self.embedder.prepare(ranked_request.passages)
        timings.encode_ms += (time.perf_counter() - t0) * 1e3
        options = RankOptions(request.window_size, request.stride, request.mode, plan.chunk_top_n())
        n = len(ranked_request.passages)
        order, stats = await rank_passages(self.backend, self.prompts, request.query, n, source, options, timings)
        timings.rank_ms += (time.perf_counter() - t0) * 1e3 - timings.encode_ms
        passages, chunks = plan.fold(order)
        return RerankResult(ranking=ranked(request, passages, chunks), stats=stats, timings=timings,
                            cache_hits=getattr(source, "cache_hits", 0), chunking=plan.stats)


def ranked(request: RerankRequest, order: list[int], chunks: list[int] | None = None) -> list[RankedPassage]:
    """The response's ranking: the first top_n of ``order``, score 1 / rank (and each passage's best chunk)."""
    keep = order[: request.top_n] if request.top_n else order
    return [
        RankedPassage(index=i, id=request.passages[i].id, score=1.0 / (rank + 1),
                      text=request.passages[i].text if request.return_text else None,
                      chunk=chunks[rank] if chunks else 0)
        for rank, i in enumerate(keep)
    ]
