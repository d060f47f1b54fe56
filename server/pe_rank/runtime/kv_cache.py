"""A window's own KV cache that neither allocates nor copies per step (the reference path).

transformers' ``DynamicLayer`` appends each step's key/value with ``torch.cat``: a fresh
tensor the size of the whole cache, every step, in every layer. Here a window's cache is
reserved once for the window's whole decode (prompt + n passages) and written in place.
Measured on the 2-core CPU VM (demo, windows of 20): one step 50 -> 48 ms with the reserved
cache (bench/results/20261125-155400-vm-steps-kv-cache.md). The engine's windows live in the
static pool of :mod:`~pe_rank.runtime.pool` instead.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class ReservedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values live in a buffer reserved up front.

    ``update`` writes the new states in place; ``keys``/``values`` are views of the filled
    part, so everything that reads a ``DynamicLayer`` (sequence length, masks) sees the same
    shapes and values. The buffer grows (doubling) if a caller goes past the reservation.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._buffers = (self._reserve(key_states, self.capacity), self._reserve(value_states, self.capacity))
        self.keys, self.values = (buffer[:, :, :0] for buffer in self._buffers)
        self.is_initialized = True

    @staticmethod
    def _reserve(like: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, _, dim = like.shape
        return like.new_empty((batch, heads, max(capacity, like.shape[-2]), dim))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()  # keys/values are views of the filled part (crop shortens them)
        end = start + key_states.shape[-2]
        if end > self._buffers[0].shape[-2]:
            self._grow(start, end)
        keys, values = self._buffers
        keys[:, :, start:end] = key_states
        values[:, :, start:end] = value_states
        self.keys, self.values = keys[:, :, :end], values[:, :, :end]
        return self.keys, self.values

    def _grow(self, filled: int, needed: int) -> None:
        capacity = max(needed, 2 * self._buffers[0].shape[-2])
        grown = []
        for old in self._buffers:
            new = self._reserve(old, capacity)
            new[:, :, :filled] = old[:, :, :filled]
            grown.append(new)
        self._buffers = tuple(grown)


def reserved_cache(layers: int, capacity: int) -> Cache:
    """A cache of ``layers`` ``ReservedLayer``s holding up to ``capacity`` tokens without reallocating."""
    return Cache(layers=[ReservedLayer(capacity) for _ in range(layers)])
