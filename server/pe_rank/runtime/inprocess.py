"""The in-process PyTorch backend: encoder, projector and the decode engine in this process."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .model import PeRankModel, load_model
from ..core.ranker import MatrixSource, WindowSource
from ..core.reranker import Reranker
from .engine import DecodeEngine, EngineBackend
from .steps import TorchStepper
from ..core.types import Passage


class PerWindowSource:
    """Encodes each window's passages together, exactly as the reference implementation did.

    The reference pads a window's texts to the window's longest; padding changes float bits
    and so can flip near-ties. Encoding per window reproduces its rankings bit for bit, at the
    cost of encoding passages that sit in two windows twice.
    """

    def __init__(self, model: PeRankModel, passages: Sequence[Passage]) -> None:
        self.model = model
        self.passages = passages

    async def window(self, indices: list[int]) -> np.ndarray:
        return self.model.project(_encoder_vectors(self.model, [self.passages[i] for i in indices]))


def _encoder_vectors(model: PeRankModel, passages: Sequence[Passage]) -> np.ndarray:
    """Encoder embeddings [n, E]: the caller's where given, else encoded from text."""
    vectors = np.zeros((len(passages), model.embedding_size), dtype=np.float32)
    to_encode = [i for i, p in enumerate(passages) if p.embedding is None]
    if to_encode:
        vectors[to_encode] = model.encode([passages[i].text for i in to_encode])
    for i, p in enumerate(passages):
        if p.embedding is not None:
            vectors[i] = np.asarray(p.embedding, dtype=np.float32)
    return vectors


class InProcessEmbedder:
    """``per_window=True`` is bit-faithful to the reference; False encodes each passage once."""

    def __init__(self, model: PeRankModel, per_window: bool = True) -> None:
        self.model = model
        self.per_window = per_window

    async def prepare(self, passages: Sequence[Passage]) -> WindowSource:
        if self.per_window:
            return PerWindowSource(self.model, passages)
        return MatrixSource(self.model.project(_encoder_vectors(self.model, passages)))


def stepper_for(model: PeRankModel) -> TorchStepper:
    return TorchStepper(model.llm, model.prompts, model.dtype, model.device)


def engine_for(model: PeRankModel) -> DecodeEngine:
    """One engine per model: concurrent in-process requests share its batched decode steps."""
    if model.engine is None:
        model.engine = DecodeEngine(stepper_for(model))
    return model.engine


def in_process_reranker(model: PeRankModel, per_window: bool = True) -> Reranker:
    return Reranker(InProcessEmbedder(model, per_window), EngineBackend(engine_for(model)), model.prompts)


def load_in_process(
    folder: Path | str, dtype: str = "float32", device: str = "cpu", per_window: bool = True
) -> tuple[PeRankModel, Reranker]:
    model = load_model(folder, dtype=dtype, device=device)
    return model, in_process_reranker(model, per_window)
