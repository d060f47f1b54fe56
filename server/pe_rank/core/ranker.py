"""The PE-Rank decoding loop: sliding windows of dynamic-constrained greedy decoding.

Written once. :class:`WindowDecoder` is one window's greedy decoding, fed one score vector
at a time; the engine (:mod:`~pe_rank.runtime.engine`) drives many of them in batched forwards.
:func:`slide` is the sliding-window pass; it sends whole windows to a :class:`WindowBackend`:
the in-process engine, Triton's ``pe_llm`` over gRPC, or ``pe_llm`` through BLS inside Triton.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .prompt import PromptBuilder
from .types import Mode, RankOptions, RankStats, Timings


class WindowSource(Protocol):
    """Projected embeddings [n, H] for the passages of one window, in window order."""

    async def window(self, indices: list[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class WindowJob:
    """One window, everything the LLM needs: what crosses the wire to ``pe_llm``."""

    prompt_ids: np.ndarray  # [T] int64, one placeholder per passage
    embeds: np.ndarray      # [n, H] projected passage embeddings, in window order
    mode: Mode = Mode.FULL
    emit: int = 0           # passages to emit by decoding (emissions_needed); 0 or >= n: all


@dataclass
class WindowOutcome:
    """A window's local order (indices into its passages, best first) and what it cost."""

    order: list[int]
    prompt_tokens: int = 0
    cached_tokens: int = 0   # prompt tokens taken from the head cache instead of prefilled
    decode_steps: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0   # from the end of the prefill to the answer (shared batched steps)


def window_arrays(job: WindowJob) -> dict[str, np.ndarray]:
    """pe_llm's inputs for one window (no batch dimension), as every caller sends them."""
    return {
        "PROMPT_IDS": np.ascontiguousarray(job.prompt_ids, dtype=np.int64),
        "PASSAGE_EMBEDS": np.ascontiguousarray(job.embeds, dtype=np.float32),
        "EMIT": np.array([job.emit], dtype=np.int32),
        "MODE": np.array([job.mode.value.encode()], dtype=np.object_),
    }


class WindowBackend(Protocol):
    """Ranks one whole window. Cancelling the awaiting task abandons the window at its next step."""

    async def rank_window(self, job: WindowJob) -> WindowOutcome: ...


def window_bounds(n: int, window_size: int, stride: int) -> list[tuple[int, int]]:
    """Windows from the bottom of the list to the top, as the reference sliding-window ranker.

    The reference loops ``while end > 0 and start + stride != 0`` and clamps ``start`` at 0
    before stepping it down, so the window after a clamped one is never run. One deliberate
    deviation: the reference runs *no* window when ``n == window_size - stride`` (e.g. 10
    passages with 20/10) and returns the input order; we always rank the first window.
    """
    bounds: list[tuple[int, int]] = []
    start, end = n - window_size, n
    while end > 0 and (start + stride != 0 or not bounds):
        start = max(start, 0)
        bounds.append((start, end))
        start, end = start - stride, end - stride
    return bounds


def emissions_needed(bounds: list[tuple[int, int]], k: int, top_n: int | None) -> int:
    """How many passages window ``k`` must emit for the final top-n to be exact.

    Greedy decoding is deterministic, so a window's first m emissions do not depend on
    whether decoding goes on. A window must emit the passages that move on to the next
    window (its top ``next_end - start``) and every position it settles for good that lies
    above ``top_n``; the rest of its order never matters for the top-n.
    """
    start, end = bounds[k]
    if top_n is None:
        return end - start
    moving_on = bounds[k + 1][1] - start if k + 1 < len(bounds) else 0
    return min(end - start, max(moving_on, top_n - start, 1))


def _descending(scores: np.ndarray, candidates: np.ndarray) -> list[int]:
    """Candidates by score, highest first, ties by position (as argmax picks)."""
    order = np.argsort(-scores[candidates], kind="stable")
    return [int(i) for i in candidates[order]]


class WindowDecoder:
    """Greedy constrained decoding of one window, as a state machine.

    ``feed`` takes the scores s_i = h . e_i after the prefill or after a decode step, and
    returns the passage whose embedding must be fed next, or None once the window is
    decided. Emitting a passage removes it; ties go to the lowest index; the last passage
    is placed without a step; after ``emit`` emissions the rest is ordered by the last
    scores; ``first`` mode orders everything by the prefill's scores.
    """

    def __init__(self, n: int, mode: Mode = Mode.FULL, emit: int = 0) -> None:
        if n < 1:
            raise ValueError("a window needs at least one passage")
        self.mode = mode
        self.emit = n if emit <= 0 else min(emit, n)
        self.remaining = np.ones(n, dtype=bool)
        self.order: list[int] = []
        self.decode_steps = 0
        self.done = False

    def feed(self, scores: np.ndarray) -> int | None:
        if self.done:
            raise RuntimeError("the window is already decided")
        scores = np.asarray(scores)
        if scores.shape != self.remaining.shape:
            raise ValueError(f"expected {len(self.remaining)} scores, got shape {list(scores.shape)}")
        if not np.all(np.isfinite(scores)):
            raise FloatingPointError("the LLM produced non-finite passage scores")
        if self.mode is Mode.FIRST:
            return self._finish(scores)
        pick = int(np.argmax(np.where(self.remaining, scores, -np.inf)))
        self.order.append(pick)
        self.remaining[pick] = False
        if self.remaining.sum() <= 1 or len(self.order) >= self.emit:
            return self._finish(scores)
        self.decode_steps += 1
        return pick

    def margin(self, scores: np.ndarray) -> float:
        """The smallest score gap that decides the next ``feed``: the pick against the runner-up, or,
        when that feed decides the window, every gap of the order it writes (inf: nothing to decide).

        A gap below the numeric noise of how ``scores`` were computed could flip the decision.
        """
        rest = np.sort(np.asarray(scores, dtype=np.float64)[self.remaining])[::-1]
        if len(rest) < 2:
            return float("inf")
        finishes = self.mode is Mode.FIRST or len(rest) <= 2 or len(self.order) + 1 >= self.emit
        gaps = rest[:-1] - rest[1:] if finishes else rest[:1] - rest[1:2]
        return float(gaps.min())

    def _finish(self, scores: np.ndarray) -> None:
        self.order += _descending(scores, np.flatnonzero(self.remaining))
        self.done = True
        return None


class WindowRanker(Protocol):
    """Ranks one window (passage indices, best first) and says what it cost."""

    async def __call__(self, window: list[int], emit: int) -> tuple[list[int], RankStats]: ...


async def slide(n: int, options: RankOptions, rank_one: WindowRanker) -> tuple[list[int], RankStats]:
    """The sliding-window pass shared by every ranker: each window's order replaces its slice."""
    order = list(range(n))
    stats = RankStats()
    bounds = window_bounds(n, options.window_size, options.stride)
    for k, (start, end) in enumerate(bounds):
        window = order[start:end]
        local, cost = await rank_one(window, emissions_needed(bounds, k, options.top_n))
        order[start:end] = [window[i] for i in local]
        stats.windows += 1
        stats.prompt_tokens += cost.prompt_tokens
        stats.cached_prompt_tokens += cost.cached_prompt_tokens
        stats.decode_steps += cost.decode_steps
    return order, stats


async def rank_passages(
    backend: WindowBackend, prompts: PromptBuilder, query: str, n: int, source: WindowSource,
    options: RankOptions, timings: Timings | None = None,
) -> tuple[list[int], RankStats]:
    """PE-Rank over passages 0..n-1; returns their indices, best first."""
    timings = timings if timings is not None else Timings()

    async def rank_one(window: list[int], emit: int) -> tuple[list[int], RankStats]:
        prompt_ids, _ = prompts.build(query, len(window))
        t0 = time.perf_counter()
        embeds = await source.window(window)
        timings.encode_ms += (time.perf_counter() - t0) * 1e3
        outcome = await backend.rank_window(WindowJob(np.asarray(prompt_ids), embeds, options.mode, emit))
        timings.prefill_ms += outcome.prefill_ms
        timings.decode_ms += outcome.decode_ms
        return outcome.order, RankStats(prompt_tokens=outcome.prompt_tokens,
                                        cached_prompt_tokens=outcome.cached_tokens,
                                        decode_steps=outcome.decode_steps)

    return await slide(n, options, rank_one)
