"""The batched step's float noise on real windows, and what the engine's near-tie guard does about it.

Every query's BM25 windows (hits 0-20 and 80-100: the last and the first window of a top-100 pass)
enter one KV pool and decode together, every step one batched forward over all live windows, as
the engine does under load. Each window is then stepped alone with the same picks (the reference
path, bit-identical to the original PE-Rank). Reported: the largest score difference, the
decisions whose lone gap is within that noise, the decisions the batched scores got wrong, and
how many windows the engine's ``tie_margin`` would have restarted alone.

    python -m pe_rank.tools.batch_noise --model models/demo --data tests/data/bm25_dl19.json.gz
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

WINDOW = 20
SPANS = ((0, WINDOW), (80, 80 + WINDOW))


def _windows(model, queries) -> list[tuple[np.ndarray, np.ndarray]]:
    out = []
    for query in queries:
        for start, end in SPANS:
            texts = [h.content for h in query.hits[start:end]]
            if len(texts) == WINDOW:
                ids, _ = model.prompts.build(query.text, WINDOW)
                out.append((np.asarray(ids), model.project(model.encode(texts))))
    return out


def _batched(pool, windows) -> tuple[list[list[np.ndarray]], list[list[int]]]:
    """Every window decoded together: (scores after each step, picks fed), per window."""
    from ..core.ranker import WindowDecoder

    decoders, scores = [], []
    for slot, (ids, embeds) in enumerate(windows):
        prefill = pool.begin(slot, ids, embeds)
        pool.advance(prefill, prefill.remaining)
        _, first = pool.finish(prefill)
        decoders.append(WindowDecoder(len(embeds)))
        scores.append([first])
        decoders[-1].feed(first)
    while live := [s for s, d in enumerate(decoders) if not d.done]:
        result = pool.step(live)
        for slot, device_pick, row in zip(live, result.picks, result.scores):
            scores[slot].append(row)
            pick = decoders[slot].feed(row)
            if pick is not None and pick != device_pick:
                pool.overrule(slot, device_pick, pick)
    return scores, [d.order for d in decoders]


MARGINS = (1e-4, 3e-4, 1e-3, 3e-3)


def measure(model, queries, tie_margin: float) -> dict:
    from ..core.ranker import WindowDecoder
    from ..runtime.engine import relative_gap
    from ..runtime.inprocess import stepper_for
    from ..runtime.pool import PoolStepper

    stepper = stepper_for(model)
    windows = _windows(model, queries)
    max_len = max(len(ids) for ids, _ in windows) + WINDOW
    pool = PoolStepper(stepper, slots=len(windows), max_len=max_len, max_passages=WINDOW)
    batched, orders = _batched(pool, windows)
    worst, worst_relative, scale = 0.0, 0.0, 0.0
    within_noise = wrong = wrong_windows = restarted = decisions = 0
    restarted_at = dict.fromkeys(MARGINS, 0)
    for (ids, embeds), rows, order in zip(windows, batched, orders):
        state, first = stepper.start(ids, embeds)
        alone = [first] + [stepper.step(state, pick) for pick in order[: len(rows) - 1]]
        lone, together = WindowDecoder(len(embeds)), WindowDecoder(len(embeds))
        trips = False
        trips_at = dict.fromkeys(MARGINS, False)
        for step, (got, want) in enumerate(zip(rows, alone)):
            diff = float(np.abs(got - want).max())
            top = float(np.abs(want).max())
            worst, scale = max(worst, diff), max(scale, top)
            worst_relative = max(worst_relative, diff / max(1.0, top))
            decisions += 1
            within_noise += lone.margin(want) <= diff
            gap = relative_gap(together, got)
            trips |= step > 0 and gap <= tie_margin
            for margin in MARGINS:
                trips_at[margin] |= step > 0 and gap <= margin
            if lone.feed(want) != together.feed(got):
                wrong += 1
        restarted += trips
        for margin in MARGINS:
            restarted_at[margin] += trips_at[margin]
        wrong_windows += lone.order != together.order
    return {"windows": len(windows), "batch": len(windows), "decisions": decisions,
            "max_abs_score_diff": worst, "max_relative_score_diff": worst_relative, "max_abs_score": scale,
            "decisions_within_noise": within_noise, "decisions_wrong_when_batched": wrong,
            "windows_ranked_otherwise_when_batched": wrong_windows,
            "tie_margin": tie_margin, "windows_restarted_alone": restarted,
            "windows_restarted_alone_by_margin": {str(m): n for m, n in restarted_at.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="RankLLM retrieval JSON (BM25 top-100)")
    parser.add_argument("--max-queries", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    import torch

    from ..runtime.engine import default_tie_margin
    from ..runtime.model import load_model
    from .evaluation import load_rankllm

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    queries = load_rankllm(args.data)[: args.max_queries]
    started = time.monotonic()
    report = measure(model, queries, default_tie_margin(model.dtype))
    report.update({"model": str(args.model), "data": str(args.data), "queries": len(queries),
                   "wall_s": round(time.monotonic() - started, 1)})
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
