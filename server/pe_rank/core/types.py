"""Request and result types shared by the CLI, the gRPC server and the ranking core."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

# the encoder reads at most this many tokens of a passage (PE-Rank truncates there)
ENCODER_MAX_TOKENS = 512


class Mode(str, Enum):
    FULL = "full"    # dynamic-constrained decoding, as in the paper
    FIRST = "first"  # order each window by the first step's scores: one prefill, no decode steps
    TEXT = "text"    # text-listwise baseline (RankGPT style, passage texts in the prompt); in-process CLI only


@dataclass(frozen=True)
class Passage:
    id: str
    text: str = ""
    embedding: np.ndarray | None = None  # precomputed encoder embedding [E], optional


@dataclass(frozen=True)
class RerankRequest:
    query: str
    passages: tuple[Passage, ...]
    window_size: int = 20
    stride: int = 10
    mode: Mode = Mode.FULL
    top_n: int | None = None  # None: the whole permutation
    truncate: bool = True
    return_text: bool = False
    prerank: bool | None = None  # order by the encoder's query-passage cosine first; None: the model's default
    depth: int | None = None     # PE-Rank reorders only the top `depth` (0: every passage); None: the model's default
    # long passages (core/chunking.py): chunks per passage (None: the server's default, 10; 1: cut at
    # the encoder's limit) and text tokens read per passage across its chunks (None: no cap)
    max_chunks_per_doc: int | None = None
    max_tokens_per_doc: int | None = None


@dataclass(frozen=True)
class RankOptions:
    window_size: int = 20
    stride: int = 10
    mode: Mode = Mode.FULL
    top_n: int | None = None


@dataclass
class RankStats:
    windows: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0  # of prompt_tokens, taken from the prompt-head cache, not prefilled
    decode_steps: int = 0


@dataclass(frozen=True)
class ChunkStats:
    """What chunking did to a request (core/chunking.py)."""

    chunks: int = 0            # passages ranked: one per passage that fits, one per chunk of a split one
    chunked_passages: int = 0  # passages split into two or more chunks
    tokens_cut: int = 0        # text tokens not read (past max_tokens_per_doc or max_chunks_per_doc chunks)
    cut_passages: int = 0      # passages with tokens cut


@dataclass(frozen=True)
class RankedPassage:
    index: int   # position in the request's passage list
    id: str
    score: float  # 1 / rank: listwise decoding yields an order, not calibrated relevance
    text: str | None = None
    chunk: int = 0  # which of the passage's chunks placed it (0 when it is one chunk)


@dataclass
class Timings:
    queue_ms: float = 0.0
    encode_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    rank_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class RerankResult:
    ranking: list[RankedPassage]
    stats: RankStats
    timings: Timings = field(default_factory=Timings)
    cache_hits: int = 0
    prerank: bool = False  # the candidates were ordered by the encoder cosine first
    depth: int = 0         # passages PE-Rank reordered (the rest kept the pre-rank's order)
    chunking: ChunkStats = field(default_factory=ChunkStats)
