"""The server's calls to Triton: pe_embed / pe_projector for embeddings, pe_llm per window.

A window is one stateless ``pe_llm`` request: nothing is held on the Triton between calls,
so consecutive windows of a request may go to different servers, and cancelling the call
(client gone, deadline) makes pe_llm drop the window at its next decode step.
"""
from __future__ import annotations

import time

import numpy as np

from ..core.ranker import WindowJob, WindowOutcome, window_arrays

LLM_MODEL = "pe_llm"
EMBED_MODEL = "pe_embed"
PROJECTOR_MODEL = "pe_projector"


def _tensor(name: str, array: np.ndarray, dtype: str | None = None):
    from tritonclient.grpc import InferInput
    from tritonclient.utils import np_to_triton_dtype

    item = InferInput(name, list(array.shape), dtype or np_to_triton_dtype(array.dtype))
    item.set_data_from_numpy(array)
    return item


def window_inputs(job: WindowJob) -> list:
    """pe_llm's inputs for one window (no batch dimension)."""
    return [_tensor(name, array) for name, array in window_arrays(job).items()]


def window_outcome(result) -> WindowOutcome:
    return WindowOutcome(
        order=[int(i) for i in result.as_numpy("ORDER")],
        decode_steps=int(result.as_numpy("DECODE_STEPS")[0]),
        cached_tokens=int(result.as_numpy("CACHED_TOKENS")[0]),
        prefill_ms=float(result.as_numpy("PREFILL_MS")[0]),
        decode_ms=float(result.as_numpy("DECODE_MS")[0]),
    )


class TritonWindowBackend:
    """One pe_llm call per window, bounded by the request's deadline (``time.monotonic()`` based)."""

    def __init__(self, client, deadline: float | None = None) -> None:
        self.client = client
        self.deadline = deadline

    def timeout(self) -> float | None:
        """Seconds left for the next call; Triton cancels the window when they run out."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline exceeded")
        return left

    async def rank_window(self, job: WindowJob) -> WindowOutcome:
        result = await self.client.infer(LLM_MODEL, window_inputs(job), client_timeout=self.timeout())
        outcome = window_outcome(result)
        outcome.prompt_tokens = len(job.prompt_ids)
        return outcome


async def embed_texts(client, texts: list[str], timeout: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """pe_embed: (projected [n, H], encoder embeddings [n, E]) for one batch of texts."""
    array = np.array([t.encode("utf-8") for t in texts], dtype=np.object_)
    result = await client.infer(EMBED_MODEL, [_tensor("TEXT", array, "BYTES")], client_timeout=timeout)
    return result.as_numpy("PROJECTED"), result.as_numpy("ENCODER_EMBEDDING")


async def project(client, vectors: np.ndarray, timeout: float | None = None) -> np.ndarray:
    """pe_projector for caller-supplied encoder embeddings [n, E]."""
    result = await client.infer(PROJECTOR_MODEL, [_tensor("ENCODER_EMBEDDING", np.ascontiguousarray(vectors, np.float32),
                                                          "FP32")], client_timeout=timeout)
    return result.as_numpy("PROJECTED")


class TritonEncoder:
    """:class:`~pe_rank.core.embeddings.Encoder` through a Triton's pe_embed and pe_projector."""

    def __init__(self, client) -> None:
        self.client = client

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return await embed_texts(self.client, texts)

    async def project(self, vectors: np.ndarray) -> np.ndarray:
        return await project(self.client, vectors)
