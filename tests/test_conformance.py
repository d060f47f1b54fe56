"""The original PE-Rank's prompts and rankings, reproduced exactly (in-process PyTorch)."""
from __future__ import annotations

import asyncio

import pytest

from conftest import CONFORMANCE, case_id, conformance_cases, conformance_prompts
from pe_rank.core.tokenization import load_prompt_tokenizer
from pe_rank.core.prompt import PromptBuilder
from pe_rank.core.types import Passage, RerankRequest


@pytest.mark.parametrize("item", conformance_prompts(), ids=case_id)
def test_prompt_ids_equal_original(item):
    name, _, golden = item
    builder = PromptBuilder(load_prompt_tokenizer(CONFORMANCE / name))
    ids, positions = builder.build(golden["query"], golden["n"])
    assert ids.tolist() == golden["input_ids"]
    assert len(positions) == golden["n"]


def request_of(case: dict) -> RerankRequest:
    r = case["request"]
    return RerankRequest(
        query=r["query"],
        passages=tuple(Passage(p["id"], p["text"]) for p in r["passages"]),
        window_size=r["window_size"],
        stride=r["stride"],
    )


@pytest.mark.parametrize("item", conformance_cases(), ids=case_id)
def test_ranking_equals_original(item, conformance_models):
    name, _, case = item
    _, reranker = conformance_models[name]
    result = asyncio.run(reranker.rerank(request_of(case)))
    assert [r.id for r in result.ranking] == case["expected_ranking"]
