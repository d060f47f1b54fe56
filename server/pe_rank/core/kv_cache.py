"""KV caches for decode steps that allocate nothing per step.

transformers' ``DynamicLayer`` appends each step's key/value with ``torch.cat``: a fresh
tensor the size of the whole cache, every step, in every layer, and ``step_many`` used to
zero-fill a new padded batch cache per call. Here a window's cache is reserved once for the
window's whole decode (prompt + n passages) and written in place, and batched steps borrow
a workspace that lives as long as the stepper. Measured on the 2-core CPU VM (demo, 8 windows
of 20): one step 50 -> 48 ms, a batch of 8 steps 128 -> 103 ms
(bench/results/20261125-155400-vm-steps-kv-cache.md).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer, StaticLayer


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


class _BorrowedStaticLayer(StaticLayer):
    """A ``StaticLayer`` over caller-owned buffers already holding ``filled`` columns (no allocation)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, filled: int) -> None:
        super().__init__(max_cache_len=keys.shape[-2])
        self.device = keys.device
        self.batch_size, self.num_heads = keys.shape[:2]
        self.k_head_dim, self.v_head_dim = keys.shape[-1], values.shape[-1]
        self.keys, self.values = keys, values
        self.cumulative_length = torch.tensor(filled, device=keys.device)
        self.is_initialized = True


class BatchWorkspace:
    """Left-padded batch caches for ``step_many``, reused from call to call (grown when too small).

    Not thread-safe: one stepper runs one batch at a time (pe_llm's execute, the ranker's loop).
    """

    def __init__(self) -> None:
        self._buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def layers(self, caches: list[Cache], lengths: list[int]) -> list[StaticLayer]:
        """Per decoder layer, a [B, heads, longest + 1, dim] cache: zeros, then each window's keys and
        values right-aligned at column ``longest``, where the forward writes the new token."""
        longest = max(lengths)
        out = []
        for i, first in enumerate(caches[0].layers):
            keys, values = self._buffer(i, first.keys, first.values, len(caches), longest + 1)
            for b, (cache, length) in enumerate(zip(caches, lengths)):
                own = cache.layers[i]
                keys[b, :, : longest - length].zero_()
                values[b, :, : longest - length].zero_()
                keys[b, :, longest - length : longest] = own.keys[0]
                values[b, :, longest - length : longest] = own.values[0]
            out.append(_BorrowedStaticLayer(keys, values, filled=longest))
        return out

    def _buffer(self, i: int, keys: torch.Tensor, values: torch.Tensor, batch: int, length: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if i == len(self._buffers):
            self._buffers.append(None)
        held = self._buffers[i]
        if held is None or held[0].shape[0] < batch or held[0].shape[2] < length or held[0].dtype != keys.dtype \
                or held[0].device != keys.device:
            if held is not None:  # grow to cover both the old and the new shape
                batch_cap, length_cap = max(batch, held[0].shape[0]), max(length, held[0].shape[2])
            else:
                batch_cap, length_cap = batch, length
            held = (keys.new_empty((batch_cap, keys.shape[1], length_cap, keys.shape[-1])),
                    values.new_empty((batch_cap, values.shape[1], length_cap, values.shape[-1])))
            self._buffers[i] = held
        k, v = held
        return k[:batch, :, :length], v[:batch, :, :length]
