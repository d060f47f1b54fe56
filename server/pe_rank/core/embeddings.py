"""A request's projected passage embeddings, window by window: one policy over three encoders.

Where vectors come from differs by process (:class:`Encoder`): PyTorch in this process
(:mod:`pe_rank.runtime.inprocess`), Triton's pe_embed / pe_projector over gRPC (the server,
:mod:`pe_rank.service.triton_client`), or the same models through BLS inside Triton
(:mod:`pe_rank.triton_backend.bls`). How they are used is written once, here:

``exact`` (default): each window's passages are encoded together, as the reference did, so
rankings match it bit for bit (padding to the window's longest text changes float bits); the
cache key is the window's encoder input. ``cached``: each passage is encoded once per request,
in batches, and cached on its own text; cheaper, and rankings differ from the reference only at
float-noise near-ties. Caller-given encoder embeddings are merged with the encoded rows and
projected together.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Protocol, Sequence

import numpy as np

from .types import Passage

EMBEDDING_MODES = ("exact", "cached")
_VECTOR = b"v"  # cache keys of encoder vectors (the pre-rank's), apart from projected rows


class Encoder(Protocol):
    """Encoder and projector calls; each call is one batch (its texts padded together)."""

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(projected [n, H], encoder embeddings [n, E]) of texts encoded together."""
        ...

    async def project(self, vectors: np.ndarray) -> np.ndarray:
        """Projected [n, H] of encoder embeddings [n, E]."""
        ...


def encoder_input_key(texts: list[str]) -> bytes:
    """The encoder's input for a batch is its texts in order (padding follows from them)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


class EmbeddingCache:
    """LRU of projected embeddings, bounded by entries; size 0 disables it. One event loop, no lock."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def get(self, key: bytes) -> np.ndarray | None:
        if self.size <= 0 or key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: bytes, value: np.ndarray) -> None:
        if self.size <= 0:
            return
        value = np.array(value, copy=True)
        value.setflags(write=False)
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


async def merged_vectors(encoder: Encoder, passages: Sequence[Passage]) -> np.ndarray:
    """Encoder embeddings [n, E]: the caller's where given, the encoder's (in one batch) for the rest."""
    size = next(len(p.embedding) for p in passages if p.embedding is not None)
    vectors = np.zeros((len(passages), size), dtype=np.float32)
    text_rows = [k for k, p in enumerate(passages) if p.embedding is None]
    if text_rows:
        _, encoded = await encoder.embed([passages[k].text for k in text_rows])
        vectors[text_rows] = encoded
    for k, p in enumerate(passages):
        if p.embedding is not None:
            vectors[k] = np.asarray(p.embedding, dtype=np.float32)
    return vectors


class ExactWindows:
    """The ``exact`` policy: each window's passages encoded together, cached per window input."""

    def __init__(self, encoder: Encoder, passages: Sequence[Passage], cache: EmbeddingCache) -> None:
        self.encoder, self.passages, self.cache = encoder, passages, cache
        self.cache_hits = 0

    async def window(self, indices: list[int]) -> np.ndarray:
        chosen = [self.passages[i] for i in indices]
        if any(p.embedding is not None for p in chosen):
            return await self.encoder.project(await merged_vectors(self.encoder, chosen))
        key = encoder_input_key([p.text for p in chosen])
        cached = self.cache.get(key)
        if cached is not None:
            self.cache_hits += len(chosen)
            return cached
        projected, _ = await self.encoder.embed([p.text for p in chosen])
        self.cache.put(key, projected)
        return projected


class RowWindows:
    """The ``cached`` policy's result: every passage's row, computed once per request."""

    def __init__(self, rows: np.ndarray, cache_hits: int = 0) -> None:
        self.rows = rows
        self.cache_hits = cache_hits

    async def window(self, indices: list[int]) -> np.ndarray:
        return self.rows[indices]


class WindowEmbeddings:
    """The embedder of :class:`~pe_rank.core.reranker.Reranker`: ``prepare`` gives a request's window source."""

    def __init__(self, encoder: Encoder, mode: str = "exact", cache: EmbeddingCache | None = None,
                 batch: int = 64) -> None:
        if mode not in EMBEDDING_MODES:
            raise ValueError(f"embedding mode {mode!r} not in {EMBEDDING_MODES}")
        self.encoder, self.mode, self.batch = encoder, mode, batch
        self.cache = cache if cache is not None else EmbeddingCache(0)

    async def prepare(self, passages: Sequence[Passage]) -> ExactWindows | RowWindows:
        if self.mode == "exact":
            return ExactWindows(self.encoder, passages, self.cache)
        return await self._rows(passages)

    async def vectors(self, passages: Sequence[Passage]) -> np.ndarray:
        """Encoder embeddings [n, E] of every passage (the caller's where given): the pre-rank's.

        Cached per passage text; the misses are encoded in batches, and their projected rows fill
        the ``cached`` mode's per-passage cache from the same call.
        """
        rows: list[np.ndarray | None] = [None if p.embedding is None else np.asarray(p.embedding, np.float32)
                                         for p in passages]
        missing = []
        for i, p in enumerate(passages):
            if p.embedding is None:
                rows[i] = self.cache.get(_VECTOR + encoder_input_key([p.text]))
                if rows[i] is None:
                    missing.append(i)
        for chunk in _chunks(missing, self.batch):
            projected, encoded = await self.encoder.embed([passages[i].text for i in chunk])
            for i, vector, row in zip(chunk, encoded, projected):
                rows[i] = vector
                self.cache.put(_VECTOR + encoder_input_key([passages[i].text]), vector)
                if self.mode == "cached":
                    self.cache.put(encoder_input_key([passages[i].text]), row)
        return np.stack(rows)

    async def query_vector(self, query: str) -> np.ndarray:
        """The query's encoder embedding [E], encoded (and cached) as a passage is."""
        return (await self.vectors([Passage(id="query", text=query)]))[0]

    async def _rows(self, passages: Sequence[Passage]) -> RowWindows:
        rows: list[np.ndarray | None] = [None] * len(passages)
        missing = []
        for i, p in enumerate(passages):
            if p.embedding is None:
                rows[i] = self.cache.get(encoder_input_key([p.text]))
                if rows[i] is None:
                    missing.append(i)
        hits = sum(p.embedding is None for p in passages) - len(missing)
        for chunk in _chunks(missing, self.batch):
            projected, _ = await self.encoder.embed([passages[i].text for i in chunk])
            for i, row in zip(chunk, projected):
                rows[i] = row
                self.cache.put(encoder_input_key([passages[i].text]), row)
        given = [i for i, p in enumerate(passages) if p.embedding is not None]
        for chunk in _chunks(given, self.batch):
            vectors = np.stack([np.asarray(passages[i].embedding, np.float32) for i in chunk])
            for i, row in zip(chunk, await self.encoder.project(vectors)):
                rows[i] = row
        return RowWindows(np.stack(rows), hits)


def _chunks(items: list[int], size: int) -> list[list[int]]:
    return [items[k : k + size] for k in range(0, len(items), size)]
