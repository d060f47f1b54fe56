"""Prometheus metrics, named like Text Embeddings Inference's where they mean the same."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STAGES = ("queue", "encode", "prefill", "decode", "total")


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("pe_rank_requests", "Rerank requests by gRPC status", ["status"], registry=r)
        self.latency = Histogram("pe_rank_request_duration_seconds",
                                 "Rerank latency by stage (queue: waiting for a slot)", ["stage"],
                                 buckets=_BUCKETS, registry=r)
        self.passages = Counter("pe_rank_passages", "Passages received in Rerank requests", registry=r)
        self.decode_steps = Counter("pe_rank_decode_steps", "LLM decode steps run", registry=r)
        self.prompt_tokens = Counter("pe_rank_prompt_tokens", "Prompt tokens of the ranking windows", registry=r)
        self.cached_prompt_tokens = Counter("pe_rank_prompt_tokens_cached",
                                            "Prompt tokens taken from the prompt-head cache, not prefilled", registry=r)
        self.windows = Counter("pe_rank_windows", "Ranking windows run", registry=r)
        self.chunked = Counter("pe_rank_chunked_passages", "Passages over the encoder's limit ranked as chunks",
                               registry=r)
        self.tokens_cut = Counter("pe_rank_passage_tokens_cut",
                                  "Passage text tokens not read (past max_tokens_per_doc or max_chunks_per_doc)",
                                  registry=r)
        self.cache_hits = Counter("pe_rank_embedding_cache_hits", "Passages embedded from the cache", registry=r)
        self.unauthenticated = Counter("pe_rank_unauthenticated_requests",
                                       "Calls refused with UNAUTHENTICATED, by reason (missing or invalid API key)",
                                       ["reason"], registry=r)
        self.running = Gauge("pe_rank_requests_in_flight", "Rerank requests being ranked (holding a slot)", registry=r)
        self.queued = Gauge("pe_rank_requests_queued", "Rerank requests waiting for a slot", registry=r)

    def observe(self, result) -> None:
        t = result.timings
        for stage, ms in zip(STAGES, (t.queue_ms, t.encode_ms, t.prefill_ms, t.decode_ms, t.total_ms)):
            self.latency.labels(stage).observe(ms / 1e3)
        self.decode_steps.inc(result.stats.decode_steps)
        self.prompt_tokens.inc(result.stats.prompt_tokens)
        self.cached_prompt_tokens.inc(result.stats.cached_prompt_tokens)
        self.windows.inc(result.stats.windows)
        self.cache_hits.inc(result.cache_hits)
        self.chunked.inc(result.chunking.chunked_passages)
        self.tokens_cut.inc(result.chunking.tokens_cut)
