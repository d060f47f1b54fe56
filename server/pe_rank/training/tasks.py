"""What one training step of each stage samples and which loss it computes.

A task's ``sample(rng)`` draws a batch from the data with the step's own generator (so a
resumed run sees the same batches), and ``loss(batch)`` returns a scalar tensor that
depends on the trainable projector only through projected embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ..core.checkpoint import WeightFiles
from ..core.model import PeRankModel
from ..core.prompt import PLACEHOLDER
from .data import Query, TrainingData
from .embeddings import EmbeddingCache
from .losses import alignment_loss, ranking_loss

# Stage 1's user message. A short instruction rather than the bare "[<PLACEHOLDER>]": with
# a frozen LLM the instruction is what tells it to spell the soft token out.
ALIGN_MESSAGE = f"Reconstruct the passage: [{PLACEHOLDER}]"


class Task(Protocol):
    stage: int

    def sample(self, rng: np.random.Generator) -> Any: ...

    def loss(self, batch: Any) -> Tensor: ...


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    """The generator of one step: batches depend only on (seed, stage, step)."""
    return np.random.default_rng([seed, stage, step])


def project(model: PeRankModel, encoded: np.ndarray) -> Tensor:
    """Encoder embeddings -> projected embeddings [N, H], with gradients to the projector."""
    x = torch.from_numpy(np.asarray(encoded, dtype=np.float32)).to(model.device)
    return model.projector(x)


def lm_head_weight(model: PeRankModel) -> Tensor:
    """The output matrix [V, H]: ``lm_head.weight`` when stored, else the tied input embeddings."""
    weights = WeightFiles(model.info.folder)
    if "lm_head.weight" in weights.keys("lm_head."):
        (_, tensor, _), = weights.load(["lm_head.weight"])
        return tensor.to(model.device, model.dtype)
    return model.llm.get_input_embeddings().weight.detach()


@dataclass
class AlignmentTask:
    """Stage 1: the LLM reads a passage's soft token and must write the passage out."""

    model: PeRankModel
    cache: EmbeddingCache
    passages: list[str]
    batch: int
    target_tokens: int = 64
    stage: int = 1

    def __post_init__(self) -> None:
        tok = self.model.prompts.tokenizer
        ids = np.asarray(tok.encode(tok.render_chat(ALIGN_MESSAGE)), dtype=np.int64)
        positions = np.flatnonzero(ids == self.model.prompts.placeholder_id)
        if len(positions) != 1:
            raise ValueError(f"stage 1 prompt has {len(positions)} placeholders, expected 1")
        self.prompt_ids = torch.from_numpy(ids).to(self.model.device)
        self.position = int(positions[0])
        self.lm_head = lm_head_weight(self.model)
        self._targets: dict[str, list[int]] = {}

    def sample(self, rng: np.random.Generator) -> list[str]:
        picks = rng.choice(len(self.passages), size=min(self.batch, len(self.passages)), replace=False)
        return [self.passages[i] for i in picks]

    def target(self, text: str) -> list[int]:
        """The passage's first ``target_tokens`` LLM tokens (no EOS: most targets are cut)."""
        if text not in self._targets:
            self._targets[text] = list(self.model.prompts.tokenizer.encode(text))[: self.target_tokens] or [0]
        return self._targets[text]

    def loss(self, texts: list[str]) -> Tensor:
        embeds = project(self.model, self.cache.get(texts))
        return alignment_loss(self.model.llm, self.lm_head, self.prompt_ids, self.position, embeds,
                              [self.target(t) for t in texts])


@dataclass(frozen=True)
class Window:
    """One stage-2 sample: a query and its window's passages in (shuffled) input order."""

    query: str
    docids: tuple[str, ...]
    passages: tuple[str, ...]
    grades: tuple[int, ...]


def sample_window(queries: tuple[Query, ...], rng: np.random.Generator, size: int) -> Window:
    """A random query, a random window of ``size`` consecutive BM25 hits, shuffled."""
    q = queries[int(rng.integers(len(queries)))]
    size = min(size, len(q.passages))
    offset = int(rng.integers(len(q.passages) - size + 1))
    order = offset + rng.permutation(size)
    return Window(q.text, tuple(q.docids[i] for i in order), tuple(q.passages[i] for i in order),
                  tuple(q.grade(q.docids[i]) for i in order))


def teacher_order(grades: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """Grade descending, ties by cosine descending, then by input position."""
    return np.lexsort((-cosine, -grades)).astype(np.int64)


@dataclass
class RankingTask:
    """Stage 2: ListMLE on the ranker's own scores, teacher-forced with the teacher's order."""

    model: PeRankModel
    cache: EmbeddingCache
    data: TrainingData
    batch: int
    window: int = 20
    stage: int = 2

    def sample(self, rng: np.random.Generator) -> list[Window]:
        return [sample_window(self.data.queries, rng, self.window) for _ in range(self.batch)]

    def teacher(self, window: Window) -> np.ndarray:
        encoded = self.cache.get([window.query, *window.passages])
        cosine = encoded[1:] @ encoded[0]  # embeddings are L2-normalised
        return teacher_order(np.asarray(window.grades, dtype=np.int64), cosine)

    def window_loss(self, window: Window) -> Tensor:
        ids, positions = self.model.prompts.build(window.query, len(window.passages))
        device = self.model.device
        embeds = project(self.model, self.cache.get(list(window.passages)))
        return ranking_loss(self.model.llm, torch.from_numpy(np.array(ids)).to(device),
                            torch.from_numpy(np.array(positions)).to(device), embeds,
                            torch.from_numpy(self.teacher(window)).to(device))

    def loss(self, windows: list[Window]) -> Tensor:
        return torch.stack([self.window_loss(w) for w in windows]).mean()
