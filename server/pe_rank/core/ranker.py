"""The PE-Rank decoding loop: sliding windows of dynamic-constrained greedy decoding.

Written once against :class:`~pe_rank.core.steps.StepBackend`; the in-process PyTorch
backend and the Triton backend plug into it.
"""
from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from .prompt import PromptBuilder
from .steps import StepBackend
from .types import Mode, RankOptions, RankStats, Timings


class WindowSource(Protocol):
    """Projected embeddings [n, H] for the passages of one window, in window order."""

    async def window(self, indices: list[int]) -> np.ndarray: ...


class MatrixSource:
    """Rows of embeddings computed once per request (or cached, or supplied by the caller)."""

    def __init__(self, embeds: np.ndarray) -> None:
        self.embeds = embeds

    async def window(self, indices: list[int]) -> np.ndarray:
        return self.embeds[indices]


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


def _check_finite(scores: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(scores)):
        raise FloatingPointError("the LLM produced non-finite passage scores")
    return scores


async def rank_window(
    backend: StepBackend, prompt_ids: np.ndarray, embeds: np.ndarray, mode: Mode, emit: int,
    timings: Timings,
) -> tuple[list[int], RankStats]:
    """Greedy constrained decoding of one window; returns (local permutation, what it cost)."""
    n = len(embeds)
    session = backend.session()
    try:
        t0 = time.perf_counter()
        only_prefill = mode is Mode.FIRST or n <= 2 or emit <= 1
        scores = _check_finite(await session.start(prompt_ids, embeds, last=only_prefill))
        timings.prefill_ms += (time.perf_counter() - t0) * 1e3
        cost = RankStats(prompt_tokens=len(prompt_ids), cached_prompt_tokens=session.cached_tokens)
        remaining = np.ones(n, dtype=bool)
        if mode is Mode.FIRST:
            return _descending(scores, np.arange(n)), cost
        order: list[int] = []
        t0 = time.perf_counter()
        while True:
            pick = int(np.argmax(np.where(remaining, scores, -np.inf)))
            order.append(pick)
            remaining[pick] = False
            left = np.flatnonzero(remaining)
            if len(left) <= 1 or len(order) >= emit:
                break
            last = len(left) <= 2 or len(order) + 1 >= emit  # the pick after this step ends the window
            scores = _check_finite(await session.step(pick, last=last))
            cost.decode_steps += 1
        timings.decode_ms += (time.perf_counter() - t0) * 1e3
        return order + _descending(scores, left), cost
    finally:
        await session.end()


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
    backend: StepBackend, prompts: PromptBuilder, query: str, n: int, source: WindowSource,
    options: RankOptions, timings: Timings | None = None,
) -> tuple[list[int], RankStats]:
    """PE-Rank over passages 0..n-1; returns their indices, best first."""
    timings = timings if timings is not None else Timings()

    async def rank_one(window: list[int], emit: int) -> tuple[list[int], RankStats]:
        prompt_ids, _ = prompts.build(query, len(window))
        t0 = time.perf_counter()
        embeds = await source.window(window)
        timings.encode_ms += (time.perf_counter() - t0) * 1e3
        return await rank_window(backend, prompt_ids, embeds, options.mode, emit, timings)

    return await slide(n, options, rank_one)
