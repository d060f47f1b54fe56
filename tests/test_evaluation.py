"""`pe-rank eval`: RankLLM input, TREC run files, ir-measures metrics (BM25 DL19 as the known anchor)."""
from __future__ import annotations

import gzip
import json
import subprocess
import sys

import ir_measures
import pytest

from pe_rank.core.types import Mode, RerankRequest
from pe_rank.tools.evaluation import (EvalError, EvalOptions, Ranked, check_options, evaluate, load_qrels,
                                load_rankllm, score)

from conftest import DATA

DL19 = DATA / "bm25_dl19.json.gz"
QRELS = DATA / "qrels.dl19-passage.txt"


class FixedOrder:
    """A stand-in ranker: returns the passages in a fixed pattern (identity or reversed top-n)."""

    description = "fixed"

    def __init__(self, reverse: bool = False) -> None:
        self.reverse = reverse

    def rank(self, request: RerankRequest) -> Ranked:
        order = list(range(len(request.passages)))
        if self.reverse:
            order.reverse()
        return Ranked(order[: request.top_n] if request.top_n else order, {"windows": 1})

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def queries():
    return load_rankllm(DL19)


@pytest.fixture(scope="module")
def qrels():
    return load_qrels(QRELS)


def test_bm25_order_gives_the_known_dl19_ndcg(queries, qrels):
    assert len(queries) == 43 and all(len(q.hits) == 100 for q in queries)
    means, per_query = score(qrels, {q.qid: [h.docid for h in q.hits] for q in queries})
    assert means["nDCG@10"] == pytest.approx(0.5058, abs=5e-4)
    assert set(means) == {"nDCG@10", "RR@10", "R@20"} and len(per_query) == 43
    assert 0 < means["RR@10"] <= 1 and 0 < means["R@20"] < 1


def test_identity_ranker_reproduces_the_first_stage(queries, qrels, tmp_path):
    report = evaluate(FixedOrder(), queries, qrels, tmp_path / "bm25.run", EvalOptions(top_k=100), progress=False)
    assert report.metrics == report.first_stage
    assert report.metrics["nDCG@10"] == pytest.approx(0.5058, abs=5e-4)
    assert report.queries == report.judged_queries == 43
    # the run file read back by ir-measures scores the same
    run = list(ir_measures.read_trec_run(str(tmp_path / "bm25.run")))
    again = ir_measures.calc_aggregate([ir_measures.nDCG @ 10], list(ir_measures.read_trec_qrels(str(QRELS))), run)
    assert again[ir_measures.nDCG @ 10] == pytest.approx(report.metrics["nDCG@10"], abs=1e-9)


def test_run_file_format_and_first_stage_tail(queries, qrels, tmp_path):
    out = tmp_path / "run.txt"
    options = EvalOptions(top_k=30, top_n=5, max_queries=4, tag="mytag")
    evaluate(FixedOrder(reverse=True), queries, qrels, out, options, progress=False)
    rows = [line.split() for line in out.read_text().splitlines()]
    assert len(rows) == 4 * 30 and all(len(r) == 6 for r in rows)
    for qi, q in enumerate(queries[:4]):
        mine = rows[qi * 30 : (qi + 1) * 30]
        assert {r[0] for r in mine} == {q.qid} and {r[1] for r in mine} == {"Q0"} and {r[5] for r in mine} == {"mytag"}
        assert [int(r[3]) for r in mine] == list(range(1, 31))
        scores = [float(r[4]) for r in mine]
        assert all(a > b for a, b in zip(scores, scores[1:]))
        docids = [h.docid for h in q.hits[:30]]
        # the ranker's top-5 (here: the last five of the top-30, reversed), then the rest in BM25 order
        assert [r[2] for r in mine] == docids[::-1][:5] + docids[:25]
    per_query = (tmp_path / "run.txt.per_query.tsv").read_text().splitlines()
    assert per_query[0].split("\t") == ["qid", "nDCG@10", "RR@10", "R@20", "first_stage_nDCG@10",
                                        "first_stage_RR@10", "first_stage_R@20", "latency_ms"]
    assert [line.split("\t")[0] for line in per_query[1:]] == [q.qid for q in queries[:4]]


def test_plain_json_input_and_bad_inputs(tmp_path):
    with gzip.open(DL19, "rt") as f:
        data = json.load(f)[:2]
    plain = tmp_path / "two.json"
    plain.write_text(json.dumps(data))
    assert [q.qid for q in load_rankllm(plain)] == [str(d["hits"][0]["qid"]) for d in data]
    (tmp_path / "bad.json").write_text('{"query": "q"}')
    with pytest.raises(EvalError, match="bad.json"):
        load_rankllm(tmp_path / "bad.json")
    with pytest.raises(EvalError, match="only available in-process"):
        check_options(EvalOptions(mode=Mode.TEXT), remote=True)


def test_cli_eval_tiny_model_three_queries(tiny_dir, tmp_path):
    out = tmp_path / "tiny.run"
    proc = subprocess.run(
        [sys.executable, "-m", "pe_rank", "eval", "--model", str(tiny_dir), "--data", str(DL19), "--qrels", str(QRELS),
         "--top-k", "20", "--max-queries", "3", "--output", str(out), "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["queries"] == 3 and report["mode"] == "full" and report["model"] == str(tiny_dir)
    assert set(report["metrics"]) == set(report["first_stage"]) == {"nDCG@10", "RR@10", "R@20"}
    assert report["mean_latency_ms"] > 0 and report["mean_per_query"]["decode_steps"] == 18
    assert "rerank full" in proc.stderr  # the progress bar
    assert len(out.read_text().splitlines()) == 3 * 20
    per_query = (tmp_path / "tiny.run.per_query.tsv").read_text().splitlines()
    assert len(per_query) == 1 + 3
    assert all(0 <= float(v) <= 1 for line in per_query[1:] for v in line.split("\t")[1:7])


def test_cli_eval_errors_are_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pe_rank", "eval", "--server", "127.0.0.1:1", "--mode", "text", "--data", str(DL19),
         "--qrels", str(QRELS), "--output", str(tmp_path / "r")], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "error: mode text is only available in-process" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---- the demo's figures in the README are the committed runs' scores

RESULTS = DATA.parents[1] / "bench" / "results"
DEMO_RUNS = {20: "20261207-eval-demo-dl19-top20", 100: "20261207-eval-demo-dl19-top100"}


def _readme_figure(pattern: str) -> float:
    import re

    text = (DATA.parents[1] / "README.md").read_text()
    found = re.search(pattern, text)
    assert found, f"the README no longer states {pattern!r}"
    return float(found.group(1))


@pytest.mark.parametrize("top_k", sorted(DEMO_RUNS))
def test_the_readme_demo_figures_are_what_the_committed_runs_score(top_k):
    """The demo's DL19 NDCG@10 and RR@10 in the README are the scores of the run files `pe-rank eval` wrote
    (bench/results/, with the command in the .json next to them), recomputed here with the harness; and the
    run was made with the shipped trained weights (their SHA-256 is recorded): new weights need a new run."""
    import hashlib

    run = RESULTS / f"{DEMO_RUNS[top_k]}.run"
    provenance = json.loads((RESULTS / f"{DEMO_RUNS[top_k]}.json").read_text())
    rankings: dict[str, list[str]] = {}
    for line in run.read_text().splitlines():
        qid, _, docid, rank, _, _ = line.split()
        rankings.setdefault(qid, []).append(docid)
        assert int(rank) == len(rankings[qid])
    assert len(rankings) == 43 and {len(d) for d in rankings.values()} == {top_k}
    metrics, _ = score(load_qrels(QRELS), rankings)
    assert round(metrics["nDCG@10"], 4) == provenance["report"]["metrics"]["nDCG@10"]
    assert round(metrics["RR@10"], 4) == provenance["report"]["metrics"]["RR@10"]
    if top_k == 20:
        readme = (_readme_figure(r"reordering BM25's top-20: \*\*(0\.\d{4})\*\*"),
                  _readme_figure(r"RR@10 (0\.\d{3,4}) is still below BM25"))
    else:
        readme = (_readme_figure(r"Reordering the top-100 it falls to (0\.\d{4})"),
                  _readme_figure(r"\| same model, reordering the BM25 \*\*top-100\*\* .*?RR@10 (0\.\d{4})"))
    assert (round(metrics["nDCG@10"], 4), round(metrics["RR@10"], len(str(readme[1])) - 2)) == readme
    shipped = DATA.parents[1] / "server" / "pe_rank" / "models" / "demo_trained"
    assert provenance["demo_trained_sha256"] == {
        str(p.relative_to(shipped)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(shipped.rglob("*.safetensors"))}, "the shipped demo weights changed since this run"
