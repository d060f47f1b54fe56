"""Keys/values of the prompt head that every window of the same size shares.

Everything before the query (the chat template's system turn, "I will provide you with 20
passages, ... search query:") is the same for every window of 20 passages: 63 of about 340
prompt tokens with the demo model. Causal attention makes the head's keys/values depend on
the head alone, so they are computed once and copied into each new window's cache, across
requests. A prefill always runs as head, then the rest, whether the head was cached or not,
so a window's scores never depend on what ran before it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np
import torch
from torch import nn
from transformers.cache_utils import Cache

from ..core.prompt import PromptBuilder


class HeadCache:
    """LRU of head keys/values by head ids; ``capacity`` heads (one per window size in use)."""

    def __init__(self, llm: nn.Module, prompts: PromptBuilder, capacity: int = 16) -> None:
        self.llm = llm
        self.prompts = prompts
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()

    def fill(self, cache: Cache, ids: np.ndarray, inputs: torch.Tensor, n: int) -> tuple[int, bool]:
        """Put the head of a window's prompt into its empty ``cache``.

        ``inputs`` are the prompt's input embeddings [T, H]. Returns (the head's length, whether
        its keys/values came from the cache); length 0 means the prompt has no shared head (the
        caller then prefills it whole).
        """
        length = self.prompts.head_length(ids, n) if self.capacity > 0 else 0
        if not length:
            return 0, False
        key = ids[:length].tobytes()
        with self._lock:
            stored = self._entries.get(key)
            if stored is not None:
                self._entries.move_to_end(key)
                self.hits += 1
        if stored is None:
            self.llm(inputs_embeds=inputs[None, :length], cache=cache, use_cache=True)
            self._store(key, [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
        else:
            for layer_idx, (keys, values) in enumerate(stored):
                cache.update(keys, values, layer_idx)
        return length, stored is not None

    def _store(self, key: bytes, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self._lock:
            self.misses += 1
            self._entries[key] = layers
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
