"""`pe-rank bench` machinery on a tiny checkpoint: keys and sane values (no timing assertions)."""
from __future__ import annotations

import asyncio

import pytest

from conftest import CONFORMANCE, DATA
from pe_rank.benchmark import report_markdown, run_bench

pytestmark = pytest.mark.triton


def test_bench_reports_ratios_and_percentiles():
    result = asyncio.run(run_bench(CONFORMANCE / "tiny-a", DATA / "bm25_dl19.json.gz", queries=2, top_k=20,
                                   text_queries=1, concurrency=[1, 2]))
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
    assert "| pe_rank_full |" in report_markdown(result)
