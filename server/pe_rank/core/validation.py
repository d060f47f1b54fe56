"""Request validation, done once at the edge (CLI, gRPC) before anything is ranked."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from .chunking import DEFAULT_MAX_CHUNKS, validate_chunking
from .errors import InvalidRequest, RequestTooLarge
from .types import Mode, RerankRequest

if TYPE_CHECKING:
    from .prompt import PromptBuilder


@dataclass(frozen=True)
class Limits:
    max_passages: int = 1000
    max_window_size: int = 100
    max_query_chars: int = 4096
    max_text_bytes: int = 8 << 20  # query and passage texts together, UTF-8: bounds the tokenizers' work
    max_chunks: int = DEFAULT_MAX_CHUNKS  # passages ranked after long ones are split (core/chunking.py)


def _utf8_size(text: str) -> int:
    """UTF-8 size without encoding when the text is ASCII (the common case: O(1))."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def validate_request(
    request: RerankRequest,
    embedding_size: int,
    limits: Limits = Limits(),
    token_counts: Callable[[list[str]], list[int]] | None = None,
    max_tokens: int = 512,
    allow_text: bool = False,
    prompts: PromptBuilder | None = None,
) -> None:
    """Raise InvalidRequest for the first problem found; ``token_counts`` checks truncate=false.

    Size limits come first, so a huge request is refused before anything costly (tokenizing).

    ``allow_text``: accept mode ``text`` (the text-listwise baseline), which only the
    in-process CLI runs; the gRPC server refuses it. ``prompts``: build the first window's
    prompt here, so what the prompt builder refuses (a query holding the placeholder token's
    text) is a field error at the edge, not a failure in the middle of ranking.
    """
    if request.mode is Mode.TEXT and not allow_text:
        raise InvalidRequest("mode", "mode text is only available in-process")
    if not request.query.strip():
        raise InvalidRequest("query", "must not be empty")
    if len(request.query) > limits.max_query_chars:
        raise RequestTooLarge("query", f"longer than {limits.max_query_chars} characters")
    n = len(request.passages)
    if n == 0:
        raise InvalidRequest("passages", "at least one passage is required")
    if n > limits.max_passages:
        raise RequestTooLarge("passages", f"{n} passages exceed the limit of {limits.max_passages}")
    text_bytes = _utf8_size(request.query) + sum(_utf8_size(p.text) for p in request.passages)
    if text_bytes > limits.max_text_bytes:
        raise RequestTooLarge("passages", f"{text_bytes} bytes of text exceed the limit of {limits.max_text_bytes}")
    if request.window_size < 2 or request.window_size > limits.max_window_size:
        raise InvalidRequest("window_size", f"must be in [2, {limits.max_window_size}], got {request.window_size}")
    if request.stride < 1 or request.stride >= request.window_size:
        raise InvalidRequest("stride", f"must be in [1, window_size), got {request.stride}")
    if request.top_n is not None and request.top_n < 0:
        raise InvalidRequest("top_n", f"must not be negative, got {request.top_n}")
    if request.depth is not None and request.depth < 0:
        raise InvalidRequest("depth", f"must not be negative (0: rerank every passage), got {request.depth}")
    validate_chunking(request)
    seen: dict[str, int] = {}
    for i, passage in enumerate(request.passages):
        if passage.id in seen:
            raise InvalidRequest(f"passages[{i}].id", f"duplicate id {passage.id!r} (also passages[{seen[passage.id]}])")
        seen[passage.id] = i
        if request.mode is Mode.TEXT and not passage.text.strip():
            raise InvalidRequest(f"passages[{i}].text", "must not be empty in mode text (embeddings are not used)")
        if passage.embedding is None:
            if not passage.text.strip():
                raise InvalidRequest(f"passages[{i}].text", "must not be empty (or give an embedding)")
            continue
        emb = np.asarray(passage.embedding)
        if emb.shape != (embedding_size,):
            raise InvalidRequest(
                f"passages[{i}].embedding", f"has {emb.size} values, the encoder's size is {embedding_size}"
            )
        if not np.all(np.isfinite(emb)):
            raise InvalidRequest(f"passages[{i}].embedding", "contains NaN or Inf")
    if not request.truncate and token_counts is not None:
        texts = [(i, p.text) for i, p in enumerate(request.passages) if p.embedding is None]
        for (i, _), count in zip(texts, token_counts([t for _, t in texts])):
            if count > max_tokens:
                raise RequestTooLarge(
                    f"passages[{i}].text", f"is over the {max_tokens} limit of encoder tokens (truncate=false)"
                )
    if prompts is not None and request.mode is not Mode.TEXT:
        try:
            prompts.build(request.query, min(request.window_size, n))
        except ValueError as exc:
            raise InvalidRequest("query", str(exc)) from None
