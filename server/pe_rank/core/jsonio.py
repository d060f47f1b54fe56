"""The request/response JSON of ``pe-rank rerank`` (same for in-process and --server)."""
from __future__ import annotations

from typing import Any

import numpy as np

from .types import Mode, Passage, RerankRequest, RerankResult
from .validation import InvalidRequest


def _typed(obj: dict, key: str, kind: type | tuple[type, ...], default: Any, where: str = "") -> Any:
    value = obj.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) and kind is int or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InvalidRequest(f"{where}{key}", f"must be {names}, got {type(value).__name__}")
    return value


def parse_request(obj: Any) -> RerankRequest:
    """Build a RerankRequest from JSON; shape and type errors name the field."""
    if not isinstance(obj, dict):
        raise InvalidRequest("request", "must be a JSON object")
    passages_json = _typed(obj, "passages", list, [])
    passages = []
    for i, p in enumerate(passages_json):
        if not isinstance(p, dict):
            raise InvalidRequest(f"passages[{i}]", "must be an object with id and text")
        where = f"passages[{i}]."
        pid = p.get("id", str(i))
        if not isinstance(pid, (str, int)) or isinstance(pid, bool):
            raise InvalidRequest(f"{where}id", "must be a string")
        embedding = p.get("embedding")
        if embedding is not None:
            try:
                embedding = np.asarray(embedding, dtype=np.float32)
            except (TypeError, ValueError):
                raise InvalidRequest(f"{where}embedding", "must be a list of numbers") from None
            if embedding.ndim != 1:
                raise InvalidRequest(f"{where}embedding", "must be a flat list of numbers")
        passages.append(Passage(id=str(pid), text=_typed(p, "text", str, "", where), embedding=embedding))
    mode = _typed(obj, "mode", str, "full")
    try:
        mode_enum = Mode(mode.lower())
    except ValueError:
        raise InvalidRequest("mode", f"must be 'full', 'first' or 'text', got {mode!r}") from None
    top_n = _typed(obj, "top_n", int, None)
    return RerankRequest(
        query=_typed(obj, "query", str, ""),
        passages=tuple(passages),
        window_size=_typed(obj, "window_size", int, 20),
        stride=_typed(obj, "stride", int, 10),
        mode=mode_enum,
        top_n=None if top_n == 0 else top_n,  # 0 and null both mean "the whole permutation"
        truncate=_typed(obj, "truncate", bool, True),
        return_text=_typed(obj, "return_text", bool, False),
        prerank=_typed(obj, "prerank", bool, None),  # null or absent: the model's default
        depth=_typed(obj, "depth", int, None),
        max_chunks_per_doc=_typed(obj, "max_chunks_per_doc", int, None),  # null: the default (10)
        max_tokens_per_doc=_typed(obj, "max_tokens_per_doc", int, None),
    )


def result_to_json(result: RerankResult) -> dict[str, Any]:
    ranking = []
    for r in result.ranking:
        item: dict[str, Any] = {"id": r.id, "index": r.index, "score": r.score}
        if r.text is not None:
            item["text"] = r.text
        if r.chunk:
            item["chunk"] = r.chunk
        ranking.append(item)
    t, c = result.timings, result.chunking
    return {
        "ranking": ranking,
        "metadata": {
            "windows": result.stats.windows,
            "prompt_tokens": result.stats.prompt_tokens,
            "cached_prompt_tokens": result.stats.cached_prompt_tokens,
            "decode_steps": result.stats.decode_steps,
            "cache_hits": result.cache_hits,
            "prerank": result.prerank,
            "depth": result.depth,
            "encode_ms": round(t.encode_ms, 3),
            "rank_ms": round(t.rank_ms, 3),
            "prefill_ms": round(t.prefill_ms, 3),
            "decode_ms": round(t.decode_ms, 3),
            "total_ms": round(t.total_ms, 3),
            "chunks": c.chunks,
            "chunked_passages": c.chunked_passages,
            "tokens_cut": c.tokens_cut,
            "cut_passages": c.cut_passages,
        },
    }


def format_table(output: dict[str, Any], request: RerankRequest) -> str:
    """A readable ranking table from the output JSON."""
    lines = [f"{'rank':>4}  {'score':>6}  {'index':>5}  {'id':<14} text"]
    for rank, item in enumerate(output["ranking"], 1):
        text = request.passages[item["index"]].text.replace("\n", " ")
        text = text[:70] + ("..." if len(text) > 70 else "")
        lines.append(f"{rank:>4}  {item['score']:>6.3f}  {item['index']:>5}  {item['id']:<14} {text}")
    m = output["metadata"]
    lines.append(
        f"windows={m['windows']} prompt_tokens={m['prompt_tokens']} decode_steps={m['decode_steps']} "
        f"encode_ms={m['encode_ms']:.1f} rank_ms={m['rank_ms']:.1f}"
    )
    if m.get("chunked_passages") or m.get("tokens_cut"):
        lines.append(f"long passages: {m['chunked_passages']} ranked as chunks ({m['chunks']} passages ranked), "
                     f"{m['tokens_cut']} tokens not read in {m['cut_passages']}")
    return "\n".join(lines)
