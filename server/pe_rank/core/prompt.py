"""The listwise-embedding prompt, word for word as PE-Rank was trained on it."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .tokenization import PromptTokenizer

PLACEHOLDER = "<PLACEHOLDER>"
RANK_TOKEN = "<RANK>"


def prompt_text(query: str, n: int) -> str:
    """The user message for ``n`` passages; any change of wording or whitespace changes rankings."""
    head = (
        f"I will provide you with {n} passages, each with a special token representing the passage "
        "enclosed in [], followed by original text.\n"
        f"Rank the passages based on their relevance to the search query: {query}.\n"
    )
    body = "".join(f"Passage {i}: [{PLACEHOLDER}]\n\n" for i in range(1, n + 1))
    tail = (
        f"Search Query: {query}.\n"
        f"Rank the {n} relatively ordered passages above based on their relevance to the search query, "
        f"output the ranking in descending order. Only output the {n} unique special token in the ranking.\n\n"
    )
    return head + body + tail


class PromptBuilder:
    """Turns (query, n) into prompt ids and the positions of the n placeholders."""

    def __init__(self, tokenizer: PromptTokenizer) -> None:
        self.tokenizer = tokenizer
        self.placeholder_id = tokenizer.token_id(PLACEHOLDER)
        self._cached = lru_cache(maxsize=256)(self._build)

    def build(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (input_ids int64 [T], placeholder positions int64 [n]); cached per (query, n)."""
        return self._cached(query, n)

    def _build(self, query: str, n: int) -> tuple[np.ndarray, np.ndarray]:
        rendered = self.tokenizer.render_chat(prompt_text(query, n))
        ids = np.asarray(self.tokenizer.encode(rendered), dtype=np.int64)
        positions = np.flatnonzero(ids == self.placeholder_id).astype(np.int64)
        if len(positions) != n:
            raise ValueError(
                f"the query must not contain the special token text {PLACEHOLDER!r} "
                f"(prompt has {len(positions)} placeholders for {n} passages)"
            )
        ids.setflags(write=False)
        positions.setflags(write=False)
        return ids, positions
