"""``pe-rank``: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are never downloaded at run time

from .core.errors import InvalidRequest, UserError  # noqa: E402  (after the environment is set)


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="build a checkpoint in the released PE-Rank layout")
    p.add_argument("kind", choices=["tiny", "demo"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0, help="random projector seed (tiny, and demo --untrained)")
    p.add_argument("--untrained", action="store_true",
                   help="demo: random projector, LLM as released (default: the shipped trained projector and adapter)")
    p.set_defaults(func=cmd_make_model)


def cmd_make_model(args: argparse.Namespace) -> int:
    if args.kind == "tiny":
        from .models.tiny import make_tiny

        path = make_tiny(args.out, seed=args.seed)
    else:
        from .models.demo import make_demo

        path = make_demo(args.out, seed=args.seed, trained=not args.untrained)
    print(f"wrote {args.kind} checkpoint to {path}")
    return 0


def _add_rerank(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rerank", help="rerank one request (REQ.json) in-process or through a server")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="checkpoint folder: rank in this process")
    where.add_argument("--server", help="HOST:PORT of a running `pe-rank serve`")
    p.add_argument("--input", required=True, type=Path, help="request JSON")
    p.add_argument("--output", type=Path, help="write the output JSON here")
    p.add_argument("--json", action="store_true", help="print the output JSON instead of a table")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    conn = p.add_argument_group("connection to --server")
    conn.add_argument("--api-key-file", type=Path, help="send the first key in this file as 'authorization: Bearer'")
    conn.add_argument("--tls-ca", type=Path, help="CA certificate (PEM) of the server: connect with TLS")
    conn.add_argument("--tls-client-cert", type=Path, help="client certificate (PEM) for mutual TLS")
    conn.add_argument("--tls-client-key", type=Path, help="client private key (PEM) for mutual TLS")
    p.set_defaults(func=cmd_rerank)


def cmd_rerank(args: argparse.Namespace) -> int:
    from .core.jsonio import format_table, parse_request

    try:
        raw = json.loads(args.input.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{args.input}: {exc}") from None
    request = parse_request(raw)
    output = _rerank_in_process(args, request) if args.model else _rerank_remote(args, request)
    text = json.dumps(output, indent=2, ensure_ascii=False)
    if args.output:
        args.output.write_text(text + "\n")
    if args.json:
        print(text)
    elif not args.output:
        print(format_table(output, request))
    return 0


def _rerank_in_process(args: argparse.Namespace, request) -> dict:
    from .core.jsonio import result_to_json
    from .runtime.inprocess import load_ranker

    return result_to_json(load_ranker(args.model, dtype=args.dtype).rank_sync(request))


def _rerank_remote(args: argparse.Namespace, request) -> dict:
    from .core.types import Mode

    if request.mode is Mode.TEXT:  # the protocol has no such mode: refuse instead of running "full"
        raise InvalidRequest("mode", "mode text is only available in-process")
    from .client import rerank_json

    return rerank_json(args.server, request, **_connection(args))


def _connection(args: argparse.Namespace) -> dict:
    """RankerClient keyword arguments from the --api-key-file / --tls-* flags."""
    from .client import read_api_key

    if bool(args.tls_client_cert) != bool(args.tls_client_key):
        raise UserError("--tls-client-cert and --tls-client-key go together")
    for flag in ("api_key_file", "tls_ca", "tls_client_cert", "tls_client_key"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise UserError(f"--{flag.replace('_', '-')} {path}: no such file")
    try:
        api_key = read_api_key(args.api_key_file) if args.api_key_file else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return dict(root_cert=args.tls_ca, api_key=api_key, client_cert=args.tls_client_cert,
                client_key=args.tls_client_key)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="rerank a first-stage run (RankLLM JSON) and score it against qrels")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--model", type=Path, help="checkpoint folder: rank in this process")
    where.add_argument("--server", help="HOST:PORT of a running `pe-rank serve`")
    p.add_argument("--data", required=True, type=Path, help="RankLLM retrieval JSON (.json or .json.gz)")
    p.add_argument("--qrels", required=True, type=Path, help="TREC qrels file")
    p.add_argument("--output", required=True, type=Path, help="TREC run file to write (metrics go to RUN.per_query.tsv)")
    p.add_argument("--top-k", type=int, default=100, help="rerank the first K hits of each query (default 100)")
    p.add_argument("--mode", default="full", choices=["full", "first", "text"],
                   help="full: PE-Rank; first: first-step order; text: text-listwise baseline (in-process only)")
    p.add_argument("--top-n", type=int, default=None, help="only the top N need to be exact (partial decoding)")
    p.add_argument("--window-size", type=int, default=20)
    p.add_argument("--stride", type=int, default=10)
    p.add_argument("--prerank", choices=["on", "off"], default=None,
                   help="order the candidates by the encoder's cosine first (default: the model's, its ranking.json)")
    p.add_argument("--depth", type=int, default=None,
                   help="PE-Rank reorders only the top DEPTH (0: all; default: the model's)")
    p.add_argument("--max-queries", type=int, default=None, help="evaluate only the first N queries")
    p.add_argument("--binary-rel", type=int, default=2,
                   help="least relevance that RR and R count as relevant (default 2, the TREC DL passage convention; nDCG uses the graded labels)")
    p.add_argument("--tag", help="run tag (default pe_rank_MODE)")
    p.add_argument("--timeout", type=float, default=None, help="per-query deadline in seconds (--server)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads for --model (default: torch's; 1 is faster on a busy shared CPU)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from .core.types import Mode
    from .tools.evaluation import (EvalError, EvalOptions, check_options, evaluate, format_report, load_qrels,
                                   load_rankllm, make_target)

    options = EvalOptions(top_k=args.top_k, mode=Mode(args.mode), top_n=args.top_n or None,
                          window_size=args.window_size, stride=args.stride, max_queries=args.max_queries,
                          binary_rel=args.binary_rel, tag=args.tag,
                          prerank=None if args.prerank is None else args.prerank == "on", depth=args.depth)
    check_options(options, remote=args.server is not None)
    if args.threads is not None:
        if args.threads < 1:
            raise EvalError(f"--threads must be at least 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    queries, qrels = load_rankllm(args.data), load_qrels(args.qrels)
    target = make_target(args.model, args.server, dtype=args.dtype, timeout=args.timeout)
    try:
        report = evaluate(target, queries, qrels, args.output, options)
    finally:
        target.close()
    print(json.dumps(report.to_json(), indent=2) if args.json else format_report(report))
    return 0


def _add_triton(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("triton", help="run the embedded Triton server on a model repository",
                       add_help=False)
    p.set_defaults(func=None, passthrough="triton")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pe-rank", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_make_model(sub)
    _add_rerank(sub)
    _add_eval(sub)
    _add_triton(sub)
    for name, module in (("export", "pe_rank_export.cli"), ("serve", "pe_rank.service.cli"),
                         ("bench", "pe_rank.tools.benchmark"), ("train", "pe_rank.training.cli"),
                         ("perf-analyzer", "pe_rank.tools.perf_analyzer"), ("soak", "pe_rank.tools.soak")):
        p = sub.add_parser(name, add_help=False, help=f"see `pe-rank {name} --help`")
        p.set_defaults(func=None, passthrough=name)
    return parser


_PASSTHROUGH = {
    "triton": ("pe_rank.service.embedded_triton", "cli_main"),
    "export": ("pe_rank_export.cli", "cli_main"),
    "serve": ("pe_rank.service.cli", "cli_main"),
    "bench": ("pe_rank.tools.benchmark", "cli_main"),
    "train": ("pe_rank.training.cli", "cli_main"),
    "perf-analyzer": ("pe_rank.tools.perf_analyzer", "cli_main"),
    "soak": ("pe_rank.tools.soak", "cli_main"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one ``error:`` line and exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in _PASSTHROUGH:
        import importlib

        module, func = _PASSTHROUGH[argv[0]]
        try:
            return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
        except (UserError, InvalidRequest) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args, rest = build_parser().parse_known_args(argv)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except (UserError, InvalidRequest) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
