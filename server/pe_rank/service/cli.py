"""``pe-rank serve``: the ranking service (gRPC pe_rank.v1 and tei.v1; HTTP TEI and Cohere/Jina with
--http-port), with an embedded Triton unless given --triton-url."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from .app import ServiceConfig
from .embedder import EMBEDDING_MODES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pe-rank serve", description=__doc__)
    p.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="exported Triton model repository (default: ./model_repository)")
    p.add_argument("--triton-url", action="append", default=[],
                   help="HOST:PORT of a Triton gRPC endpoint serving the repository; repeat for several. "
                        "Without it an embedded Triton is started on the repository.")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--http-port", type=int, default=None,
                   help="serve the HTTP APIs (TEI POST /rerank, Cohere/Jina POST /v1/rerank and /v2/rerank, "
                        "/health, /info, /openapi.json) on this port; off by default")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--max-passages", type=int, default=1000)
    p.add_argument("--max-concurrent", type=int, default=64,
                   help="requests in flight (all APIs together) before RESOURCE_EXHAUSTED / HTTP 429")
    p.add_argument("--cache-size", type=int, default=10_000, help="embedding LRU entries; 0 disables it")
    p.add_argument("--embeddings", choices=EMBEDDING_MODES, default="exact",
                   help="exact: per window, bit-identical to the reference; cached: per passage, cheaper")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--grace", type=float, default=30.0, help="seconds to drain in-flight requests on SIGTERM")
    return p


def cli_main(argv: list[str]) -> int:
    from ..cli import UserError
    from .server import serve_until_signalled

    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    if not (args.repository / "pe_llm" / "1" / "checkpoint").is_dir():
        raise UserError(f"{args.repository}: not an exported repository; run `pe-rank export --model CKPT "
                        f"--repository {args.repository}` first")
    config = ServiceConfig(
        repository=args.repository, triton_urls=list(args.triton_url), host=args.host, port=args.port,
        max_passages=args.max_passages, max_concurrent=args.max_concurrent, cache_size=args.cache_size,
        embedding_mode=args.embeddings, metrics_port=args.metrics_port, tls_cert=args.tls_cert,
        tls_key=args.tls_key, grace_s=args.grace, http_port=args.http_port,
    )
    if config.triton_urls:
        asyncio.run(serve_until_signalled(config))
        return 0
    from ..triton.embedded import TritonServer

    with TritonServer(args.repository) as triton:
        config.triton_urls = [triton.grpc_url]
        asyncio.run(serve_until_signalled(config))
    return 0
