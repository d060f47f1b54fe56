"""The decoding loop: windows, modes, partial decoding and edge cases (tiny random model)."""
from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pe_rank.runtime.inprocess import stepper_for
from pe_rank.core.ranker import emissions_needed, window_bounds
from pe_rank.core.types import Mode, Passage, RerankRequest
from pe_rank.core.validation import InvalidRequest, validate_request


def make_request(dl19, qi: int, n: int, **kw) -> RerankRequest:
    q = dl19[qi]
    passages = tuple(Passage(h["docid"], h["content"]) for h in q["hits"][:n])
    return RerankRequest(query=q["query"], passages=passages, **kw)


def rank(reranker, request):
    return asyncio.run(reranker.rerank(request))


def test_window_bounds_match_reference_loop():
    assert window_bounds(100, 20, 10) == [(80, 100), (70, 90), (60, 80), (50, 70), (40, 60),
                                           (30, 50), (20, 40), (10, 30), (0, 20)]
    assert window_bounds(35, 20, 10) == [(15, 35), (5, 25), (0, 15)]
    assert window_bounds(21, 20, 10) == [(1, 21), (0, 11)]
    assert window_bounds(20, 20, 10) == [(0, 20)]
    assert window_bounds(1, 20, 10) == [(0, 1)]
    assert window_bounds(35, 10, 5) == [(25, 35), (20, 30), (15, 25), (10, 20), (5, 15), (0, 10)]
    # the one deliberate deviation: the reference ranks nothing when n == window - stride
    assert window_bounds(10, 20, 10) == [(0, 10)]
    assert window_bounds(0, 20, 10) == []


def test_emissions_needed_is_the_overlap_with_the_next_window():
    bounds = window_bounds(100, 20, 10)
    assert [emissions_needed(bounds, k, 10) for k in range(len(bounds))] == [10] * 8 + [10]
    assert [emissions_needed(bounds, k, 3) for k in range(len(bounds))] == [10] * 8 + [3]
    assert [emissions_needed(bounds, k, None) for k in range(len(bounds))] == [20] * 9
    bounds = window_bounds(35, 20, 10)
    assert [emissions_needed(bounds, k, 5) for k in range(3)] == [10, 10, 5]
    assert [emissions_needed(bounds, k, 20) for k in range(3)] == [10, 15, 15]


@pytest.mark.parametrize("n,window,stride", [(100, 20, 10), (35, 20, 10), (35, 10, 5), (57, 20, 5), (21, 20, 10)])
@pytest.mark.parametrize("top_n", [1, 5, 10, 20])
def test_top_n_partial_decoding_equals_full_top_n(tiny, dl19, n, window, stride, top_n):
    _, reranker = tiny
    full = rank(reranker, make_request(dl19, 3, n, window_size=window, stride=stride))
    part = rank(reranker, make_request(dl19, 3, n, window_size=window, stride=stride, top_n=top_n))
    assert [r.id for r in part.ranking] == [r.id for r in full.ranking][:top_n]
    assert len(part.ranking) == min(top_n, n)
    assert part.stats.windows == full.stats.windows
    if top_n < window - 1:
        assert part.stats.decode_steps < full.stats.decode_steps


def test_top_10_of_100_halves_decode_steps(tiny, dl19):
    _, reranker = tiny
    full = rank(reranker, make_request(dl19, 5, 100))
    part = rank(reranker, make_request(dl19, 5, 100, top_n=10))
    assert full.stats.decode_steps == 9 * 18
    assert part.stats.decode_steps == 9 * 9
    assert [r.id for r in part.ranking] == [r.id for r in full.ranking][:10]


def test_first_mode_orders_by_first_step_scores(tiny, dl19):
    model, reranker = tiny
    request = make_request(dl19, 1, 20, mode=Mode.FIRST)
    result = rank(reranker, request)
    ids, _ = model.prompts.build(request.query, 20)
    embeds = model.project(model.encode([p.text for p in request.passages]))
    _, scores = stepper_for(model).start(ids, embeds)
    expected = np.argsort(-scores, kind="stable")
    assert [r.index for r in result.ranking] == expected.tolist()
    assert result.stats.decode_steps == 0 and result.stats.windows == 1


def test_full_mode_first_pick_equals_first_mode_first_pick(tiny, dl19):
    _, reranker = tiny
    full = rank(reranker, make_request(dl19, 2, 20))
    first = rank(reranker, make_request(dl19, 2, 20, mode=Mode.FIRST))
    assert full.ranking[0].id == first.ranking[0].id


@pytest.mark.parametrize("n", [1, 2, 19, 20, 21])
def test_edge_sizes_return_a_permutation(tiny, dl19, n):
    _, reranker = tiny
    result = rank(reranker, make_request(dl19, 4, n))
    assert sorted(r.index for r in result.ranking) == list(range(n))
    assert [r.score for r in result.ranking] == [1 / (k + 1) for k in range(n)]
    assert result.stats.windows == (2 if n == 21 else 1)
    assert result.stats.decode_steps == (sum((20 - 2, 11 - 2)) if n == 21 else max(n - 2, 0))


def test_long_and_unicode_texts(tiny):
    model, reranker = tiny
    long_text = "fleas " * 3000
    passages = (Passage("long", long_text), Passage("uni", "café naïve — 数据 \n tab\tend 🦟"),
                Passage("short", "a flea"))
    assert model.passage_token_counts([long_text])[0] > 512
    assert model.tokenize_passages([long_text])["input_ids"].shape[1] == 512
    result = rank(reranker, RerankRequest("fleas — 数据?", passages))
    assert sorted(r.id for r in result.ranking) == ["long", "short", "uni"]


def test_empty_text_encodes_but_is_refused_at_the_edge(tiny):
    model, _ = tiny
    assert model.encode([""]).shape == (1, model.embedding_size)
    request = RerankRequest("q", (Passage("a", "x"), Passage("b", "  ")))
    with pytest.raises(InvalidRequest, match=r"passages\[1\]\.text"):
        validate_request(request, model.embedding_size)


@pytest.mark.parametrize("kwargs,field", [
    ({"query": " "}, "query"),
    ({"passages": ()}, "passages"),
    ({"window_size": 1}, "window_size"),
    ({"stride": 0}, "stride"),
    ({"stride": 20}, "stride"),
    ({"top_n": -1}, "top_n"),
])
def test_bad_requests_name_the_field(kwargs, field):
    base = dict(query="q", passages=(Passage("a", "x"), Passage("b", "y")))
    base.update(kwargs)
    with pytest.raises(InvalidRequest) as err:
        validate_request(RerankRequest(**base), embedding_size=4)
    assert err.value.field == field


def test_duplicate_ids_and_bad_embeddings_are_refused():
    dup = RerankRequest("q", (Passage("a", "x"), Passage("a", "y")))
    with pytest.raises(InvalidRequest, match="duplicate id 'a'"):
        validate_request(dup, 4)
    wrong = RerankRequest("q", (Passage("a", embedding=np.zeros(3, np.float32)),))
    with pytest.raises(InvalidRequest, match=r"passages\[0\]\.embedding"):
        validate_request(wrong, 4)
    nan = RerankRequest("q", (Passage("a", embedding=np.array([0, np.nan, 0, 0], np.float32)),))
    with pytest.raises(InvalidRequest, match="NaN"):
        validate_request(nan, 4)
    too_many = RerankRequest("q", tuple(Passage(str(i), "x") for i in range(1001)))
    with pytest.raises(InvalidRequest, match="limit of 1000"):
        validate_request(too_many, 4)


def test_truncate_false_refuses_over_long_text(tiny):
    model, _ = tiny
    request = RerankRequest("q", (Passage("a", "flea " * 1000),), truncate=False)
    with pytest.raises(InvalidRequest, match="over the 512 limit"):
        validate_request(request, model.embedding_size, token_counts=model.passage_token_counts)


def test_precomputed_embeddings_rank_like_texts(tiny, dl19):
    model, reranker = tiny
    request = make_request(dl19, 6, 12)
    vectors = model.encode([p.text for p in request.passages])
    given = RerankRequest(request.query, tuple(Passage(p.id, "", v) for p, v in zip(request.passages, vectors)))
    assert [r.id for r in rank(reranker, given).ranking] == [r.id for r in rank(reranker, request).ranking]


def test_query_with_placeholder_text_is_refused(tiny):
    _, reranker = tiny
    with pytest.raises(ValueError, match="must not contain"):
        rank(reranker, RerankRequest("<PLACEHOLDER>", (Passage("a", "x"), Passage("b", "y"))))
