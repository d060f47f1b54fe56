"""``pe-rank train``: argument parsing; the work is in :mod:`pe_rank.training.train`."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STAGES = {"both": (1, 2), "all": (1, 2, 3)}


def stages(text: str) -> tuple[int, ...]:
    """``both``, ``all`` or stage numbers in order, e.g. ``3`` or ``1,3``."""
    if text in STAGES:
        return STAGES[text]
    try:
        picked = tuple(int(part) for part in text.split(","))
    except ValueError:
        picked = ()
    if not picked or any(s not in (1, 2, 3) for s in picked) or list(picked) != sorted(set(picked)):
        raise argparse.ArgumentTypeError(f"{text!r}: give both, all, or stages from 1,2,3 in order (e.g. 1,3)")
    return picked


def per_stage(kind: Callable[[str], float | int]) -> Callable[[str], tuple]:
    """``V`` (every stage) or ``V1,V2,V3`` (per stage; ``V1,V2`` leaves stage 3 at V2)."""

    def parse(text: str) -> tuple:
        parts = text.split(",")
        if len(parts) not in (1, 2, 3):
            raise argparse.ArgumentTypeError(f"{text!r}: give V, V1,V2 or V1,V2,V3")
        try:
            values = tuple(kind(p) for p in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
        if any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{text!r}: must be positive")
        return (values * 3)[:3] if len(values) == 1 else (values + values[-1:])[:3]

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pe-rank train",
        description="Train a PE-Rank checkpoint into a new checkpoint folder: the projector (stages 1 and 2, "
                    "encoder and LLM frozen) and a LoRA adapter on the LLM's top layers (stage 3, projector "
                    "frozen). Per-stage options take V or V1,V2,V3.")
    p.add_argument("--model", required=True, type=Path, help="input checkpoint folder")
    p.add_argument("--out", required=True, type=Path, help="new checkpoint folder (created)")
    p.add_argument("--stage", type=stages, default=STAGES["both"],
                   help="1: alignment, 2: ranking (projector), 3: ranking (LoRA adapter); a list such as "
                        "1,3; both: 1,2 (default); all: 1,2,3")
    p.add_argument("--data", type=Path, default=Path("data/train"), help="folder of bm25_*.json.gz and qrels")
    p.add_argument("--steps", type=per_stage(int), default=(100, 100, 300), help="optimizer steps (100,100,300)")
    p.add_argument("--lr", type=per_stage(float), default=(1e-3, 2e-4, 5e-4),
                   help="AdamW learning rate (1e-3,2e-4,5e-4)")
    p.add_argument("--batch", type=per_stage(int), default=(4, 1, 1),
                   help="passages per stage-1 step, windows per stage-2/3 step (4,1,1)")
    p.add_argument("--align", choices=["reconstruct", "words"], default="reconstruct",
                   help="stage 1: reconstruct the passage text through the LLM (paper), or regress the soft token "
                        "onto the IDF-weighted mean embedding of the passage's words (no LLM pass; fast)")
    p.add_argument("--adapter-layers", type=int, default=6, help="stage 3: LoRA on the LLM's top K layers (6)")
    p.add_argument("--adapter-rank", type=int, default=8, help="stage 3: LoRA rank (8)")
    p.add_argument("--adapter-pool", type=int, default=512,
                   help="stage 3: windows drawn once per run; their lower-layer states are cached (512)")
    p.add_argument("--query-loss", type=float, default=0.0, metavar="WEIGHT",
                   help="stage 3: add WEIGHT x (1 - cos(W.T h, D q)) per decision row, W the projector's last "
                        "weight and D q the query's encoder embedding decoded into the projector's features: "
                        "the encoder-cosine teacher in closed form, a dense signal per window (0: ListMLE only)")
    p.add_argument("--carried-windows", type=float, default=0.0, metavar="SHARE",
                   help="stage 3: draw this share (0-1) of the pool as the sliding pass meets windows: hits "
                        "[s, s + window/2) of a real query plus the teacher's best window/2 of all hits below (0)")
    p.add_argument("--window", type=int, default=20, help="passages per stage-2 window (20)")
    p.add_argument("--pseudo-queries", type=int, default=0,
                   help="stages 2 and 3: add N pseudo-queries (word spans of training passages, cosine "
                        "teacher) to the real training queries (0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--max-minutes", type=float, help="stop cleanly (and save) before this much wall time")
    p.add_argument("--save-every", type=int, default=25, help="save state and checkpoint every K steps (25)")
    p.add_argument("--log-every", type=int, default=5, help="progress line every K steps (5)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (10)")
    p.add_argument("--target-tokens", type=int, default=64, help="stage-1 passage target length (64)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    return p


def options_from_args(args: argparse.Namespace, argv: list[str]):
    from .train import TrainError, TrainOptions

    if args.window < 2:
        raise TrainError("--window must be at least 2")
    if min(args.save_every, args.log_every, args.target_tokens, args.adapter_rank, args.adapter_pool) < 1 \
            or args.warmup < 0 or args.pseudo_queries < 0 \
            or args.query_loss < 0 or not 0 <= args.carried_windows <= 1:
        raise TrainError("--save-every, --log-every, --target-tokens, --adapter-rank and --adapter-pool "
                         "must be positive, --warmup, --pseudo-queries and --query-loss not negative, "
                         "--carried-windows in [0, 1]")
    return TrainOptions(
        model=args.model, out=args.out, stages=args.stage, data=args.data,
        steps=dict(zip((1, 2, 3), args.steps)), lr=dict(zip((1, 2, 3), args.lr)),
        batch=dict(zip((1, 2, 3), args.batch)), align=args.align, adapter_layers=args.adapter_layers,
        adapter_rank=args.adapter_rank, adapter_pool=args.adapter_pool,
        window=args.window, pseudo_queries=args.pseudo_queries,
        query_weight=args.query_loss, carried=args.carried_windows, seed=args.seed, resume=args.resume,
        max_minutes=args.max_minutes,
        save_every=args.save_every, log_every=args.log_every, warmup=args.warmup,
        target_tokens=args.target_tokens, device=args.device,
        command=shlex.join(["pe-rank", "train", *argv]),
    )


def cli_main(argv: list[str] | None = None) -> int:
    from ..core.checkpoint import CheckpointError
    from .data import DataError
    from .train import TrainError, train

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        train(options_from_args(args, argv), log=lambda line: print(f"[pe-rank train] {line}", flush=True))
    except (TrainError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
