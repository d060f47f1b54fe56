"""The shared prompt head's keys/values: computed once, the same scores whether cached or not."""
from __future__ import annotations

import numpy as np
import pytest

from pe_rank.runtime.model import load_model
from pe_rank.runtime.steps import TorchStepper

QUERIES = ("how do fleas jump", "what is the daily life of thai people", "?! odd query", "x")


@pytest.fixture(scope="module")
def model(tiny_dir):
    return load_model(tiny_dir)


def _stepper(model, head_cache: int = 16) -> TorchStepper:
    return TorchStepper(model.llm, model.prompts, model.dtype, model.device, head_cache=head_cache)


def _embeds(model, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, model.llm.config.hidden_size)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 7, 20])
def test_shared_head_starts_every_prompt_and_stops_before_the_query(model, n):
    head = model.prompts.shared_head(n)
    assert len(head) > 10
    for query in QUERIES:
        ids, positions = model.prompts.build(query, n)
        assert model.prompts.head_length(ids, n) == len(head) < positions[0]
    text = model.prompts.tokenizer.decode(head.tolist())
    assert f"{n} passages" in text and text.rstrip().endswith("query:")


def test_cached_head_gives_the_same_scores_bit_for_bit(model):
    """A window after others (head from the cache) scores exactly as in a fresh stepper."""
    warm = _stepper(model)
    for seed, query in enumerate(QUERIES):
        ids, _ = model.prompts.build(query, 9)
        embeds = _embeds(model, 9, seed)
        state, scores = warm.start(ids, embeds)
        cold_state, cold = _stepper(model).start(ids, embeds)
        np.testing.assert_array_equal(scores, cold)
        assert state.length == len(ids)
        assert {layer.get_seq_length() for layer in state.cache.layers} == {len(ids)}
        np.testing.assert_array_equal(warm.step(state, 3), _stepper(model).step(cold_state, 3))
    assert (warm.heads.misses, warm.heads.hits) == (1, len(QUERIES) - 1)


def test_split_prefill_equals_whole_prefill_to_float_noise(model):
    """Head then rest is the same computation as the reference's one prefill (causal attention)."""
    split, whole = _stepper(model), _stepper(model, head_cache=0)
    for seed, n in enumerate((3, 12, 20)):
        ids, _ = model.prompts.build(QUERIES[seed], n)
        embeds = _embeds(model, n, seed)
        a, b = split.start(ids, embeds), whole.start(ids, embeds)
        np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-4)
        np.testing.assert_allclose(split.step(a[0], 0), whole.step(b[0], 0), rtol=0, atol=1e-4)
    assert split.heads.misses == 3 and len(whole.heads) == 0 and whole.heads.misses == 0


def test_split_prefill_respects_a_sliding_window(tiny_dir):
    """Mistral's sliding window (shorter than the head here) masks the rest's attention the same way."""
    model = load_model(tiny_dir)
    model.llm.config.sliding_window = 16
    ids, _ = model.prompts.build(QUERIES[0], 6)
    assert model.prompts.head_length(ids, 6) > 16
    embeds = _embeds(model, 6, 0)
    np.testing.assert_allclose(_stepper(model).start(ids, embeds)[1],
                               _stepper(model, head_cache=0).start(ids, embeds)[1], rtol=0, atol=1e-4)


def test_least_recently_used_head_is_evicted(model):
    stepper = _stepper(model, head_cache=2)
    for n in (4, 5, 4, 6):  # 4 is used again before 6 arrives, so 5 is the one evicted
        ids, _ = model.prompts.build(QUERIES[0], n)
        stepper.start(ids, _embeds(model, n, n))
    assert len(stepper.heads) == 2 and (stepper.heads.misses, stepper.heads.hits) == (3, 1)
    ids, _ = model.prompts.build(QUERIES[1], 5)
    stepper.start(ids, _embeds(model, 5, 5))
    assert stepper.heads.misses == 4


def test_prompt_without_the_head_is_prefilled_whole(model):
    """Ids that do not begin with the head (a caller's own prompt) take no cached keys."""
    stepper = _stepper(model)
    ids, _ = model.prompts.build(QUERIES[0], 5)
    stepper.start(ids, _embeds(model, 5, 0))
    other = np.array(ids)
    other[1] = (other[1] + 1) % model.llm.config.vocab_size
    embeds = _embeds(model, 5, 1)
    _, scores = stepper.start(other, embeds)
    assert (stepper.heads.misses, stepper.heads.hits) == (1, 0)
    np.testing.assert_array_equal(scores, _stepper(model, head_cache=0).start(other, embeds)[1])


def test_rerank_reports_the_prompt_tokens_taken_from_the_cache(model):
    """30 passages in windows of 20 (stride 10): two windows; the second one's head is cached."""
    import asyncio

    from pe_rank.runtime.inprocess import in_process_reranker
    from pe_rank.core.types import Passage, RerankRequest

    request = RerankRequest("how do fleas jump", tuple(Passage(str(i), f"passage {i} on fleas") for i in range(30)))
    result = asyncio.run(in_process_reranker(model).rerank(request))
    head = len(model.prompts.shared_head(20))
    assert result.stats.windows == 2 and result.stats.cached_prompt_tokens == head
