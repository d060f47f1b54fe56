"""``pe-rank serve``: the ranking service (gRPC pe_rank.v1 and tei.v1; HTTP TEI and Cohere/Jina with
--http-port), with an embedded Triton unless given --triton-url."""
from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from ..core.chunking import DEFAULT_MAX_CHUNKS, DEFAULT_MAX_CHUNKS_PER_DOC, MAX_CHUNKS_PER_DOC
from ..core.embeddings import EMBEDDING_MODES
from .app import ServiceConfig
from ..core.errors import UserError


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
                   help="serve the HTTP APIs (TEI and vLLM POST /rerank, Cohere/Jina POST /v1/rerank and /v2/rerank, "
                        "Infinity POST /infinity/rerank, NVIDIA NIM POST /v1/ranking, GET /v1/models, /health, "
                        "/info, /openapi.json) on this port; off by default")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus /metrics port")
    p.add_argument("--max-passages", type=int, default=1000)
    chunks = p.add_argument_group("long passages, ranked as chunks of at most 512 encoder tokens")
    chunks.add_argument("--max-chunks-per-doc", type=int, default=DEFAULT_MAX_CHUNKS_PER_DOC,
                        help="chunks of one passage when the request does not say (Cohere's max_chunks_per_doc); "
                             f"1: cut at the encoder's limit, as the reference (default {DEFAULT_MAX_CHUNKS_PER_DOC})")
    chunks.add_argument("--max-chunks", type=int, default=DEFAULT_MAX_CHUNKS,
                        help=f"passages ranked per request once long ones are split (default {DEFAULT_MAX_CHUNKS})")
    adm = p.add_argument_group("admission (all APIs together; size them with `pe-rank bench`)")
    adm.add_argument("--max-concurrent", type=int, default=8,
                     help="requests ranked at once (default 8)")
    adm.add_argument("--max-queued", type=int, default=16,
                     help="requests waiting for a slot; more get RESOURCE_EXHAUSTED / HTTP 429 at once (default 16)")
    adm.add_argument("--max-queue-wait", type=float, default=2.0,
                     help="seconds a request may wait for a slot; a longer (estimated or actual) wait is "
                          "RESOURCE_EXHAUSTED / 429 with a retry hint (default 2)")
    adm.add_argument("--max-request-time", type=float, default=60.0,
                     help="server-side limit on a request's seconds, queue included: DEADLINE_EXCEEDED / 504 "
                          "(default 60; 0: none)")
    adm.add_argument("--max-text-mb", type=float, default=8.0,
                     help="MiB of query and passage text (UTF-8) per request; more is refused before any "
                          "tokenizing (default 8)")
    p.add_argument("--cache-size", type=int, default=10_000, help="embedding LRU entries; 0 disables it")
    p.add_argument("--embeddings", choices=EMBEDDING_MODES, default="exact",
                   help="exact: per window, bit-identical to the reference; cached: per passage, cheaper")
    p.add_argument("--tls-cert", type=Path, help="server certificate (PEM): serve TLS")
    p.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    p.add_argument("--tls-client-ca", type=Path,
                   help="CA (PEM) that signs client certificates: require mutual TLS (needs --tls-cert/--tls-key)")
    p.add_argument("--api-key-file", type=Path,
                   help="file with one API key per line: calls need 'authorization: Bearer KEY' "
                        "(health and reflection stay open)")
    p.add_argument("--grace", type=float, default=30.0, help="seconds to drain in-flight requests on SIGTERM")
    sup = p.add_argument_group("embedded Triton supervision (without --triton-url)")
    sup.add_argument("--triton-max-failures", type=int, default=5,
                     help="exit with code 69 after this many Triton failures in a row (default 5)")
    sup.add_argument("--triton-backoff", type=float, default=1.0,
                     help="seconds before the first restart; doubles per failure up to 30 s (default 1)")
    sup.add_argument("--triton-stable", type=float, default=60.0,
                     help="a Triton up this many seconds resets the failure count (default 60)")
    return p


def _auth_options(args: argparse.Namespace):
    from .auth import ApiKeys, AuthConfigError, AuthOptions

    if args.tls_client_ca and not args.tls_cert:
        raise UserError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
    if args.tls_client_ca and not args.tls_client_ca.is_file():
        raise UserError(f"--tls-client-ca {args.tls_client_ca}: no such file")
    try:
        keys = ApiKeys.from_file(args.api_key_file) if args.api_key_file else None
    except AuthConfigError as exc:
        raise UserError(f"--api-key-file {exc}") from None
    return AuthOptions(api_keys=keys, client_ca=args.tls_client_ca, api_key_file=args.api_key_file)


def cli_main(argv: list[str]) -> int:
    from .server import serve_until_signalled

    args = build_parser().parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("--tls-cert and --tls-key go together")
    if args.max_concurrent < 1 or args.max_queued < 0 or args.max_queue_wait < 0 or args.max_request_time < 0 \
            or args.max_text_mb <= 0:
        raise UserError("--max-concurrent must be >= 1; --max-queued, --max-queue-wait and --max-request-time >= 0; "
                        "--max-text-mb > 0")
    if not 1 <= args.max_chunks_per_doc <= MAX_CHUNKS_PER_DOC or args.max_chunks < args.max_passages:
        raise UserError(f"--max-chunks-per-doc must be in [1, {MAX_CHUNKS_PER_DOC}]; --max-chunks at least "
                        f"--max-passages ({args.max_passages})")
    if args.triton_max_failures < 1 or args.triton_backoff < 0 or args.triton_stable < 0:
        raise UserError("--triton-max-failures must be >= 1, --triton-backoff and --triton-stable >= 0")
    auth = _auth_options(args)
    if not (args.repository / "pe_llm" / "1" / "checkpoint").is_dir():
        raise UserError(f"{args.repository}: not an exported repository; run `pe-rank export --model CKPT "
                        f"--repository {args.repository}` first")
    config = ServiceConfig(
        repository=args.repository, triton_urls=list(args.triton_url), host=args.host, port=args.port,
        max_passages=args.max_passages, max_concurrent=args.max_concurrent, max_queued=args.max_queued,
        max_queue_wait_s=args.max_queue_wait, max_request_s=args.max_request_time,
        max_text_bytes=int(args.max_text_mb * (1 << 20)), cache_size=args.cache_size,
        embedding_mode=args.embeddings, metrics_port=args.metrics_port, tls_cert=args.tls_cert,
        tls_key=args.tls_key, grace_s=args.grace, http_port=args.http_port,
        max_chunks_per_doc=args.max_chunks_per_doc, max_chunks=args.max_chunks,
    )
    if config.triton_urls:
        from .pool import balanced_target

        try:
            balanced_target(config.triton_urls)  # several host names: one line, before anything starts
        except ValueError as exc:
            raise UserError(str(exc)) from None
        return asyncio.run(serve_until_signalled(config, auth))
    from .embedded_triton import TritonServer, TritonStartError, TritonSupervisor

    # a server that authenticates its callers locks its Triton too: mutual TLS only this process holds
    triton = TritonServer(args.repository, locked=auth.enabled)
    supervisor = TritonSupervisor(triton, max_failures=args.triton_max_failures,
                                  backoff_s=args.triton_backoff, stable_s=args.triton_stable)
    try:
        supervisor.start()
    except TritonStartError as exc:
        raise UserError(str(exc)) from None
    try:
        config.triton_urls = [supervisor.grpc_url]
        config.triton_credentials = triton.credentials
        config.triton_metrics_port = triton.metrics_port

        def watch_fatal(report) -> None:
            supervisor.on_give_up = report
            if supervisor.gave_up:  # gave up before we were listening
                report(supervisor.gave_up)

        return asyncio.run(serve_until_signalled(config, auth, watch_fatal))
    finally:
        supervisor.stop()
