"""LRU cache of projected passage embeddings, keyed by a hash of the encoder input."""
from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


def encoder_input_key(texts: list[str]) -> bytes:
    """The encoder's input for a batch is its texts in order (padding follows from them)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.digest()


class EmbeddingCache:
    """Bounded by entries; size 0 disables it. Used from one event loop, so no lock."""

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
