"""Protobuf <-> core types, in one place for the server and the client."""
from __future__ import annotations

import numpy as np

from .types import Mode, Passage, RerankRequest, RerankResult
from ..v1 import ranker_pb2 as pb

_MODES = {pb.MODE_UNSPECIFIED: Mode.FULL, pb.MODE_FULL: Mode.FULL, pb.MODE_FIRST: Mode.FIRST}


def request_from_proto(msg: pb.RerankRequest) -> RerankRequest:
    """Shape only; values are checked by validate_request."""
    from .validation import InvalidRequest

    if msg.mode not in _MODES:
        raise InvalidRequest("mode", f"unknown mode {msg.mode}")
    passages = tuple(
        Passage(id=p.id, text=p.text, embedding=np.asarray(p.embedding, dtype=np.float32) if len(p.embedding) else None)
        for p in msg.passages
    )
    top_n = msg.top_n if msg.HasField("top_n") else None
    return RerankRequest(
        query=msg.query,
        passages=passages,
        window_size=msg.window_size if msg.HasField("window_size") else 20,
        stride=msg.stride if msg.HasField("stride") else 10,
        mode=_MODES[msg.mode],
        top_n=None if top_n == 0 else top_n,
        truncate=msg.truncate if msg.HasField("truncate") else True,
        return_text=msg.return_text,
        prerank=msg.prerank if msg.HasField("prerank") else None,
        depth=msg.depth if msg.HasField("depth") else None,
        max_chunks_per_doc=msg.max_chunks_per_doc if msg.HasField("max_chunks_per_doc") else None,
        max_tokens_per_doc=msg.max_tokens_per_doc if msg.HasField("max_tokens_per_doc") else None,
    )


def request_to_proto(request: RerankRequest) -> pb.RerankRequest:
    msg = pb.RerankRequest(
        query=request.query,
        window_size=request.window_size,
        stride=request.stride,
        mode=pb.MODE_FIRST if request.mode is Mode.FIRST else pb.MODE_FULL,
        return_text=request.return_text,
        truncate=request.truncate,
    )
    if request.top_n is not None:
        msg.top_n = request.top_n
    if request.prerank is not None:
        msg.prerank = request.prerank
    if request.depth is not None:
        msg.depth = request.depth
    if request.max_chunks_per_doc is not None:
        msg.max_chunks_per_doc = request.max_chunks_per_doc
    if request.max_tokens_per_doc is not None:
        msg.max_tokens_per_doc = request.max_tokens_per_doc
    for p in request.passages:
        item = msg.passages.add(id=p.id, text=p.text)
        if p.embedding is not None:
            item.embedding.extend(np.asarray(p.embedding, dtype=np.float32).tolist())
    return msg


def response_to_proto(result: RerankResult, request_id: str) -> pb.RerankResponse:
    t, c = result.timings, result.chunking
    response = pb.RerankResponse(metadata=pb.RerankMetadata(
        windows=result.stats.windows, prompt_tokens=result.stats.prompt_tokens,
        cached_prompt_tokens=result.stats.cached_prompt_tokens,
        decode_steps=result.stats.decode_steps, cache_hits=result.cache_hits, request_id=request_id,
        prerank=result.prerank, depth=result.depth,
        timings=pb.StageTimings(queue_ms=t.queue_ms, encode_ms=t.encode_ms, prefill_ms=t.prefill_ms,
                                decode_ms=t.decode_ms, total_ms=t.total_ms),
        chunks=c.chunks, chunked_passages=c.chunked_passages, tokens_cut=c.tokens_cut, cut_passages=c.cut_passages,
    ))
    for r in result.ranking:
        rank = response.ranks.add(index=r.index, id=r.id, score=r.score, chunk=r.chunk)
        if r.text is not None:
            rank.text = r.text
    return response


def response_to_json(response: pb.RerankResponse) -> dict:
    """The same output JSON as the in-process `pe-rank rerank`."""
    ranking = []
    for r in response.ranks:
        item = {"id": r.id, "index": r.index, "score": r.score}
        if r.HasField("text"):
            item["text"] = r.text
        if r.chunk:
            item["chunk"] = r.chunk
        ranking.append(item)
    m, t = response.metadata, response.metadata.timings
    return {
        "ranking": ranking,
        "metadata": {
            "windows": m.windows, "prompt_tokens": m.prompt_tokens,
            "cached_prompt_tokens": m.cached_prompt_tokens, "decode_steps": m.decode_steps,
            "cache_hits": m.cache_hits, "prerank": m.prerank, "depth": m.depth, "encode_ms": round(t.encode_ms, 3),
            "rank_ms": round(t.prefill_ms + t.decode_ms, 3), "prefill_ms": round(t.prefill_ms, 3),
            "decode_ms": round(t.decode_ms, 3), "queue_ms": round(t.queue_ms, 3),
            "total_ms": round(t.total_ms, 3), "request_id": m.request_id,
            "chunks": m.chunks, "chunked_passages": m.chunked_passages, "tokens_cut": m.tokens_cut,
            "cut_passages": m.cut_passages,
        },
    }
