"""Long passages as chunks: split where the encoder would cut them, ranked as passages, folded back.

The encoder reads at most 512 tokens of a passage, its special tokens included ([CLS] and [SEP]
for BERT: 510 tokens of text). A passage over that is split into **chunks** of at most that many
tokens, and every chunk is a passage of its own in the sliding windows, sitting where its passage
sat (a passage's chunks stay together and in order, so the first-stage order is kept). After
ranking, a passage's place is its **best chunk's place**, and every passage is returned once, with
its index in the request.

- Boundaries are the encoder's own tokens (its ``tokenizer.json``, offsets into the text): chunk
  texts are slices of the passage, so nothing is rewritten. Chunks are balanced (a 600-token
  passage gives two of 300, not 510 and 90) and end between words where the words allow it (a
  chunk is only cut inside a word when that word alone does not fit). No overlap, as Cohere's
  chunking.
- ``max_chunks_per_doc`` (default :data:`DEFAULT_MAX_CHUNKS_PER_DOC`, Cohere v1's) caps the chunks of
  one passage; ``max_tokens_per_doc`` (Cohere's) caps the text tokens read across them. Up to the
  encoder's 512, it cuts the passage at that many tokens (one chunk; 511 and 512 mean the whole
  encoder input, 510 text tokens); above, at most that many tokens across its chunks. What lies
  beyond either cap is not read; :class:`ChunkStats` counts it.
- A passage that fits one encoder input is left exactly as it is, and when no passage needs
  splitting or cutting the ranked request is the request itself: rankings are bit for bit those
  of the unchunked path (every conformance ranking included). ``max_chunks_per_doc = 1`` is the
  reference's plain truncation at 512 tokens, counted.

Torch-free: the server plans chunks on its worker threads (before admission, which counts the
windows of the chunked request); the in-process CLI uses the same plan.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from .errors import InvalidRequest, RequestTooLarge
from .types import ENCODER_MAX_TOKENS, ChunkStats, Passage, RerankRequest

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

DEFAULT_MAX_CHUNKS_PER_DOC = 10    # Cohere v1's default
MAX_CHUNKS_PER_DOC = 100           # the most a request may ask for, per passage
DEFAULT_MAX_CHUNKS = 10_000        # chunks per request (Cohere refuses documents x max_chunks_per_doc over 10,000)


def validate_chunking(request: RerankRequest) -> None:
    """The chunking fields' own ranges (core/validation.py calls this with the other rules)."""
    if request.max_chunks_per_doc is not None and not 1 <= request.max_chunks_per_doc <= MAX_CHUNKS_PER_DOC:
        raise InvalidRequest("max_chunks_per_doc",
                             f"must be in [1, {MAX_CHUNKS_PER_DOC}], got {request.max_chunks_per_doc}")
    if request.max_tokens_per_doc is not None and request.max_tokens_per_doc < 1:
        raise InvalidRequest("max_tokens_per_doc", f"must be at least 1, got {request.max_tokens_per_doc}")


@dataclass(frozen=True)
class ChunkPlan:
    """What is ranked for a request, and how to fold the ranking back onto its passages.

    ``ranked`` has one passage per chunk (``ranked is request`` when nothing was split or cut);
    ``owner[k]`` is the request passage that chunk ``k`` belongs to; a passage's chunks are
    consecutive, in text order.
    """

    request: RerankRequest
    ranked: RerankRequest
    owner: tuple[int, ...]
    stats: ChunkStats

    @classmethod
    def unchanged(cls, request: RerankRequest) -> ChunkPlan:
        n = len(request.passages)
        return cls(request, request, tuple(range(n)), ChunkStats(chunks=n))

    @property
    def split(self) -> bool:
        return self.ranked is not self.request

    def chunk_top_n(self) -> int | None:
        """The chunk ranking's exact top-n that holds the request's top-n passages.

        The n-th distinct passage in the chunk order sits at most at the sum of the n largest
        chunk counts (each passage above it shows at most all its chunks first), so decoding
        exactly that many chunks (partial decoding) gives the exact top-n passages.
        """
        top_n = self.request.top_n
        if not top_n or not self.split:
            return top_n or None
        counts = sorted(Counter(self.owner).values(), reverse=True)
        return min(sum(counts[:top_n]), len(self.owner))

    def fold(self, order: Sequence[int]) -> tuple[list[int], list[int]]:
        """Chunk order (best first) -> passage order by each passage's best chunk, and that chunk's
        number within its passage (0 for a passage that is one chunk)."""
        if not self.split:
            return list(order), [0] * len(order)
        first = [0] * len(self.owner)
        start = -1
        for k, owner in enumerate(self.owner):
            if k == 0 or owner != self.owner[k - 1]:
                start = k
            first[k] = start
        seen: set[int] = set()
        passages, chunks = [], []
        for k in order:
            owner = self.owner[k]
            if owner not in seen:
                seen.add(owner)
                passages.append(owner)
                chunks.append(k - first[k])
        return passages, chunks


class Chunker:
    """Plans the chunks of a request with the encoder's tokenizer (``tokenizers.Tokenizer``)."""

    def __init__(self, tokenizer: Tokenizer, max_tokens: int = ENCODER_MAX_TOKENS) -> None:
        from tokenizers import Tokenizer

        # an own copy: padding and truncation are settings of the tokenizer object
        self._tok = Tokenizer.from_str(tokenizer.to_str())
        self._tok.no_padding()
        self._tok.no_truncation()
        self.max_tokens = max_tokens
        self.chunk_tokens = max_tokens - self._tok.num_special_tokens_to_add(False)
        if self.chunk_tokens < 1:
            raise ValueError(f"the encoder's special tokens leave no room in {max_tokens} tokens")

    @classmethod
    def from_file(cls, path) -> Chunker:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, texts: list[str]) -> list[Encoding]:
        """Text tokens (no special tokens) with their character offsets and words."""
        return self._tok.encode_batch(texts, add_special_tokens=False) if texts else []

    def plan(self, request: RerankRequest, default_max_chunks: int = DEFAULT_MAX_CHUNKS_PER_DOC,
             max_chunks: int = DEFAULT_MAX_CHUNKS) -> ChunkPlan:
        """Split and cut the request's passages (validated already); ``max_chunks`` bounds the total."""
        per_doc = request.max_chunks_per_doc or default_max_chunks
        cap = request.max_tokens_per_doc
        texts = [i for i, p in enumerate(request.passages) if p.embedding is None]
        encodings = dict(zip(texts, self.encode([request.passages[i].text for i in texts])))
        passages: list[Passage] = []
        owner: list[int] = []
        split = cut = tokens_cut = 0
        changed = False
        for i, passage in enumerate(request.passages):
            encoding = encodings.get(i)
            if encoding is None:  # a caller's embedding: nothing to split
                pieces, lost = [passage.text], 0
            else:
                pieces, lost = self._pieces(passage.text, encoding, per_doc, cap)
            changed = changed or len(pieces) > 1 or pieces[0] is not passage.text
            split += len(pieces) > 1
            cut += lost > 0
            tokens_cut += lost
            if len(pieces) == 1:
                passages.append(passage if pieces[0] is passage.text else replace(passage, text=pieces[0]))
            else:
                passages += [Passage(id=f"{passage.id}#{k}", text=t) for k, t in enumerate(pieces)]
            owner += [i] * len(pieces)
            if len(passages) > max_chunks:
                raise RequestTooLarge("passages", f"more than {max_chunks} chunks (lower max_chunks_per_doc or "
                                                  f"max_tokens_per_doc, or send fewer passages)")
        stats = ChunkStats(chunks=len(passages), chunked_passages=split, tokens_cut=tokens_cut, cut_passages=cut)
        if not changed:
            return ChunkPlan(request, request, tuple(range(len(request.passages))), stats)
        return ChunkPlan(request, replace(request, passages=tuple(passages)), tuple(owner), stats)

    def _pieces(self, text: str, encoding: Encoding, per_doc: int, cap: int | None) -> tuple[list[str], int]:
        """A passage's chunk texts and the text tokens not read. The text object itself when it is
        one chunk the encoder reads whole or cuts exactly where we would (at its first C tokens)."""
        size = self.chunk_tokens
        total = len(encoding.ids)
        if cap is not None and cap <= self.max_tokens:  # up to the encoder's own input: one chunk
            cap = min(cap, size)
        budget = min(total, per_doc * size, cap if cap is not None else total)
        if budget == total and total <= size:
            return [text], 0
        n = math.ceil(budget / size)
        if n == 1 and budget == size:  # the encoder's own truncation: leave the text as sent
            return [text], total - budget
        offsets = encoding.offsets
        bounds = []
        start = 0
        for k in range(n):
            left = n - k
            end = budget if left == 1 else start + math.ceil((budget - start) / left)
            if end < total:
                word_start = _word_start(text, offsets, end, start)
                # move back to the word's start unless the word alone is the chunk, or the rest
                # would then no longer fit the chunks left (the last chunk's end may only move back)
                if word_start > start and (left == 1 or budget - word_start <= (left - 1) * size):
                    end = word_start
            bounds.append((start, end))
            start = end
        pieces = [text[offsets[s][0]: offsets[e - 1][1]] for s, e in bounds]
        return pieces, total - bounds[-1][1]


_WORD_BACKOFF = 64  # tokens a chunk may end early to end between words (a longer "word" is split)


def _word_start(text: str, offsets: list[tuple[int, int]], end: int, floor: int) -> int:
    """The nearest token at or before ``end`` (and after ``floor``) that starts a word: whitespace
    before it in the text (or, for tokenizers whose tokens carry their space, at its start).
    ``floor`` when there is none within :data:`_WORD_BACKOFF` tokens."""
    for k in range(end, max(floor, end - _WORD_BACKOFF), -1):
        at = offsets[k][0]
        if (at > 0 and text[at - 1].isspace()) or text[at:at + 1].isspace():
            return k
    return floor
