"""What one training step of each stage samples and which loss it computes.

A task's ``sample(rng)`` draws a batch from the data with the step's own generator (so a
resumed run sees the same batches), and ``loss(batch)`` returns a scalar tensor that
depends on the trainable projector only through projected embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor

from ..runtime.weights import WeightFiles
from ..runtime.model import PeRankModel
from ..core.prompt import PLACEHOLDER
from .data import PSEUDO, Query, TrainingData
from .embeddings import EmbeddingCache
from .adapter import lower_states, top_hidden
from .losses import (alignment_loss, feature_decoder, listmle, passage_scores, query_loss, ranking_loss,
                     split_projector, teacher_forced_inputs)

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
class PassageTask:
    """What both stage-1 tasks draw from: single passages of the training runs."""

    model: PeRankModel
    cache: EmbeddingCache
    passages: list[str]
    batch: int
    target_tokens: int = 64
    stage: int = 1


@dataclass
class AlignmentTask(PassageTask):
    """Stage 1: the LLM reads a passage's soft token and must write the passage out."""

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


@dataclass
class WordsAlignmentTask(PassageTask):
    """Stage 1, cheap variant: a soft token should look like the words of its passage.

    The target is the IDF-weighted mean of the LLM's input embeddings of the passage's first
    ``target_tokens`` tokens (IDF over the training passages), scaled to the mean token-row
    norm. No LLM pass is needed, so it trains in seconds; the LLM then reads a soft token as
    a blend of the passage's salient words, which its frozen layers already understand.
    """

    def __post_init__(self) -> None:
        tok = self.model.prompts.tokenizer
        self._ids = [list(tok.encode(t))[: self.target_tokens] or [0] for t in self.passages]
        counts = np.zeros(self.model.llm.get_input_embeddings().weight.shape[0], dtype=np.float64)
        for ids in self._ids:
            counts[np.unique(ids)] += 1
        self.idf = torch.from_numpy(np.log((len(self._ids) + 1) / (counts + 1))).float()
        self.rows = self.model.llm.get_input_embeddings().weight.detach().float().cpu()
        self.row_norm = float(self.rows.norm(dim=1).mean())

    def sample(self, rng: np.random.Generator) -> list[int]:
        return [int(i) for i in rng.choice(len(self.passages), size=min(self.batch, len(self.passages)), replace=False)]

    def target(self, k: int) -> Tensor:
        ids = torch.tensor(self._ids[k])
        weights = self.idf[ids]
        mean = (weights[:, None] * self.rows[ids]).sum(0) / weights.sum().clamp(min=1e-6)
        return mean / mean.norm().clamp(min=1e-6) * self.row_norm

    def loss(self, picks: list[int]) -> Tensor:
        embeds = project(self.model, self.cache.get([self.passages[k] for k in picks]))
        targets = torch.stack([self.target(k) for k in picks]).to(embeds.device)
        return ((embeds.float() - targets) ** 2).sum(-1).mean() / self.row_norm ** 2


@dataclass(frozen=True)
class Window:
    """One stage-2 sample: a query and its window's passages in (shuffled) input order."""

    query: str
    docids: tuple[str, ...]
    passages: tuple[str, ...]
    grades: tuple[int, ...]
    teacher: tuple[int, ...] | None = None  # the teacher's order when labelled beforehand (distillation)


def window_of(q: Query, order: Sequence[int]) -> Window:
    """The window holding ``q``'s hits ``order``, in that order."""
    return Window(q.text, tuple(q.docids[i] for i in order), tuple(q.passages[i] for i in order),
                  tuple(q.grade(q.docids[i]) for i in order))


def sample_window(queries: tuple[Query, ...], rng: np.random.Generator, size: int) -> Window:
    """A random query, a random window of ``size`` consecutive BM25 hits, shuffled."""
    q = queries[int(rng.integers(len(queries)))]
    size = min(size, len(q.passages))
    offset = int(rng.integers(len(q.passages) - size + 1))
    order = offset + rng.permutation(size)
    return window_of(q, order)


def sample_carried_window(queries: tuple[Query, ...], cache: EmbeddingCache, rng: np.random.Generator,
                          size: int) -> Window:
    """A window as the sliding pass meets it when every window below was ranked by the teacher.

    The pass walks up the BM25 list in steps of ``size // 2`` and carries each window's best
    half up into the next. So the window starting at hit ``s`` holds hits ``[s, s + step)``
    plus the teacher's best ``size - step`` of all hits below them (the bottom window is just
    the last ``size`` hits). Random windows never show the model this contest among
    already-strong passages, which decides the final top of a top-100 pass. Shuffled.
    """
    long = [q for q in queries if len(q.passages) > size] or list(queries)
    q = long[int(rng.integers(len(long)))]
    size = min(size, len(q.passages))
    step = max(size // 2, 1)
    starts = list(range(len(q.passages) - size, -1, -step))
    start = starts[int(rng.integers(len(starts)))]
    if start + size >= len(q.passages):
        picked = np.arange(start, len(q.passages))
    else:
        below = np.arange(start + step, len(q.passages))
        teacher = ranked_by_teacher(cache, q.text, [q.passages[i] for i in below],
                                    [q.grade(q.docids[i]) for i in below])
        best = below[teacher[: size - step]]
        picked = np.concatenate([np.arange(start, start + step), best])
    order = picked[rng.permutation(len(picked))]
    return window_of(q, order)


def teacher_order(grades: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """Grade descending, ties by cosine descending, then by input position."""
    return np.lexsort((-cosine, -grades)).astype(np.int64)


def window_teacher(cache: EmbeddingCache, window: Window) -> np.ndarray:
    """The teacher's order of a window: its own labels when it has them, else qrels grade, then
    encoder cosine to the query."""
    if window.teacher is not None:
        return np.asarray(window.teacher, dtype=np.int64)
    return ranked_by_teacher(cache, window.query, window.passages, window.grades)


def ranked_by_teacher(cache: EmbeddingCache, query: str, passages: Sequence[str], grades: Sequence[int]) -> np.ndarray:
    """Indices into ``passages`` in the teacher's order (grade, then encoder cosine to ``query``)."""
    encoded = cache.get([query, *passages])
    return teacher_order(np.asarray(grades, dtype=np.int64), encoded[1:] @ encoded[0])  # L2-normalised


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
        return window_teacher(self.cache, window)

    def window_loss(self, window: Window) -> Tensor:
        ids, positions = self.model.prompts.build(window.query, len(window.passages))
        device = self.model.device
        embeds = project(self.model, self.cache.get(list(window.passages)))
        return ranking_loss(self.model.llm, torch.from_numpy(np.array(ids)).to(device),
                            torch.from_numpy(np.array(positions)).to(device), embeds,
                            torch.from_numpy(self.teacher(window)).to(device))

    def loss(self, windows: list[Window]) -> Tensor:
        return torch.stack([self.window_loss(w) for w in windows]).mean()


@dataclass
class AdapterTask:
    """Stage 3: ListMLE like stage 2, but training LoRA on the LLM's top layers (projector frozen).

    Windows come from a fixed pool drawn with the run's seed, so each window's lower-layer
    states are computed once (no gradients) and reused whenever the window is drawn again.
    """

    model: PeRankModel
    cache: EmbeddingCache
    data: TrainingData
    stack: torch.nn.Module  # the decoder stack carrying the LoRA modules
    first: int  # the first adapted layer
    batch: int = 1
    pool: int = 512
    window: int = 20
    seed: int = 0
    query_weight: float = 0.0  # weight of query_loss next to ListMLE (0: ListMLE alone)
    carried: float = 0.0  # share of the pool drawn by sample_carried_window (real queries only)
    stage: int = 3
    given: Sequence[Window] | None = None  # distillation: labelled windows, taken in order, states not kept

    def __post_init__(self) -> None:
        self._states: dict[int, tuple[Tensor, Tensor, Tensor, int]] = {}
        if self.given is not None:
            if not self.given:
                raise ValueError("no training windows")
            self.windows = list(self.given)
            if self.query_weight > 0:
                self._fit_query_targets()
            return
        rng = np.random.default_rng([self.seed, self.stage])
        real = tuple(q for q in self.data.queries if q.run != PSEUDO) or self.data.queries
        self.windows = [self._draw(rng, real) for _ in range(self.pool)]
        if self.query_weight > 0:
            self._fit_query_targets()

    def _draw(self, rng: np.random.Generator, real: tuple[Query, ...]) -> Window:
        # no extra draw when carried == 0, so such pools are what they were before the option
        if self.carried > 0 and rng.random() < self.carried:
            return sample_carried_window(real, self.cache, rng, self.window)
        return sample_window(self.data.queries, rng, self.window)

    def _fit_query_targets(self) -> None:
        """The query loss's pieces: the projector's last weight, and a decoder from its features back
        to encoder space, fitted on the pool's passages (which the pool encodes anyway)."""
        features, self.score_weight = split_projector(self.model.projector)
        texts = list(dict.fromkeys(p for w in self.windows for p in w.passages))
        encoded = torch.from_numpy(self.cache.get(texts)).to(self.model.device)
        with torch.no_grad():
            self.decoder = feature_decoder(features(encoded), encoded)

    def sample(self, rng: np.random.Generator) -> list[int]:
        return [int(k) for k in rng.integers(len(self.windows), size=self.batch)]

    def sample_at(self, step: int, rng: np.random.Generator) -> list[int]:
        """Given windows: step ``s`` takes windows ``[s * batch, (s + 1) * batch)`` (wrapping), so every
        window is seen once before any twice; a drawn pool: :meth:`sample`."""
        if self.given is None:
            return self.sample(rng)
        return [(step * self.batch + i) % len(self.windows) for i in range(self.batch)]

    def prepared(self, k: int) -> tuple[Tensor, Tensor, Tensor, int]:
        """(layer-``first`` input states, projected embeddings, teacher order, prompt length)."""
        if self.given is not None:
            return self._prepare(k)  # each given window comes once: its states are not kept
        if k not in self._states:
            self._states[k] = self._prepare(k)
        return self._states[k]

    def _prepare(self, k: int) -> tuple[Tensor, Tensor, Tensor, int]:
        window = self.windows[k]
        ids, positions = self.model.prompts.build(window.query, len(window.passages))
        device = self.model.device
        with torch.no_grad():
            embeds = project(self.model, self.cache.get(list(window.passages)))
        teacher = torch.from_numpy(window_teacher(self.cache, window)).to(device)
        inputs = teacher_forced_inputs(self.stack, torch.from_numpy(np.array(ids)).to(device),
                                       torch.from_numpy(np.array(positions)).to(device), embeds, teacher)
        return lower_states(self.stack, inputs, self.first), embeds, teacher, len(ids)

    def window_loss(self, k: int) -> Tensor:
        states, embeds, teacher, prompt_len = self.prepared(k)
        hidden = top_hidden(self.stack, states, self.first)[prompt_len - 1:]
        loss = listmle(passage_scores(hidden, embeds), teacher)
        if self.query_weight > 0:
            query = torch.from_numpy(self.cache.get([self.windows[k].query])[0]).to(hidden.device)
            loss = loss + self.query_weight * query_loss(hidden, self.score_weight, self.decoder @ query)
        return loss

    def loss(self, picks: list[int]) -> Tensor:
        return torch.stack([self.window_loss(k) for k in picks]).mean()
