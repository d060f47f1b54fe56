"""``pe-rank``: one entry point, one subcommand per job."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are never downloaded at run time


class UserError(Exception):
    """Printed as one line, without a traceback."""


def _add_make_model(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-model", help="build a checkpoint in the released PE-Rank layout")
    p.add_argument("kind", choices=["tiny", "demo"])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_model)


def cmd_make_model(args: argparse.Namespace) -> int:
    if args.kind == "tiny":
        from .models.tiny import make_tiny

        path = make_tiny(args.out, seed=args.seed)
    else:
        from .models.demo import make_demo

        path = make_demo(args.out, seed=args.seed)
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
    p.set_defaults(func=cmd_rerank)


def cmd_rerank(args: argparse.Namespace) -> int:
    from .core.jsonio import format_table, parse_request

    try:
        raw = json.loads(args.input.read_text())
    except (OSError, json.JSONDecodeError) as exc:
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
    from .core.inprocess import load_in_process
    from .core.jsonio import result_to_json
    from .core.model import ENCODER_MAX_TOKENS
    from .core.validation import validate_request

    model, reranker = load_in_process(args.model, dtype=args.dtype)
    validate_request(request, model.embedding_size, token_counts=model.passage_token_counts,
                     max_tokens=ENCODER_MAX_TOKENS)
    t0 = time.perf_counter()
    result = asyncio.run(reranker.rerank(request))
    result.timings.total_ms = (time.perf_counter() - t0) * 1e3
    return result_to_json(result)


def _rerank_remote(args: argparse.Namespace, request) -> dict:
    try:
        from .client import rerank_json
    except ImportError:
        raise UserError("--server needs the gRPC client, which is not built yet") from None
    return rerank_json(args.server, request)


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
    _add_triton(sub)
    for name, module in (("export", "pe_rank_export.cli"), ("serve", "pe_rank.service.cli"),
                         ("bench", "pe_rank.bench.cli")):
        p = sub.add_parser(name, add_help=False, help=f"see `pe-rank {name} --help`")
        p.set_defaults(func=None, passthrough=name)
    return parser


_PASSTHROUGH = {
    "triton": ("pe_rank.triton.embedded", "cli_main"),
    "export": ("pe_rank_export.cli", "cli_main"),
    "serve": ("pe_rank.service.cli", "cli_main"),
    "bench": ("pe_rank.bench.cli", "cli_main"),
}


def main(argv: list[str] | None = None) -> int:
    """Entry point; user mistakes print one ``error:`` line and exit 2."""
    from .core.checkpoint import CheckpointError
    from .core.validation import InvalidRequest

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if argv and argv[0] in _PASSTHROUGH:
        import importlib

        module, func = _PASSTHROUGH[argv[0]]
        try:
            return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
        except (UserError, CheckpointError, InvalidRequest) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args, rest = build_parser().parse_known_args(argv)
    if rest:
        build_parser().error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except (UserError, CheckpointError, InvalidRequest) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
