"""The encoder pre-rank: a cascade's cheap first stage, before PE-Rank reorders the top.

Rerankers are deployed as cascades: a bi-encoder orders every candidate, then the expensive
listwise ranker reorders only the best ``depth``. PE-Rank already encodes every passage for its
soft tokens, so the first stage is the same encoder's cosine between the query and each passage.
With the pre-rank off and ``depth`` 0 (or >= the number of passages) a request is ranked exactly
as the paper's sliding window ranks it (the conformance rankings hold).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .checkpoint import RankingDefaults
from .errors import InvalidRequest
from .types import Mode, RerankRequest


def cosine_order(query: np.ndarray, passages: np.ndarray) -> list[int]:
    """Passage indices by cosine to the query, best first; ties keep the given order."""
    q = np.asarray(query, dtype=np.float64)
    p = np.asarray(passages, dtype=np.float64)
    scores = (p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)) @ (q / max(np.linalg.norm(q), 1e-12))
    return [int(i) for i in np.argsort(-scores, kind="stable")]


def with_defaults(request: RerankRequest, defaults: RankingDefaults) -> RerankRequest:
    """The request with what it left unset taken from the model's defaults.

    Mode ``text`` (the text-listwise baseline, in-process only) has no pre-rank: it ranks the
    given order, and asking it for one is an error rather than silently ignored.
    """
    if request.mode is Mode.TEXT:
        if request.prerank:
            raise InvalidRequest("prerank", "the text-listwise baseline (mode text) has no pre-rank")
        return dataclasses.replace(request, prerank=False, depth=request.depth or 0)
    return dataclasses.replace(
        request,
        prerank=defaults.prerank if request.prerank is None else request.prerank,
        depth=defaults.depth if request.depth is None else request.depth,
    )


def reranked_count(n: int, depth: int | None) -> int:
    """How many of ``n`` passages PE-Rank reorders at this depth (0 or None: all of them)."""
    return n if not depth else min(depth, n)
