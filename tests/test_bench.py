"""`pe-rank bench` machinery on a tiny checkpoint: keys and sane values (no timing assertions)."""
from __future__ import annotations

import asyncio
import json

import pytest

from conftest import CONFORMANCE, DATA
from pe_rank.tools.benchmark import report_markdown, run_bench, write_plots
from pe_rank.tools.evaluation import load_qrels

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.triton
def test_bench_reports_ratios_percentiles_quality_and_plots(tmp_path):
    result = asyncio.run(run_bench(CONFORMANCE / "tiny-a", DATA / "bm25_dl19.json.gz", queries=2, top_k=20,
                                   text_queries=1, concurrency=[1, 2],
                                   qrels=load_qrels(DATA / "qrels.dl19-passage.txt")))
    for key in ("text_over_pe_rank", "server_over_in_process", "top10_over_full", "throughput_2_over_1"):
        assert result[key] > 0, key
    for name in ("pe_rank_full", "pe_rank_first", "pe_rank_top10", "text_listwise", "server_full"):
        lat = result["variants"][name]["latency_ms"]
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"], name
    variants = result["variants"]
    assert variants["pe_rank_first"]["decode_steps_mean"] == 0
    assert variants["pe_rank_top10"]["decode_steps_mean"] < variants["pe_rank_full"]["decode_steps_mean"]
    assert variants["server_full"]["decode_steps_mean"] == variants["pe_rank_full"]["decode_steps_mean"]
    assert set(result["concurrency"]) == {"1", "2"} and result["machine"]["cores"]
    assert result["llm_calls_per_query"] == 1  # top-20: one window, one pe_llm call (Triton's own counter)
    assert all(v["mean_step_batch"] >= 1 for v in result["concurrency"].values())
    # the burst right after a fresh start, and the same burst at the end (no embedding cache: comparable)
    assert {b["n"] for b in result["bursts"].values()} == {2} and result["first_burst_over_later"] > 0
    assert "pe_rank_default" in result["variants"] and result["default_over_full"] > 0

    # NDCG@10 of every variant, on the queries it ranked; the server ranks exactly like in-process full
    for name, v in variants.items():
        assert set(v["quality"]) == {"nDCG@10", "RR@10", "R@20", "judged_queries"}, name
        assert 0 <= v["quality"]["nDCG@10"] <= 1
    assert variants["text_listwise"]["quality"]["judged_queries"] == 1
    assert variants["pe_rank_full"]["quality"]["judged_queries"] == 2
    assert variants["server_full"]["quality"]["nDCG@10"] == variants["pe_rank_full"]["quality"]["nDCG@10"]
    assert 0 < result["first_stage"]["nDCG@10"] <= 1

    stem = tmp_path / "run-top20"
    result["plots"] = write_plots(result, stem)
    assert set(result["plots"]) == {"latency_vs_concurrency", "quality_vs_latency"}
    for name in result["plots"].values():
        assert (tmp_path / name).read_bytes().startswith(PNG), name
    markdown = report_markdown(result)
    assert "| pe_rank_full |" in markdown and "nDCG@10" in markdown
    for name in result["plots"].values():
        assert f"]({name})" in markdown  # relative link next to the .md
    json.dumps(result)  # the report is plain JSON


def test_plots_without_qrels_or_server(tmp_path):
    """No qrels: no quality chart and no NDCG column; no sweep: no latency chart."""
    latency = {"p50": 10.0, "p95": 12.0, "p99": 13.0, "n": 2}
    result = {"machine": {"cpu": "cpu", "cores": 2}, "commit": "abc", "model": "m",
              "settings": {"queries": 2, "top_k": 20},
              "variants": {"pe_rank_full": {"latency_ms": latency, "prompt_tokens_mean": 1.0, "decode_steps_mean": 1.0}},
              "concurrency": {"1": {"throughput_qps": 1.0, **latency}, "4": {"throughput_qps": 1.5, **latency}}}
    assert list(write_plots(result, tmp_path / "a")) == ["latency_vs_concurrency"]
    assert "nDCG@10" not in report_markdown(result)
    assert write_plots({**result, "concurrency": {}}, tmp_path / "b") == {}
