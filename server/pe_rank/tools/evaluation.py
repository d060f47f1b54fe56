"""``pe-rank eval``: rerank a first-stage run (RankLLM JSON) and score it against TREC qrels.

The input is RankLLM's retrieval JSON, a list of ``{"query", "hits": [{"content", "qid",
"docid", "rank", "score"}]}`` (optionally gzipped). For every query the top-k hits are
reranked, in this process (``--model``) or through a running server (``--server``). The
output is a TREC run file (``qid Q0 docid rank score tag``), its per-query metrics next to
it (``RUN.per_query.tsv``) and a summary: NDCG@10, RR@10 (MRR@10) and R@20 computed with
ir-measures, for the reranker and, on the same queries and the same top-k, for the
first-stage order.
"""
from __future__ import annotations

import gzip
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from ..core.types import Mode, Passage, RerankRequest
from ..core.errors import UserError

class EvalError(UserError):
    """A bad input file or option; printed as one ``error:`` line by the CLI."""


# ---- inputs


@dataclass(frozen=True)
class Hit:
    docid: str
    content: str


@dataclass(frozen=True)
class Query:
    qid: str
    text: str
    hits: tuple[Hit, ...]  # first-stage order


def load_rankllm(path: Path) -> list[Query]:
    """RankLLM retrieval JSON (``.json`` or ``.json.gz``); hits keep the file's order."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, EOFError, UnicodeDecodeError) as exc:
        raise EvalError(f"{path}: {exc}") from None
    if not isinstance(data, list):
        raise EvalError(f"{path}: expected a JSON list of {{query, hits}} objects")
    queries: list[Query] = []
    for i, item in enumerate(data):
        where = f"{path}: [{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("query"), str) or not isinstance(item.get("hits"), list):
            raise EvalError(f"{where}: expected an object with a string 'query' and a list 'hits'")
        hits: list[Hit] = []
        seen: set[str] = set()
        qid = item.get("qid")
        for j, h in enumerate(item["hits"]):
            if not isinstance(h, dict) or "docid" not in h or not isinstance(h.get("content"), str):
                raise EvalError(f"{where}.hits[{j}]: expected an object with 'docid' and string 'content'")
            qid = h.get("qid", qid) if qid is None else qid
            docid = str(h["docid"])
            if docid not in seen:  # the ranking service needs unique ids; keep the first occurrence
                seen.add(docid)
                hits.append(Hit(docid, h["content"]))
        if qid is None:
            raise EvalError(f"{where}: no 'qid' (neither on the query nor on its hits)")
        queries.append(Query(str(qid), item["query"], tuple(hits)))
    return queries


def to_request(query: Query, top_k: int, **options: Any) -> RerankRequest:
    """The request that reranks a query's first-stage top-k (shared by eval and bench)."""
    return RerankRequest(query=query.text, passages=tuple(Passage(h.docid, h.content) for h in query.hits[:top_k]),
                         **options)


def load_qrels(path: Path) -> dict[str, dict[str, int]]:
    import ir_measures

    try:
        qrels: dict[str, dict[str, int]] = {}
        for q in ir_measures.read_trec_qrels(str(path)):
            qrels.setdefault(q.query_id, {})[q.doc_id] = int(q.relevance)
    except (OSError, ValueError, IndexError) as exc:
        raise EvalError(f"{path}: not a TREC qrels file ({exc})") from None
    if not qrels:
        raise EvalError(f"{path}: no judgements")
    return qrels


# ---- measures and run files


REPORTED = ("nDCG@10", "RR@10", "R@20")  # names in tables and JSON, whatever binary_rel is


def measures(binary_rel: int = 2) -> list:
    """NDCG@10, RR@10 and R@20; ``binary_rel`` is the least relevance RR and R count (DL19/20: 2)."""
    from ir_measures import R, RR, nDCG

    if binary_rel == 1:
        return [nDCG @ 10, RR @ 10, R @ 20]
    return [nDCG @ 10, RR(rel=binary_rel) @ 10, R(rel=binary_rel) @ 20]


def run_dict(rankings: dict[str, list[str]]) -> dict[str, dict[str, float]]:
    """Order -> scores 1/rank (strictly decreasing, so every evaluator keeps the order)."""
    return {qid: {docid: 1.0 / rank for rank, docid in enumerate(docids, 1)} for qid, docids in rankings.items()}


def write_run(path: Path, rankings: dict[str, list[str]], tag: str) -> None:
    """TREC run: ``qid Q0 docid rank score tag``, score 1/rank."""
    with open(path, "w") as f:
        for qid, docids in rankings.items():
            for rank, docid in enumerate(docids, 1):
                f.write(f"{qid} Q0 {docid} {rank} {1.0 / rank:.10g} {tag}\n")


def score(qrels: dict[str, dict[str, int]], rankings: dict[str, list[str]], binary_rel: int = 2
          ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(mean over the ranked queries that have judgements, per-query values) by measure name."""
    import ir_measures

    ms = measures(binary_rel)
    name = {str(m): short for m, short in zip(ms, REPORTED)}
    # only the ranked queries: ir-measures would otherwise average over every judged query
    judged = {qid: qrels[qid] for qid in rankings if qid in qrels}
    if not judged:
        return {short: 0.0 for short in REPORTED}, {}
    run = run_dict({qid: docids for qid, docids in rankings.items() if qid in judged})
    evaluator = ir_measures.evaluator(ms, judged)
    per_query: dict[str, dict[str, float]] = {qid: {} for qid in rankings if qid in judged}
    for metric in evaluator.iter_calc(run):
        per_query[metric.query_id][name[str(metric.measure)]] = float(metric.value)
    means = {str(m): float(v) for m, v in evaluator.calc_aggregate(run).items()}
    return {name[str(m)]: means[str(m)] for m in ms}, per_query


# ---- rankers


@dataclass
class Ranked:
    order: list[int]  # indices into the passages given, best first (possibly only the top-n)
    metadata: dict[str, Any] = field(default_factory=dict)


class Target(Protocol):
    description: str

    def rank(self, request: RerankRequest) -> Ranked: ...

    def close(self) -> None: ...


class InProcessTarget:
    """Ranks in this process (PE-Rank modes through the Reranker, mode text through the baseline)."""

    def __init__(self, folder: Path, dtype: str = "float32") -> None:
        from ..runtime.inprocess import load_ranker

        self.ranker = load_ranker(folder, dtype=dtype)
        self.description = str(folder)

    def rank(self, request: RerankRequest) -> Ranked:
        from ..core.jsonio import result_to_json

        result = self.ranker.rank_sync(request)
        return Ranked([r.index for r in result.ranking], result_to_json(result)["metadata"])

    def close(self) -> None:
        pass


class RemoteTarget:
    """Ranks through a running ``pe-rank serve``."""

    def __init__(self, server: str, timeout: float | None = None) -> None:
        import grpc

        from ..client import RankerClient, RankerError

        self.client = RankerClient(server)
        self.timeout = timeout
        try:
            info = self.client.model_info(timeout=30)
        except grpc.RpcError as exc:
            self.client.close()
            raise RankerError(exc, server) from None
        self.description = f"{server} ({info.llm})"

    def rank(self, request: RerankRequest) -> Ranked:
        import grpc

        from ..client import RankerError
        from ..core.proto import response_to_json

        try:
            response = self.client.rerank(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise RankerError(exc) from None
        return Ranked([r.index for r in response.ranks], response_to_json(response)["metadata"])

    def close(self) -> None:
        self.client.close()


# ---- the evaluation


@dataclass
class EvalOptions:
    top_k: int = 100
    mode: Mode = Mode.FULL
    top_n: int | None = None
    window_size: int = 20
    stride: int = 10
    max_queries: int | None = None
    binary_rel: int = 2
    tag: str | None = None
    prerank: bool | None = None  # None: the model's default
    depth: int | None = None     # None: the model's default; 0: every passage


@dataclass
class EvalReport:
    metrics: dict[str, float]
    first_stage: dict[str, float]
    per_query: dict[str, dict[str, float]]
    first_stage_per_query: dict[str, dict[str, float]]
    queries: int
    judged_queries: int
    latency_ms: dict[str, float]
    costs: dict[str, float]
    model: str
    mode: str
    options: EvalOptions
    run: Path
    per_query_file: Path
    wall_s: float

    def to_json(self) -> dict[str, Any]:
        o = self.options
        return {
            "metrics": {k: round(v, 4) for k, v in self.metrics.items()},
            "first_stage": {k: round(v, 4) for k, v in self.first_stage.items()},
            "queries": self.queries,
            "judged_queries": self.judged_queries,
            "mean_latency_ms": round(self.latency_ms["mean"], 1),
            "latency_ms": {k: round(v, 1) for k, v in self.latency_ms.items()},
            "mean_per_query": {k: round(v, 1) for k, v in self.costs.items()},
            "model": self.model,
            "mode": self.mode,
            "top_k": o.top_k, "top_n": o.top_n, "window_size": o.window_size, "stride": o.stride,
            "run": str(self.run),
            "per_query": str(self.per_query_file),
            "wall_s": round(self.wall_s, 1),
        }


def rerank_order(query: Query, ranked: Ranked, top_k: int) -> list[str]:
    """The run for one query: reranked passages first, then the rest of the top-k in first-stage order."""
    hits = query.hits[:top_k]
    head = list(dict.fromkeys(ranked.order))
    if any(not 0 <= i < len(hits) for i in head):
        raise EvalError(f"query {query.qid}: the ranker returned an index outside [0, {len(hits)})")
    chosen = set(head)
    return [hits[i].docid for i in head] + [h.docid for i, h in enumerate(hits) if i not in chosen]


def evaluate(target: Target, queries: Sequence[Query], qrels: dict[str, dict[str, int]], output: Path,
             options: EvalOptions, progress: bool = True) -> EvalReport:
    from tqdm import tqdm

    from ..core.validation import InvalidRequest

    if options.max_queries is not None:
        queries = list(queries)[: options.max_queries]
    queries = [q for q in queries if q.hits]
    if not queries:
        raise EvalError("no query with hits to rerank")
    t_start = time.perf_counter()
    reranked: dict[str, list[str]] = {}
    first: dict[str, list[str]] = {}
    latencies: list[float] = []
    costs = {"windows": 0.0, "prompt_tokens": 0.0, "decode_steps": 0.0, "prerank": 0.0, "depth": 0.0}
    bar = tqdm(queries, desc=f"rerank {options.mode.value}", unit="query", file=sys.stderr, disable=not progress)
    for query in bar:
        hits = query.hits[: options.top_k]
        request = to_request(query, options.top_k, window_size=options.window_size, stride=options.stride,
                             mode=options.mode, top_n=options.top_n, prerank=options.prerank, depth=options.depth)
        t0 = time.perf_counter()
        try:
            ranked = target.rank(request)
        except InvalidRequest as exc:
            raise EvalError(f"query {query.qid}: {exc}") from None
        latencies.append((time.perf_counter() - t0) * 1e3)
        for key in costs:
            costs[key] += float(ranked.metadata.get(key, 0))
        reranked[query.qid] = rerank_order(query, ranked, options.top_k)
        first[query.qid] = [h.docid for h in hits]
        bar.set_postfix(ms=f"{latencies[-1]:.0f}")
    bar.close()
    wall_s = time.perf_counter() - t_start

    tag = options.tag or f"pe_rank_{options.mode.value}"
    output.parent.mkdir(parents=True, exist_ok=True)
    write_run(output, reranked, tag)
    metrics, per_query = score(qrels, reranked, options.binary_rel)
    first_metrics, first_per_query = score(qrels, first, options.binary_rel)
    per_query_file = output.with_name(output.name + ".per_query.tsv")
    write_per_query(per_query_file, list(metrics), per_query, first_per_query,
                    dict(zip([q.qid for q in queries], latencies)))
    ordered = sorted(latencies)
    latency = {"mean": sum(latencies) / len(latencies), "p50": ordered[len(ordered) // 2], "max": ordered[-1]}
    return EvalReport(
        metrics=metrics, first_stage=first_metrics, per_query=per_query, first_stage_per_query=first_per_query,
        queries=len(queries), judged_queries=len(per_query), latency_ms=latency,
        costs={k: v / len(queries) for k, v in costs.items()}, model=target.description, mode=options.mode.value,
        options=options, run=output, per_query_file=per_query_file, wall_s=wall_s,
    )


def write_per_query(path: Path, names: list[str], per_query: dict[str, dict[str, float]],
                    first_stage: dict[str, dict[str, float]], latency_ms: dict[str, float]) -> None:
    """One row per judged query: the reranker's values, then the first stage's, then the latency."""
    with open(path, "w") as f:
        f.write("\t".join(["qid", *names, *(f"first_stage_{n}" for n in names), "latency_ms"]) + "\n")
        for qid, values in per_query.items():
            row = [qid, *(f"{values.get(n, 0.0):.4f}" for n in names),
                   *(f"{first_stage.get(qid, {}).get(n, 0.0):.4f}" for n in names), f"{latency_ms.get(qid, 0.0):.1f}"]
            f.write("\t".join(row) + "\n")


def format_report(report: EvalReport) -> str:
    names = list(report.metrics)
    width = max(12, *(len(n) + 2 for n in names))
    o = report.options
    lines = [
        f"model {report.model}  mode {report.mode}  top-k {o.top_k}"
        + (f"  top-n {o.top_n}" if o.top_n else "") + f"  window {o.window_size}/{o.stride}",
        f"{'':<14}" + "".join(f"{n:>{width}}" for n in names),
        f"{'first stage':<14}" + "".join(f"{report.first_stage[n]:>{width}.4f}" for n in names),
        f"{'reranked':<14}" + "".join(f"{report.metrics[n]:>{width}.4f}" for n in names),
        f"queries={report.queries} judged={report.judged_queries} "
        f"latency_ms mean={report.latency_ms['mean']:.1f} p50={report.latency_ms['p50']:.1f} "
        f"max={report.latency_ms['max']:.1f} wall_s={report.wall_s:.1f}",
        "per query: " + " ".join(f"{k}={v:.1f}" for k, v in report.costs.items()),
        f"run: {report.run}  per-query: {report.per_query_file}",
    ]
    return "\n".join(lines)


def make_target(model: Path | None, server: str | None, dtype: str = "float32",
                timeout: float | None = None) -> Target:
    if model is not None:
        return InProcessTarget(model, dtype)
    assert server is not None
    return RemoteTarget(server, timeout)


def check_options(options: EvalOptions, remote: bool) -> None:
    if options.top_k < 1:
        raise EvalError(f"--top-k must be at least 1, got {options.top_k}")
    if options.top_n is not None and options.top_n < 0:
        raise EvalError(f"--top-n must not be negative, got {options.top_n}")
    if options.max_queries is not None and options.max_queries < 1:
        raise EvalError(f"--max-queries must be at least 1, got {options.max_queries}")
    if options.binary_rel < 1:
        raise EvalError(f"--binary-rel must be at least 1, got {options.binary_rel}")
    if options.depth is not None and options.depth < 0:
        raise EvalError(f"--depth must not be negative (0: every passage), got {options.depth}")
    if remote and options.mode is Mode.TEXT:
        raise EvalError("mode text is only available in-process (use --model)")

