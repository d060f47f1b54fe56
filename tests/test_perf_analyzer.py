"""`pe-rank perf-analyzer`: the private apt set-up, the relocatable wrapper, input files from a real
Triton, and a short load test end to end where perf_analyzer is installed (no timing assertions)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DATA
from pe_rank.tools.perf_analyzer import DEFAULT_CACHE, _apt_options, _runs, _write_wrapper, cli_main, install, write_inputs

INSTALLED = Path(__file__).resolve().parents[1] / DEFAULT_CACHE / "bin" / "perf_analyzer"


def test_apt_configuration_stays_in_the_cache(tmp_path):
    """The system's sources, lists, caches and dpkg status are never read for trixie or written."""
    args = _apt_options(tmp_path)
    assert args[::2] == ["-o"] * (len(args) // 2)
    values = dict(option.split("=", 1) for option in args[1::2])
    assert {"Dir::Etc::sourcelist", "Dir::Etc::sourceparts", "Dir::Etc::preferencesparts", "Dir::State::Lists",
            "Dir::State::status", "Dir::Cache"} <= set(values)
    for key, value in values.items():
        if key.startswith("Dir::") and value:
            assert Path(value).is_relative_to(tmp_path), key


def test_wrapper_is_relocatable_and_install_reuses_it(tmp_path):
    cache = tmp_path / "a"
    fake = cache / "perf_analyzer" / "bin" / "perf_analyzer"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "Perf Analyzer Version 0.0.0 $*"\n')
    fake.chmod(0o755)
    _write_wrapper(cache / "bin" / "perf_analyzer", cache, native=True)
    moved = tmp_path / "b"
    cache.rename(moved)
    assert str(tmp_path) not in (moved / "bin" / "perf_analyzer").read_text()
    assert _runs(moved / "bin" / "perf_analyzer")
    assert install(moved, log=pytest.fail) == moved / "bin" / "perf_analyzer"  # nothing fetched again

    _write_wrapper(moved / "bin" / "loader", moved, native=False)
    text = (moved / "bin" / "loader").read_text()
    assert '/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --argv0 perf_analyzer --library-path' in text


@pytest.mark.triton
def test_input_files_from_the_triton_under_test(tritons, exported, tmp_path):
    from pe_rank.core.checkpoint import read_checkpoint_info

    repo = exported("tiny-a")
    info = read_checkpoint_info(repo / "pe_llm" / "1" / "checkpoint")
    inputs = write_inputs(repo, tritons("tiny-a").grpc_url, DATA / "bm25_dl19.json.gz", queries=2, window=5,
                          out=tmp_path, rank_passages=30)
    data = {model: json.loads(path.read_text())["data"] for model, path in inputs.files.items()}
    assert [d["TEXT"]["shape"] for d in data["pe_embed"]] == [[5], [5]]
    assert len(data["pe_projector"]) == 10
    assert {tuple(d["ENCODER_EMBEDDING"]["shape"]) for d in data["pe_projector"]} == {(info.embedding_size,)}
    assert len(data["pe_llm"]) == 2  # one window request per query
    window = data["pe_llm"][0]
    assert window["PASSAGE_EMBEDS"]["shape"] == [5, info.hidden_size]
    assert window["PROMPT_IDS"]["shape"] == [inputs.prompt_tokens]
    assert [d["PASSAGES"]["shape"] for d in data["pe_rank"]] == [[30], [30]]
    assert [len(d["QUERY"]["content"]) for d in data["pe_rank"]] == [1, 1]


@pytest.mark.triton
@pytest.mark.skipif(not INSTALLED.exists(), reason="perf_analyzer not installed: pe-rank perf-analyzer --install-only")
def test_load_test_end_to_end(tritons, exported, tmp_path):
    out = tmp_path / "results"
    assert cli_main(["--repository", str(exported("tiny-a")), "--triton-url", tritons("tiny-a").grpc_url,
                     "--concurrency", "1,2", "--queries", "2", "--window", "5", "--out", str(out),
                     "--cache", str(tmp_path / "cache"), "--perf-analyzer", str(INSTALLED),
                     "--rank-passages", "30"]) == 0
    (report,) = out.glob("*-perf_analyzer.json")
    result = json.loads(report.read_text())
    assert list(result["models"]) == ["pe_embed", "pe_projector", "pe_llm", "pe_rank"]
    assert result["machine"]["cores"] and result["commit"] and result["triton"]
    for model, entry in result["models"].items():
        assert set(entry["levels"]) == {"1", "2"}, model
        for level in entry["levels"].values():
            assert 0 < level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"], model
            assert level["requests_per_s"] > 0
        rows = (out / entry["csv"]).read_text().splitlines()
        assert rows[0].startswith("Concurrency,Inferences/Second") and len(rows) == 3, model
    llm = result["models"]["pe_llm"]["levels"]["2"]
    assert llm["requests"] == 2 * 2 and result["models"]["pe_rank"]["levels"]["2"]["requests"] == 2
    assert result["models"]["pe_projector"]["levels"]["1"]["items_per_s"] == pytest.approx(
        5 * result["models"]["pe_projector"]["levels"]["1"]["requests_per_s"])
    markdown = report.with_suffix(".md").read_text()
    assert "## pe_llm" in markdown and "## pe_rank" in markdown and "| 2 |" in markdown
