"""Real training queries: extracted from the pinned pyserini wheel's topic files, or from a TSV.

``pyserini==0.21.0`` carries Anserini's fat jar, and the jar's ``topics-and-qrels/`` entries are
plain ``qid<TAB>text`` files: about 19,000 unique MS MARCO web queries (passage and document
dev/test subsets, v2 dev and dev2). Later pyserini versions download their topics at run time;
this one is the last that carries them. The texts are under MS MARCO's terms, so they are
extracted when training, into a git-ignored cache, and never committed.

Evaluation queries never train. They are removed by normalised text (case, punctuation,
Unicode forms and spacing do not matter), whichever file they came from: the jar's own DL19,
DL20 and DL21 topic files, and every file passed as an exclusion (RankLLM JSON runs such as
``bm25_dl19.json.gz`` or TSV topics).
"""
from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
import unicodedata
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .data import DataError

PYSERINI = "pyserini==0.21.0"
PYSERINI_WHEEL_GLOB = "pyserini-0.21.0-*.whl"
JAR_IN_WHEEL = "pyserini/resources/jars/anserini-0.21.0-fatjar.jar"
TOPICS = "topics-and-qrels/"
# MS MARCO web queries (qid<TAB>text), in the order they are read; duplicates keep the first.
TRAIN_TOPICS = (
    "topics.msmarco-passage.dev-subset.txt",
    "topics.msmarco-passage.test-subset.txt",
    "topics.msmarco-doc.dev.txt",
    "topics.msmarco-doc.test.txt",
    "topics.msmarco-v2-passage.dev.txt",
    "topics.msmarco-v2-passage.dev2.txt",
    "topics.msmarco-v2-doc.dev.txt",
    "topics.msmarco-v2-doc.dev2.txt",
)
# Evaluation topics inside the jar: always excluded when the jar is a source. DL19 is the reported
# benchmark, DL20 stays untouched (neither training nor tuning), DL21 is the held-out dev split.
EVAL_TOPICS = (
    "topics.dl19-passage.txt",
    "topics.dl19-doc.txt",
    "topics.dl20.txt",
    "topics.dl21.txt",
)
# Judgements of the v2 passage queries: their passage ids are MS MARCO v2's, like the pool's.
TRAIN_QRELS = ("qrels.msmarco-v2-passage.dev.txt", "qrels.msmarco-v2-passage.dev2.txt")

_NOT_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalise(text: str) -> str:
    """The text two copies of one query share: NFKC, lower case, punctuation out, single spaces."""
    return " ".join(_NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split())


@dataclass(frozen=True)
class TrainQuery:
    qid: str
    text: str
    source: str  # the file it was first read from


@dataclass
class Extracted:
    """The training queries and how they were obtained (for the model card)."""

    queries: list[TrainQuery]
    read: dict[str, int] = field(default_factory=dict)          # source -> lines read
    duplicates: int = 0                                         # dropped: same normalised text seen before
    excluded: dict[str, int] = field(default_factory=dict)     # exclusion set -> queries it removed
    exclusion_sizes: dict[str, int] = field(default_factory=dict)  # exclusion set -> its distinct texts

    def summary(self) -> str:
        read = ", ".join(f"{k}: {v}" for k, v in self.read.items())
        excl = ", ".join(f"{k} ({self.exclusion_sizes[k]} texts) removed {v}" for k, v in self.excluded.items())
        return (f"{len(self.queries)} training queries from {sum(self.read.values())} lines ({read}); "
                f"{self.duplicates} duplicates dropped; exclusions: {excl or 'none'}")


# ---- reading topic files


def parse_tsv(text: str, where: str) -> list[tuple[str, str]]:
    """``qid<TAB>text`` lines (blank lines skipped); the text is stripped."""
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        qid, sep, query = line.partition("\t")
        if not sep or not qid.strip() or not query.strip():
            raise DataError(f"{where}:{n}: expected 'qid<TAB>query text'")
        out.append((qid.strip(), query.strip()))
    return out


def open_jar(path: Path) -> zipfile.ZipFile:
    """Anserini's jar, given itself or the pyserini wheel that carries it."""
    try:
        outer = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: not a zip (jar or wheel): {exc}") from None
    if JAR_IN_WHEEL in outer.namelist():
        return zipfile.ZipFile(io.BytesIO(outer.read(JAR_IN_WHEEL)))
    if not any(n.startswith(TOPICS) for n in outer.namelist()):
        raise DataError(f"{path}: neither an Anserini jar ({TOPICS}) nor a wheel carrying {JAR_IN_WHEEL}")
    return outer


def jar_topics(jar: zipfile.ZipFile, name: str, where: str) -> list[tuple[str, str]]:
    try:
        raw = jar.read(TOPICS + name)
    except KeyError:
        raise DataError(f"{where}: has no {TOPICS}{name}") from None
    return parse_tsv(raw.decode("utf-8"), f"{where}!{name}")


def jar_qrels(jar: zipfile.ZipFile, names: Iterable[str] = TRAIN_QRELS) -> dict[str, dict[str, int]]:
    """``qid -> {docid: grade}`` from the jar's qrels files that exist (``qid 0 docid grade``)."""
    qrels: dict[str, dict[str, int]] = {}
    present = set(jar.namelist())
    for name in names:
        if TOPICS + name not in present:
            continue
        for line in jar.read(TOPICS + name).decode("utf-8").splitlines():
            parts = line.split()
            if len(parts) == 4:
                qrels.setdefault(parts[0], {})[parts[2]] = int(parts[3])
    return qrels


def read_query_file(path: Path) -> list[tuple[str, str]]:
    """(qid, text) of a TSV topic file or a RankLLM JSON run (``.json`` / ``.json.gz``)."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.name.endswith((".json", ".json.gz")):
        try:
            with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as f:
                items = json.load(f)
        except (OSError, EOFError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: {exc}") from None
        out = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or not isinstance(item.get("query"), str):
                raise DataError(f"{path}: [{i}] has no string 'query'")
            hits = item.get("hits") or [{}]
            out.append((str(item.get("qid", hits[0].get("qid", i))), item["query"]))
        return out
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return parse_tsv(f.read(), str(path))


def is_jar_source(path: Path) -> bool:
    return path.suffix in (".jar", ".whl", ".zip")


# ---- extraction


def exclusion_sets(sources: list[Path], excludes: list[Path]) -> dict[str, set[str]]:
    """Normalised texts never to train on: every ``--exclude`` file, plus the jar's evaluation topics."""
    sets: dict[str, set[str]] = {}
    for path in sources:
        if is_jar_source(path):
            jar = open_jar(path)
            for name in EVAL_TOPICS:
                sets[f"{path.name}!{name}"] = {normalise(t) for _, t in jar_topics(jar, name, str(path))}
    for path in excludes:
        sets[str(path)] = {normalise(t) for _, t in read_query_file(path)}
    return sets


def extract_queries(sources: list[Path], excludes: list[Path]) -> tuple[Extracted, dict[str, dict[str, int]]]:
    """Unique training queries of ``sources`` (jar/wheel or TSV files), minus every exclusion set.

    Returns them with the judgements the sources carry (the jar's v2 passage qrels, keyed by qid).
    A query removed by several exclusion sets counts for each of them.
    """
    if not sources:
        raise DataError("no query source given")
    sets = exclusion_sets(sources, excludes)
    banned = set().union(*sets.values()) if sets else set()
    result = Extracted([], exclusion_sizes={k: len(v) for k, v in sets.items()})
    result.excluded = {k: 0 for k in sets}
    seen: set[str] = set()
    qrels: dict[str, dict[str, int]] = {}
    for path in sources:
        if is_jar_source(path):
            jar = open_jar(path)
            qrels.update(jar_qrels(jar))
            files = [(f"{path.name}!{name}", jar_topics(jar, name, str(path))) for name in TRAIN_TOPICS]
        else:
            files = [(str(path), read_query_file(path))]
        for where, rows in files:
            result.read[where] = len(rows)
            for qid, text in rows:
                key = normalise(text)
                if not key:
                    continue
                if key in banned:
                    if key not in seen:
                        for name, texts in sets.items():
                            result.excluded[name] += key in texts
                    seen.add(key)  # count each banned text once
                    continue
                if key in seen:
                    result.duplicates += 1
                    continue
                seen.add(key)
                result.queries.append(TrainQuery(qid, text, where))
    return result, qrels


def check_disjoint(queries: Iterable[str], sets: dict[str, set[str]]) -> None:
    """Raise if any training text is in an exclusion set (the guarantee, checked again at the end)."""
    leaked = Counter(name for q in queries for name, texts in sets.items() if normalise(q) in texts)
    if leaked:
        raise DataError(f"evaluation queries would train: {dict(leaked)}")


def fetch_pyserini(cache: Path, log=print) -> Path:
    """The pinned pyserini wheel in ``cache``, downloaded with pip (``--no-deps``, 154 MB) if missing."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(PYSERINI_WHEEL_GLOB))
    if found:
        return found[0]
    log(f"downloading {PYSERINI} (154 MB, no dependencies) into {cache}")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PYSERINI, "-d", str(cache)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(cache.glob(PYSERINI_WHEEL_GLOB))
    if done.returncode != 0 or not found:
        raise DataError(f"pip download {PYSERINI} failed: {(done.stderr or done.stdout).strip()[-500:]}")
    return found[0]
