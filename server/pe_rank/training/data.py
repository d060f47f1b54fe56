"""Training data: BM25 top-100 runs (``bm25_<name>.json.gz``) and optional qrels.

A run is a JSON list of ``{"query", "hits": [{"qid", "docid", "content", ...}]}``; the
qrels of run ``<name>`` are ``qrels.<name>-passage.txt`` (TREC format). Runs without
qrels (DL22 here) are taught by the encoder's cosine order alone. DL19 is the evaluation
set and is refused.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

RUN_GLOB = "bm25_*.json.gz"
FORBIDDEN = ("dl19",)  # evaluation data never trains


class DataError(ValueError):
    """Missing or malformed training data (printed as one line by the CLI)."""


@dataclass(frozen=True)
class Query:
    run: str
    qid: str
    text: str
    docids: tuple[str, ...]
    passages: tuple[str, ...]
    grades: dict[str, int] | None = field(default=None, compare=False)  # None: no qrels

    def grade(self, docid: str) -> int:
        """Judged grade; unjudged passages count as 0 (non-relevant)."""
        return 0 if self.grades is None else self.grades.get(docid, 0)


@dataclass(frozen=True)
class TrainingData:
    queries: tuple[Query, ...]
    files: tuple[Path, ...]

    def passages(self) -> list[str]:
        """Every distinct passage text, in first-seen order (deterministic)."""
        return list(dict.fromkeys(p for q in self.queries for p in q.passages))

    def with_pseudo_queries(self, count: int, window: int, seed: int) -> TrainingData:
        """These queries plus ``count`` pseudo-queries (see :func:`pseudo_queries`)."""
        if count <= 0:
            return self
        return replace(self, queries=self.queries + pseudo_queries(self.queries, count, window, seed))

    def summary(self) -> str:
        runs: dict[str, list[Query]] = {}
        for q in self.queries:
            runs.setdefault(q.run, []).append(q)
        return ", ".join(
            f"{run}: {len(qs)} queries, {sum(len(q.passages) for q in qs)} hits"
            + (" + qrels" if qs[0].grades is not None else " (no qrels: cosine teacher)")
            if run != PSEUDO else f"{len(qs)} pseudo-queries (cosine teacher)"
            for run, qs in runs.items()
        )


PSEUDO = "pseudo"
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]*")


_STOP = frozenset("""a an and are as at be been but by can do does for from has have how i if in into is it its
more most much not of on or our so such than that the their them then there these they this to was
we were what when where which who why will with you your""".split())


def pseudo_query(text: str, rng: np.random.Generator, lead_words: int = 40, tries: int = 8) -> str:
    """A short lower-case span of a passage's first ``lead_words`` words, trimmed of stop words at
    both ends and holding at least two content words (the best of a few draws)."""
    words = [w.lower() for w in _WORD.findall(text)[:lead_words]] or ["passage"]
    best: list[str] = words[:3]
    for _ in range(tries):
        length = int(rng.integers(3, 8))
        start = int(rng.integers(max(len(words) - length, 0) + 1))
        span = words[start:start + length]
        while span and span[0] in _STOP:
            span = span[1:]
        while span and span[-1] in _STOP:
            span = span[:-1]
        if sum(w not in _STOP for w in span) >= 2:
            return " ".join(span)
        best = span if len(span) > len(best) else best
    return " ".join(best)


def pseudo_queries(queries: tuple[Query, ...], count: int, window: int, seed: int) -> tuple[Query, ...]:
    """Extra training queries for the cosine teacher: only 129 real queries are available.

    Each takes a random hit of a random real query, makes a span of its words the query, and
    keeps ``window`` consecutive hits of that list around the source passage as candidates, so
    the window holds the passage the query came from and its BM25 neighbours. The teacher is
    the encoder's cosine order (no qrels). Seeded: the same seed gives the same queries.
    """
    rng = np.random.default_rng([seed, 0x5E0])
    made = []
    for i in range(count):
        q = queries[int(rng.integers(len(queries)))]
        size = min(window, len(q.passages))
        source = int(rng.integers(len(q.passages)))
        offset = int(rng.integers(max(0, source - size + 1), min(source, len(q.passages) - size) + 1))
        made.append(Query(PSEUDO, f"{PSEUDO}-{i}", pseudo_query(q.passages[source], rng),
                          q.docids[offset:offset + size], q.passages[offset:offset + size], None))
    return tuple(made)


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            raise DataError(f"{path}:{n}: expected 'qid 0 docid grade'")
        qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return qrels


def read_run(path: Path, run: str, qrels: dict[str, dict[str, int]] | None) -> list[Query]:
    try:
        with gzip.open(path, "rt") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: {exc}") from None
    queries = []
    for item in raw:
        hits = [h for h in item.get("hits", []) if h.get("content")]
        if not hits:
            continue
        qid = str(hits[0]["qid"])
        grades = None if qrels is None else qrels.get(qid, {})
        queries.append(Query(run, qid, item["query"], tuple(str(h["docid"]) for h in hits),
                             tuple(h["content"] for h in hits), grades))
    return queries


def load_data(folder: Path | str) -> TrainingData:
    """Every ``bm25_<name>.json.gz`` in ``folder`` with its qrels when present."""
    folder = Path(folder)
    runs = sorted(folder.glob(RUN_GLOB))
    if not runs:
        raise DataError(f"{folder}: no {RUN_GLOB} training runs")
    queries: list[Query] = []
    files: list[Path] = []
    for path in runs:
        name = path.name[len("bm25_"):-len(".json.gz")]
        if any(bad in name.lower() for bad in FORBIDDEN):
            raise DataError(f"{path}: {name} is evaluation data and is never used for training")
        qrels_path = folder / f"qrels.{name}-passage.txt"
        qrels = read_qrels(qrels_path) if qrels_path.exists() else None
        queries += read_run(path, name, qrels)
        files += [path] + ([qrels_path] if qrels is not None else [])
    if not queries:
        raise DataError(f"{folder}: the runs hold no query with passages")
    return TrainingData(tuple(queries), tuple(files))
