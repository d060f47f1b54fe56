"""The listwise-embedding prompt, word for word as PE-Rank was trained on it."""
from __future__ import annotations

from functools import lru_cache

import numpy as np

from .tokenization import PromptTokenizer

PLACEHOLDER = "<PLACEHOLDER>"
RANK_TOKEN = "<RANK>"
HEAD_PROBES = ("x", "how", "What", "1", "?", "[")  # queries that begin as differently as queries do


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
        self.shared_head = lru_cache(maxsize=64)(self._shared_head)

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

    def _shared_head(self, n: int) -> np.ndarray:
        """The ids every prompt for ``n`` passages begins with, whatever the query.

        Found as the common start of prompts whose queries begin differently (a lone
        character, a word, a capital, a digit, punctuation), so it holds for any tokenizer:
        with sentencepiece, " x" may be two pieces and " how" one. A prompt that does not
        begin with this head (odd text) is prefilled whole; see :meth:`head_length`.
        """
        prompts = [self.build(query, n)[0] for query in HEAD_PROBES]
        length = min(len(ids) for ids in prompts)
        stacked = np.stack([ids[:length] for ids in prompts])
        differ = np.flatnonzero((stacked != stacked[0]).any(axis=0))
        head = stacked[0, : differ[0] if len(differ) else length].copy()
        head.setflags(write=False)
        return head

    def head_length(self, ids: np.ndarray, n: int) -> int:
        """How many leading ``ids`` are the shared head for ``n`` passages (0: they are not)."""
        head = self.shared_head(n)
        if 0 < len(head) < len(ids) and np.array_equal(ids[: len(head)], head):
            return len(head)
        return 0
