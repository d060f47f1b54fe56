"""KV caches for decode steps that neither allocate nor copy per step.

transformers' ``DynamicLayer`` appends each step's key/value with ``torch.cat``: a fresh
tensor the size of the whole cache, every step, in every layer. Here a window's cache is
reserved once for the window's whole decode (prompt + n passages) and written in place.
Batched steps (``step_many``) keep each window's cache where it is: the new keys/values go
into each window's own buffer and attention runs per window (:class:`WindowCaches`,
:func:`window_attention`), so windows of different lengths need no padded batch copy.
Measured on the 2-core CPU VM (demo, windows of 20): one step 50 -> 48 ms with the reserved
cache (bench/results/20261125-155400-vm-steps-kv-cache.md); a batch of 8 steps 93 -> 77 ms
without the padded copy (bench/results/20261125-181849-vm-steps-window-attention.md).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward


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


class PerWindow:
    """One tensor per window, passed through transformers' attention call in place of a batch tensor.

    Windows of a batched step have caches of different lengths, so their keys/values cannot be
    one tensor without padding them into a copy; :func:`window_attention` takes them as they are.
    """

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors


class WindowCaches:
    """The ``cache`` of a batched step: row ``b`` of each layer's new key/value is written into
    window ``b``'s own reserved cache, in place, and attention reads each window's cache as is.

    Only what LlamaModel/MistralModel call on a cache when given ``position_ids`` and a ready 4D
    mask is here: ``update``. A failed forward may have written some layers; ``rollback``
    crops every window back to the length it had before.
    """

    def __init__(self, caches: list[Cache], lengths: list[int]) -> None:
        self.caches = caches
        self.lengths = lengths

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[PerWindow, PerWindow]:
        keys, values = [], []
        for b, cache in enumerate(self.caches):
            k, v = cache.layers[layer_idx].update(key_states[b : b + 1], value_states[b : b + 1])
            keys.append(k)
            values.append(v)
        return PerWindow(keys), PerWindow(values)

    def rollback(self) -> None:
        for cache, length in zip(self.caches, self.lengths):
            for layer in cache.layers:
                extra = layer.get_seq_length() - length
                if extra > 0:
                    layer.crop(-extra)

    @staticmethod
    def ignored_mask(batch: int, device: torch.device) -> torch.Tensor:
        """A 4D mask transformers passes through untouched (no mask is built from this cache);
        :func:`window_attention` ignores it: each window attends to all of its own cache."""
        return torch.zeros(batch, 1, 1, 1, device=device)


ATTENTION = "pe_rank_sdpa"


def window_attention(module: torch.nn.Module, query: torch.Tensor, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention, once per window when the keys are :class:`PerWindow`.

    Everything else (prefill, single steps, training) goes to ``sdpa_attention_forward``
    unchanged, so those paths are bit-identical to ``attn_implementation="sdpa"``. Each
    window's attention is exactly the call a single step makes (same kernel, no mask, its own
    keys), so a batched step differs from single steps only in the batched matrix products.
    """
    if not isinstance(key, PerWindow):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    rows = [sdpa_attention_forward(module, query[b : b + 1], k, v, None, **kwargs)[0]
            for b, (k, v) in enumerate(zip(key.tensors, value.tensors))]
    return torch.cat(rows), None


def register_attention() -> str:
    """Register :func:`window_attention` (and SDPA's mask builder) under :data:`ATTENTION`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, window_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION
