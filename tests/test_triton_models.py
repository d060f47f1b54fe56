"""The Triton models on a real Triton server: embeddings, rankings, sequence state, errors."""
from __future__ import annotations

import asyncio
import random
import time

import numpy as np
import pytest
import tritonclient.grpc as tclient
from tritonclient.utils import InferenceServerException

from conftest import CHECKPOINTS, CONFORMANCE, SEQUENCE_IDLE_S, case_id, conformance_cases
from pe_rank.core.prompt import PromptBuilder
from pe_rank.core.reranker import Reranker
from pe_rank.core.tokenization import load_prompt_tokenizer
from pe_rank.core.types import Passage, RerankRequest
from pe_rank.service.cache import EmbeddingCache
from pe_rank.service.embedder import TritonEmbedder
from pe_rank.triton.remote import TritonStepBackend

pytestmark = pytest.mark.triton

TOLERANCE = {"torch": 1e-6, "python": 1e-4}
_RANDOM = random.SystemRandom()


def new_corrid() -> int:
    return _RANDOM.getrandbits(60) | 1  # never 0 (0 means "no sequence")


def tensor(name: str, array: np.ndarray) -> tclient.InferInput:
    dtype = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.object_): "BYTES"}[array.dtype]
    item = tclient.InferInput(name, list(array.shape), dtype)
    item.set_data_from_numpy(array)
    return item


@pytest.fixture(scope="module")
def clients(tritons):
    """clients(name, target) -> a sync gRPC client to that Triton (closed at module end)."""
    made: dict[tuple[str, str], tclient.InferenceServerClient] = {}

    def get(name: str, target: str = "torch") -> tclient.InferenceServerClient:
        key = (name, target)
        if key not in made:
            made[key] = tclient.InferenceServerClient(tritons(name, target).grpc_url)
        return made[key]

    yield get
    for client in made.values():
        client.close()


@pytest.fixture(scope="module")
def prompt_builders():
    return {name: PromptBuilder(load_prompt_tokenizer(CONFORMANCE / name)) for name in CHECKPOINTS}


def dl19_texts(dl19, n: int = 20, query: int = 3) -> list[str]:
    return [h["content"] for h in dl19[query]["hits"][:n]]


# ---- pe_llm protocol helpers (sync client)


class Llm:
    """Raw pe_llm requests; every call returns (SCORES, LIVE_SEQUENCES)."""

    def __init__(self, client: tclient.InferenceServerClient) -> None:
        self.client = client

    def _infer(self, corrid: int, inputs: list, start: bool = False, end: bool = False) -> tuple[np.ndarray, int]:
        result = self.client.infer("pe_llm", inputs, sequence_id=corrid, sequence_start=start, sequence_end=end,
                                   client_timeout=60)
        live = result.as_numpy("LIVE_SEQUENCES")
        assert live.shape == (1,)
        return result.as_numpy("SCORES"), int(live[0])

    def start(self, corrid: int, prompt_ids: np.ndarray, embeds: np.ndarray, end: bool = False):
        return self._infer(corrid, [tensor("PROMPT_IDS", np.ascontiguousarray(prompt_ids, dtype=np.int64)),
                                    tensor("PASSAGE_EMBEDS", np.ascontiguousarray(embeds, dtype=np.float32))],
                           start=True, end=end)

    def step(self, corrid: int, choice: int, end: bool = False):
        return self._infer(corrid, [tensor("CHOICE", np.array([choice], dtype=np.int64))], end=end)

    def end(self, corrid: int):
        return self._infer(corrid, [], end=True)

    def live(self) -> int:
        """A bare START+END probe on a fresh sequence: reports LIVE_SEQUENCES only."""
        scores, live = self._infer(new_corrid(), [], start=True, end=True)
        assert scores.shape == (0,)
        return live

    def run(self, prompt_ids: np.ndarray, embeds: np.ndarray, choices: list[int]) -> list[np.ndarray]:
        """One whole sequence on its own: START, a step per choice, END; the score vectors."""
        corrid = new_corrid()
        scores, _ = self.start(corrid, prompt_ids, embeds)
        out = [scores]
        try:
            for choice in choices:
                out.append(self.step(corrid, choice)[0])
        finally:
            self.end(corrid)
        return out


def window_inputs(model, builder: PromptBuilder, dl19, query: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Real prompt ids and real projected passage embeddings [n, H] for one window."""
    texts = dl19_texts(dl19, n, query)
    prompt_ids, _ = builder.build(dl19[query]["query"], n)
    return np.array(prompt_ids), model.project(model.encode(texts))


def wait_for_live(llm: Llm, at_most: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    live = llm.live()
    while live > at_most and time.monotonic() < deadline:
        time.sleep(0.25)
        live = llm.live()
    return live


# ---- 1. embeddings: pe_embed and pe_projector equal the in-process PyTorch model


@pytest.mark.parametrize("target", ["torch", "python"])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_pe_embed_equals_pytorch_encode_and_project(name, target, clients, conformance_models, dl19):
    model, _ = conformance_models[name]
    texts = dl19_texts(dl19, 20)
    result = clients(name, target).infer("pe_embed", [tensor("TEXT", np.array([t.encode() for t in texts],
                                                                              dtype=np.object_))])
    encoded, projected = result.as_numpy("ENCODER_EMBEDDING"), result.as_numpy("PROJECTED")
    want_encoded = model.encode(texts)
    want_projected = model.project(want_encoded)
    assert encoded.shape == (len(texts), model.embedding_size) and encoded.dtype == np.float32
    assert projected.shape == (len(texts), model.hidden_size) and projected.dtype == np.float32
    np.testing.assert_allclose(encoded, want_encoded, rtol=0, atol=TOLERANCE[target])
    np.testing.assert_allclose(projected, want_projected, rtol=0, atol=TOLERANCE[target])


@pytest.mark.parametrize("target", ["torch", "python"])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_pe_projector_equals_pytorch_project(name, target, clients, conformance_models, dl19):
    model, _ = conformance_models[name]
    vectors = model.encode(dl19_texts(dl19, 20, query=5))
    vectors[3] *= 2.5  # not only unit vectors: callers bring their own dense-index embeddings
    result = clients(name, target).infer("pe_projector", [tensor("ENCODER_EMBEDDING", vectors)])
    projected = result.as_numpy("PROJECTED")
    assert projected.shape == (len(vectors), model.hidden_size)
    np.testing.assert_allclose(projected, model.project(vectors), rtol=0, atol=TOLERANCE[target])


# ---- 2. conformance rankings through Triton (torch target)


def request_of(case: dict) -> RerankRequest:
    r = case["request"]
    return RerankRequest(query=r["query"], passages=tuple(Passage(p["id"], p["text"]) for p in r["passages"]),
                         window_size=r["window_size"], stride=r["stride"])


@pytest.mark.parametrize("item", conformance_cases(), ids=case_id)
def test_triton_ranking_equals_original(item, tritons, prompt_builders):
    name, _, case = item
    url = tritons(name, "torch").grpc_url

    async def rank():
        from tritonclient.grpc.aio import InferenceServerClient

        client = InferenceServerClient(url)
        try:
            reranker = Reranker(TritonEmbedder(client, EmbeddingCache(0), "exact"), TritonStepBackend(client),
                                prompt_builders[name])
            return await reranker.rerank(request_of(case))
        finally:
            await client.close()

    result = asyncio.run(rank())
    assert [r.id for r in result.ranking] == case["expected_ranking"]


# ---- 3. sequences are isolated from each other


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_interleaved_sequences_score_as_if_alone(name, clients, conformance_models, prompt_builders, dl19):
    model, _ = conformance_models[name]
    llm = Llm(clients(name))
    ids_a, embeds_a = window_inputs(model, prompt_builders[name], dl19, query=0, n=6)
    ids_b, embeds_b = window_inputs(model, prompt_builders[name], dl19, query=1, n=9)
    choices_a, choices_b = [4, 0, 5, 1], [8, 2, 0, 7]
    baseline = llm.live()

    a, b = new_corrid(), new_corrid()
    scores_a, live = llm.start(a, ids_a, embeds_a)
    assert live == baseline + 1
    scores_b, live = llm.start(b, ids_b, embeds_b)
    assert live == baseline + 2
    got_a, got_b = [scores_a], [scores_b]
    try:
        for ca, cb in zip(choices_a, choices_b):
            got_a.append(llm.step(a, ca)[0])
            got_b.append(llm.step(b, cb)[0])
    finally:
        llm.end(a)
        llm.end(b)

    alone_a = llm.run(ids_a, embeds_a, choices_a)
    alone_b = llm.run(ids_b, embeds_b, choices_b)
    assert [s.shape for s in got_a] == [(6,)] * 5 and [s.shape for s in got_b] == [(9,)] * 5
    for got, alone in ((got_a, alone_a), (got_b, alone_b)):
        for k, (x, y) in enumerate(zip(got, alone)):
            np.testing.assert_array_equal(x, y, err_msg=f"score vector {k}")
    assert llm.live() == baseline


# ---- 4. state is freed on END and on idle expiry


def test_live_sequences_drop_after_end_and_after_idle_expiry(clients, conformance_models, prompt_builders, dl19):
    name = "tiny-a"
    model, _ = conformance_models[name]
    llm = Llm(clients(name))
    ids, embeds = window_inputs(model, prompt_builders[name], dl19, query=2, n=4)
    baseline = llm.live()

    a, b = new_corrid(), new_corrid()
    assert llm.start(a, ids, embeds)[1] == baseline + 1
    assert llm.start(b, ids, embeds)[1] == baseline + 2
    assert llm.live() == baseline + 2
    scores, live = llm.step(a, 1, end=True)  # END on a step: scores still come back, state freed
    assert scores.shape == (4,) and live == baseline + 1
    assert llm.end(b)[1] == baseline
    assert llm.live() == baseline
    with pytest.raises(InferenceServerException):
        llm.step(a, 0)  # ended: neither Triton nor the model has that sequence any more

    abandoned = new_corrid()
    t0 = time.monotonic()
    assert llm.start(abandoned, ids, embeds)[1] == baseline + 1
    assert llm.step(abandoned, 2)[1] == baseline + 1  # ... and never ended
    assert llm.live() == baseline + 1
    live = wait_for_live(llm, baseline, timeout_s=3 * SEQUENCE_IDLE_S)
    waited = time.monotonic() - t0
    assert live <= baseline, f"abandoned sequence still held after {waited:.1f} s"
    assert waited >= SEQUENCE_IDLE_S * 0.9, f"state expired after {waited:.1f} s, before the idle timeout"
    with pytest.raises(InferenceServerException):
        llm.step(abandoned, 0)


# ---- 5. bad inputs: clean errors, and the model keeps serving


def test_bad_inputs_return_errors_and_model_keeps_serving(clients, conformance_models, prompt_builders, dl19):
    name = "tiny-a"
    model, _ = conformance_models[name]
    llm = Llm(clients(name))
    ids3, embeds3 = window_inputs(model, prompt_builders[name], dl19, query=4, n=3)
    ids2, _ = prompt_builders[name].build(dl19[4]["query"], 2)
    baseline = llm.live()

    # PASSAGE_EMBEDS of the wrong width
    wide = np.concatenate([embeds3, np.zeros((3, 1), np.float32)], axis=1)
    with pytest.raises(InferenceServerException, match="passage embeddings"):
        llm.start(new_corrid(), ids3, wide, end=True)
    # a prompt with 2 placeholders for 3 passages
    with pytest.raises(InferenceServerException, match="2 placeholders for 3 passages"):
        llm.start(new_corrid(), np.array(ids2), embeds3, end=True)
    # prompt ids outside the vocabulary
    with pytest.raises(InferenceServerException, match="prompt ids"):
        llm.start(new_corrid(), np.concatenate([ids3, [10**9]]), embeds3, end=True)
    # a wrong dtype is refused by Triton before the model
    with pytest.raises(InferenceServerException):
        llm._infer(new_corrid(), [tensor("PROMPT_IDS", ids3.astype(np.float32)), tensor("PASSAGE_EMBEDS", embeds3)],
                   start=True, end=True)

    # a step on a sequence whose START failed: the model has no state for it
    failed = new_corrid()
    with pytest.raises(InferenceServerException, match="placeholders"):
        llm.start(failed, np.array(ids2), embeds3)
    with pytest.raises(InferenceServerException, match="has no state"):
        llm.step(failed, 0)
    assert llm.end(failed)[1] == baseline

    # CHOICE out of range, on a live sequence: errors, and the sequence itself goes on
    want = llm.run(ids3, embeds3, [1, 2])
    corrid = new_corrid()
    scores, live = llm.start(corrid, ids3, embeds3)
    assert live == baseline + 1
    for bad in (3, -1, 10**6):
        with pytest.raises(InferenceServerException, match="out of range"):
            llm.step(corrid, bad)
    got = [scores, llm.step(corrid, 1)[0], llm.step(corrid, 2, end=True)[0]]
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)

    # afterwards a valid full sequence still works and nothing leaked
    again = llm.run(ids3, embeds3, [1, 2])
    for x, y in zip(again, want):
        np.testing.assert_array_equal(x, y)
    assert llm.live() == baseline
