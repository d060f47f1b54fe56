"""The Triton backend of the ranking loop: pe_embed / pe_projector for embeddings, pe_llm for steps.

Every window is its own Triton sequence (a fresh correlation id); the sequence always
ends, on success, error, deadline or cancellation, so no KV cache is left behind.
"""
from __future__ import annotations

import asyncio
import itertools
import os
import random

import numpy as np


LLM_MODEL = "pe_llm"
EMBED_MODEL = "pe_embed"
PROJECTOR_MODEL = "pe_projector"

# correlation ids unique across processes sharing a Triton: random 32-bit base, counter below
_CORRIDS = itertools.count((random.SystemRandom().getrandbits(31) << 32) | (os.getpid() & 0xFFFF) << 16)


def _tensor(name: str, array: np.ndarray, dtype: str):
    from tritonclient.grpc import InferInput

    item = InferInput(name, list(array.shape), dtype)
    item.set_data_from_numpy(array)
    return item


class TritonSession:
    """One window on pe_llm: START with the prompt, CHOICE per step, END to free the state.

    pe_llm batches requests of different sequences (max_batch_size > 0), so every tensor
    carries a leading batch dim of 1: this request's one window.
    """

    def __init__(self, client, corrid: int, timeout_s: float | None) -> None:
        self.client = client
        self.corrid = corrid
        self.timeout_s = timeout_s
        self.open = False  # Triton holds a sequence that still needs an END
        self.cached_tokens = 0

    async def _infer(self, inputs: list, start: bool = False, end: bool = False):
        return await self.client.infer(
            LLM_MODEL, inputs, sequence_id=self.corrid, sequence_start=start, sequence_end=end,
            client_timeout=self.timeout_s,
        )

    async def start(self, prompt_ids: np.ndarray, passage_embeds: np.ndarray, last: bool = False) -> np.ndarray:
        self.open = not last
        result = await self._infer([
            _tensor("PROMPT_IDS", np.ascontiguousarray(prompt_ids, dtype=np.int64)[None], "INT64"),
            _tensor("PASSAGE_EMBEDS", np.ascontiguousarray(passage_embeds, dtype=np.float32)[None], "FP32"),
        ], start=True, end=last)
        self.cached_tokens = int(result.as_numpy("CACHED_TOKENS")[0, 0])
        return result.as_numpy("SCORES")[0]

    async def step(self, index: int, last: bool = False) -> np.ndarray:
        result = await self._infer([_tensor("CHOICE", np.array([[index]], dtype=np.int64), "INT64")], end=last)
        self.open = not last
        return result.as_numpy("SCORES")[0]

    async def end(self) -> None:
        """Free the sequence unless the last call already did; shielded from cancellation, errors swallowed."""
        if not self.open:
            return
        self.open = False
        try:
            await asyncio.shield(self._infer([], end=True))
        except Exception:  # Triton down or sequence already expired: nothing left to free
            pass


class TritonStepBackend:
    def __init__(self, client, timeout_s: float | None = None) -> None:
        self.client = client
        self.timeout_s = timeout_s

    def session(self) -> TritonSession:
        return TritonSession(self.client, next(_CORRIDS), self.timeout_s)


async def embed_texts(client, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """pe_embed: (projected [n, H], encoder embeddings [n, E]) for one batch of texts."""
    array = np.array([t.encode("utf-8") for t in texts], dtype=np.object_)
    result = await client.infer(EMBED_MODEL, [_tensor("TEXT", array, "BYTES")])
    return result.as_numpy("PROJECTED"), result.as_numpy("ENCODER_EMBEDDING")


async def project(client, vectors: np.ndarray) -> np.ndarray:
    """pe_projector for caller-supplied encoder embeddings [n, E]."""
    result = await client.infer(PROJECTOR_MODEL, [_tensor("ENCODER_EMBEDDING", np.ascontiguousarray(vectors, np.float32), "FP32")])
    return result.as_numpy("PROJECTED")
