"""The text-listwise baseline (RankGPT style, `mode: text`): prompt, parser, sliding window, CLI."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from pe_rank.core.jsonio import parse_request
from pe_rank.core.ranker import window_bounds
from pe_rank.runtime.text_listwise import parse_ranking, rank_text_listwise, text_prompt, text_ranker_for
from pe_rank.core.types import Mode, Passage, RankOptions, RerankRequest
from pe_rank.core.validation import InvalidRequest, validate_request


@pytest.mark.parametrize("output,n,expected", [
    ("[2] > [1] > [3]", 3, [1, 0, 2]),
    ("[2] > [2] > [1] > [2]", 3, [1, 0, 2]),             # duplicates: first occurrence wins
    ("[5] > [0] > [2] > [17] > [3]", 4, [1, 2, 0, 3]),    # out of range (0, 5, 17) dropped
    ("I think passage three, then [4]!", 4, [3, 0, 1, 2]),  # garbage text: only digits count
    ("", 3, [0, 1, 2]),                                  # nothing parsed: input order
    ("[3]", 5, [2, 0, 1, 3, 4]),                         # missing ones appended in input order
    ("[12]>[1]x[10]", 12, [11, 0, 9, 1, 2, 3, 4, 5, 6, 7, 8, 10]),  # multi-digit numbers
])
def test_parse_ranking_like_the_original(output, n, expected):
    assert parse_ranking(output, n) == expected


def test_prompt_for_two_passages_is_word_for_word():
    expected = (
        "I will provide you with 2 passages.\n"
        "Rank the passages based on their relevance to the search query: what is a flea.\n"
        "Passage 1: A flea is an insect (1).\n\n"
        "Passage 2: Fleas [x] live (23) a year.\n\n"
        "Search Query: what is a flea.\n"
        "Rank the 2 relatively ordered passages above based on their relevance to the search query, "
        "output the ranking in descending order. The output format should be [] > [] > ..., e.g., "
        "[4] > [2] > ..., Only respond with the ranking results with 2 unique numbers, do not say "
        "anything else or explain.\n\n"
    )
    assert text_prompt("what is a flea", ["  A flea is an insect [1].\n", "Fleas [x] live [23] a year."]) == expected


def test_prompt_is_rendered_with_the_chat_template(tiny):
    model, _ = tiny
    ranker = text_ranker_for(model)
    ids = ranker.prompt_ids("q", ["a", "b"])
    tok = model.prompts.tokenizer
    assert ids == tok.encode(tok.render_chat(text_prompt("q", ["a", "b"])))
    assert ids[0] == tok.token_id("<s>") and tok.decode(ids).startswith("[INST] I will provide you with 2 passages.")


def test_tiny_model_ranks_25_passages_with_the_shared_window(tiny, dl19):
    model, _ = tiny
    q = dl19[0]
    texts = [h["content"] for h in q["hits"][:25]]
    options = RankOptions(window_size=20, stride=10, mode=Mode.TEXT)
    order, stats = asyncio.run(rank_text_listwise(model, q["query"], texts, options))
    assert sorted(order) == list(range(25))
    assert stats.windows == len(window_bounds(25, 20, 10)) == 2
    assert 0 < stats.decode_steps <= 2 * 256
    assert stats.prompt_tokens > 25 * 20  # passage texts are in the prompt


def test_text_mode_is_refused_by_the_server_validation():
    request = RerankRequest(query="q", passages=(Passage("a", "x"),), mode=Mode.TEXT)
    with pytest.raises(InvalidRequest, match="mode text is only available in-process"):
        validate_request(request, 8)
    validate_request(request, 8, allow_text=True)
    assert parse_request({"query": "q", "passages": [{"id": "a", "text": "x"}], "mode": "text"}).mode is Mode.TEXT


def test_cli_rerank_mode_text(tiny_dir, dl19, tmp_path):
    q = dl19[1]
    body = {"query": q["query"], "mode": "text", "window_size": 4, "stride": 2,
            "passages": [{"id": h["docid"], "text": h["content"][:200]} for h in q["hits"][:6]]}
    (tmp_path / "req.json").write_text(json.dumps(body))
    proc = subprocess.run([sys.executable, "-m", "pe_rank", "rerank", "--model", str(tiny_dir), "--input",
                           str(tmp_path / "req.json"), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert sorted(r["index"] for r in out["ranking"]) == list(range(6))
    assert [r["score"] for r in out["ranking"][:2]] == [1.0, 0.5]
    meta = out["metadata"]
    assert meta["windows"] == 2 and meta["decode_steps"] > 0 and meta["encode_ms"] == 0 and meta["rank_ms"] > 0
