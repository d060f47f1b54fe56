"""Passage embeddings for the server, through Triton, with the LRU cache.

``exact`` (default): each window's passages are embedded together, as the reference did,
so rankings match it bit for bit; the cache key is the window's encoder input.
``cached``: each passage is embedded once per request (in batches) and cached on its own
text; cheaper, and rankings differ from the reference only at float-noise near-ties.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.types import Passage
from .triton_client import embed_texts, project
from .cache import EmbeddingCache, encoder_input_key

EMBEDDING_MODES = ("exact", "cached")


class ExactWindowSource:
    def __init__(self, client, passages: Sequence[Passage], cache: EmbeddingCache) -> None:
        self.client, self.passages, self.cache = client, passages, cache
        self.cache_hits = 0

    async def window(self, indices: list[int]) -> np.ndarray:
        chosen = [self.passages[i] for i in indices]
        if all(p.embedding is None for p in chosen):
            key = encoder_input_key([p.text for p in chosen])
            cached = self.cache.get(key)
            if cached is not None:
                self.cache_hits += len(chosen)
                return cached
            projected, _ = await embed_texts(self.client, [p.text for p in chosen])
            self.cache.put(key, projected)
            return projected
        return await project(self.client, await _encoder_vectors(self.client, chosen))


async def _encoder_vectors(client, passages: Sequence[Passage]) -> np.ndarray:
    """Encoder embeddings [n, E]: the caller's where given, pe_embed's for the rest."""
    size = next(len(p.embedding) for p in passages if p.embedding is not None)
    vectors = np.zeros((len(passages), size), dtype=np.float32)
    text_rows = [k for k, p in enumerate(passages) if p.embedding is None]
    if text_rows:
        _, encoded = await embed_texts(client, [passages[k].text for k in text_rows])
        vectors[text_rows] = encoded
    for k, p in enumerate(passages):
        if p.embedding is not None:
            vectors[k] = p.embedding
    return vectors


class CachedSource:
    def __init__(self, rows: np.ndarray, cache_hits: int) -> None:
        self.rows = rows
        self.cache_hits = cache_hits

    async def window(self, indices: list[int]) -> np.ndarray:
        return self.rows[indices]


class TritonEmbedder:
    def __init__(self, client, cache: EmbeddingCache, mode: str = "exact", batch: int = 64) -> None:
        if mode not in EMBEDDING_MODES:
            raise ValueError(f"embedding mode {mode!r} not in {EMBEDDING_MODES}")
        self.client, self.cache, self.mode, self.batch = client, cache, mode, batch

    async def prepare(self, passages: Sequence[Passage]):
        if self.mode == "exact":
            return ExactWindowSource(self.client, passages, self.cache)
        return await self._cached_source(passages)

    async def _cached_source(self, passages: Sequence[Passage]) -> CachedSource:
        hits = 0
        rows: list[np.ndarray | None] = [None] * len(passages)
        missing = []
        for i, p in enumerate(passages):
            if p.embedding is not None:
                continue
            hit = self.cache.get(encoder_input_key([p.text]))
            if hit is None:
                missing.append(i)
            else:
                rows[i] = hit
                hits += 1
        for start in range(0, len(missing), self.batch):
            chunk = missing[start : start + self.batch]
            projected, _ = await embed_texts(self.client, [passages[i].text for i in chunk])
            for i, row in zip(chunk, projected):
                rows[i] = row
                self.cache.put(encoder_input_key([passages[i].text]), row)
        given = [i for i, p in enumerate(passages) if p.embedding is not None]
        if given:
            vectors = np.stack([np.asarray(passages[i].embedding, np.float32) for i in given])
            for start in range(0, len(given), self.batch):
                chunk = given[start : start + self.batch]
                for i, row in zip(chunk, await project(self.client, vectors[start : start + self.batch])):
                    rows[i] = row
        return CachedSource(np.stack(rows), hits)
