"""Request in, ranking out: the pre-rank (if asked), embeddings (query-independent), then the decoding loop."""
from __future__ import annotations

import time
from typing import Protocol, Sequence

import numpy as np

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

    async def rerank(self, request: RerankRequest, timings: Timings | None = None) -> RerankResult:
        """Rank a request that has already been validated (its defaults applied).

        With ``prerank`` the candidates are first ordered by the encoder's cosine; PE-Rank then
        reorders the top ``depth`` of that order (0: all) and the rest keep it.
        """
        timings = timings if timings is not None else Timings()
        t0 = time.perf_counter()
        order = await self._prerank(request) if request.prerank else list(range(len(request.passages)))
        head = order[: reranked_count(len(order), request.depth)]
        source = await self.embedder.prepare([request.passages[i] for i in head])
        timings.encode_ms += (time.perf_counter() - t0) * 1e3
        options = RankOptions(request.window_size, request.stride, request.mode, request.top_n or None)
        local, stats = await rank_passages(self.backend, self.prompts, request.query, len(head), source, options,
                                           timings)
        timings.rank_ms += (time.perf_counter() - t0) * 1e3 - timings.encode_ms
        return RerankResult(ranking=ranked(request, [head[i] for i in local] + order[len(head):]), stats=stats,
                            timings=timings, cache_hits=getattr(source, "cache_hits", 0),
                            prerank=bool(request.prerank), depth=len(head))

    async def _prerank(self, request: RerankRequest) -> list[int]:
        vectors = await self.embedder.vectors(request.passages)
        return cosine_order(await self.embedder.query_vector(request.query), vectors)


def ranked(request: RerankRequest, order: list[int]) -> list[RankedPassage]:
    """The response's ranking: the first top_n of ``order``, score 1 / rank."""
    keep = order[: request.top_n] if request.top_n else order
    return [
        RankedPassage(index=i, id=request.passages[i].id, score=1.0 / (rank + 1),
                      text=request.passages[i].text if request.return_text else None)
        for rank, i in enumerate(keep)
    ]
