"""Request in, ranking out: embeddings first (query-independent), then the decoding loop."""
from __future__ import annotations

import time
from typing import Protocol, Sequence

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

    async def rerank(self, request: RerankRequest, timings: Timings | None = None) -> RerankResult:
        """Rank a request that has already been validated."""
        timings = timings if timings is not None else Timings()
        t0 = time.perf_counter()
        source = await self.embedder.prepare(request.passages)
        timings.encode_ms += (time.perf_counter() - t0) * 1e3
        options = RankOptions(request.window_size, request.stride, request.mode, request.top_n or None)
        n = len(request.passages)
        order, stats = await rank_passages(self.backend, self.prompts, request.query, n, source, options, timings)
        timings.rank_ms += (time.perf_counter() - t0) * 1e3 - timings.encode_ms
        return RerankResult(ranking=ranked(request, order), stats=stats, timings=timings,
                            cache_hits=getattr(source, "cache_hits", 0))


def ranked(request: RerankRequest, order: list[int]) -> list[RankedPassage]:
    """The response's ranking: the first top_n of ``order``, score 1 / rank."""
    keep = order[: request.top_n] if request.top_n else order
    return [
        RankedPassage(index=i, id=request.passages[i].id, score=1.0 / (rank + 1),
                      text=request.passages[i].text if request.return_text else None)
        for rank, i in enumerate(keep)
    ]
