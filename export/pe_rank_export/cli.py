"""``pe-rank export``: checkpoint -> Triton model repository."""
from __future__ import annotations

import argparse
from pathlib import Path

from .configs import MAX_BATCH, TARGETS
from .onnx_export import ExportError
from .repository import SOURCE_REPOSITORY, ExportOptions, export_repository


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pe-rank export", description=__doc__)
    parser.add_argument("--model", required=True, type=Path, help="PE-Rank checkpoint folder")
    parser.add_argument("--repository", type=Path, default=SOURCE_REPOSITORY,
                        help="Triton model repository to write (default: the project's model_repository/)")
    parser.add_argument("--target", choices=TARGETS, default="torch",
                        help="torch: PyTorch in python models (reference-exact); python: ONNX via onnxruntime "
                             "in python models; onnxruntime / tensorrt: Triton's native backends")
    parser.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH)
    parser.add_argument("--cpu", action="store_true", help="KIND_CPU instances even when a GPU is visible")
    parser.add_argument("--step-batching", choices=["on", "off"], default="on",
                        help="on: pe_llm runs the decode steps of concurrent windows in one forward (throughput); "
                             "off: each window steps alone, so rankings under load are bit-identical to the same "
                             "request alone (batched float noise can flip near-ties)")
    args = parser.parse_args(argv)
    from pe_rank.core.errors import UserError

    try:
        export_repository(args.model, args.repository,
                          ExportOptions(args.target, args.dtype, args.max_batch, gpu=False if args.cpu else None,
                                        step_batching=args.step_batching == "on"))
    except ExportError as exc:
        raise UserError(str(exc)) from None
    return 0
