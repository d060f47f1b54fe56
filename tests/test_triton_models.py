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


def start_inputs(prompt_ids: np.ndarray, embeds: np.ndarray) -> list[tclient.InferInput]:
    """PROMPT_IDS [1, T] and PASSAGE_EMBEDS [1, n, H]: one window per request."""
    return [tensor("PROMPT_IDS", np.ascontiguousarray(prompt_ids, dtype=np.int64)[None]),
            tensor("PASSAGE_EMBEDS", np.ascontiguousarray(embeds, dtype=np.float32)[None])]


def choice_input(choice: int) -> tclient.InferInput:
    return tensor("CHOICE", np.array([[choice]], dtype=np.int64))


class Llm:
    """Raw pe_llm requests; every call returns (SCORES, LIVE_SEQUENCES).

    pe_llm batches requests of different sequences, so every tensor has a leading batch dim of 1.
    """

    def __init__(self, client: tclient.InferenceServerClient) -> None:
        self.client = client

    def _infer(self, corrid: int, inputs: list, start: bool = False, end: bool = False) -> tuple[np.ndarray, int]:
        result = self.client.infer("pe_llm", inputs, sequence_id=corrid, sequence_start=start, sequence_end=end,
                                   client_timeout=60)
        live = result.as_numpy("LIVE_SEQUENCES")
        assert live.shape == (1, 1) and result.as_numpy("STEP_BATCH").shape == (1, 1)
        return result.as_numpy("SCORES")[0], int(live[0, 0])

    def start(self, corrid: int, prompt_ids: np.ndarray, embeds: np.ndarray, end: bool = False):
        return self._infer(corrid, start_inputs(prompt_ids, embeds), start=True, end=end)

    def step(self, corrid: int, choice: int, end: bool = False):
        return self._infer(corrid, [choice_input(choice)], end=end)

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


def test_prompt_head_comes_from_the_cache_across_sequences(clients, conformance_models, prompt_builders, dl19):
    """CACHED_TOKENS: a START whose prompt begins with a head already prefilled (by any earlier
    sequence with the same window size) takes those tokens from the cache; a foreign prompt none.
    Cached or not, the scores are the same bit for bit."""
    name = CHECKPOINTS[0]
    model, _ = conformance_models[name]
    client, builder = clients(name), prompt_builders[name]

    def start(ids, embeds):
        corrid = new_corrid()
        result = client.infer("pe_llm", start_inputs(ids, embeds), sequence_id=corrid, sequence_start=True,
                              sequence_end=True, client_timeout=60)
        return result.as_numpy("SCORES")[0], int(result.as_numpy("CACHED_TOKENS")[0, 0])

    n = 11
    head = len(builder.shared_head(n))
    ids_a, embeds_a = window_inputs(model, builder, dl19, query=4, n=n)
    ids_b, embeds_b = window_inputs(model, builder, dl19, query=5, n=n)
    first_scores, first = start(ids_a, embeds_a)
    assert first in (0, head)  # 0 unless an earlier test already ran a window of this size
    again_scores, again = start(ids_a, embeds_a)
    assert again == head > 0
    np.testing.assert_array_equal(again_scores, first_scores)
    assert start(ids_b, embeds_b)[1] == head
    foreign = ids_a.copy()
    foreign[1] = (foreign[1] + 1) % model.llm.config.vocab_size
    assert start(foreign, embeds_a)[1] == 0


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
        llm._infer(new_corrid(), [tensor("PROMPT_IDS", ids3.astype(np.float32)[None]),
                                  tensor("PASSAGE_EMBEDS", embeds3[None])], start=True, end=True)

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


# ---- 6. pe_llm batches the CHOICE steps of concurrent sequences into one forward pass

# Batched GEMMs and masked SDPA change the float rounding, not the math: a batched step equals
# the unbatched one to float noise (~1e-6 on these scores), so scores are compared to 1e-4 and
# rankings only where no decision is a near-tie closer than that.
BATCH_TOLERANCE = 1e-4
# tiny-a windows (DL19 query, passages) of different sizes whose every greedy decision is won by
# more than BATCH_TOLERANCE; tiny-b is full of 1e-6 near-ties (see the conformance cases)
WIDE_MARGIN_WINDOWS = ((0, 4), (1, 7), (2, 11), (4, 20), (5, 9), (6, 13), (8, 6))


def greedy_margins(stepper, prompt_ids: np.ndarray, embeds: np.ndarray) -> tuple[list[int], float]:
    """Full-mode greedy decoding on one window, alone: (the choices fed, smallest winning margin)."""
    state, scores = stepper.start(prompt_ids, embeds)
    remaining, choices, margin = np.ones(len(embeds), dtype=bool), [], np.inf
    while remaining.sum() > 1:
        masked = np.where(remaining, scores, -np.inf)
        top2 = np.sort(masked)[-2:]
        margin = min(margin, float(top2[1] - top2[0]))
        pick = int(np.argmax(masked))
        remaining[pick] = False
        if remaining.sum() > 1:
            choices.append(pick)
            scores = stepper.step(state, pick)
    return choices, margin


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_step_many_equals_step_for_windows_of_different_lengths(name, conformance_models, prompt_builders, dl19):
    """TorchStepper.step_many on windows of 4..20 passages (prompts of different lengths) vs step alone.

    Scores agree to BATCH_TOLERANCE (float noise of the batched GEMMs, not bit-identical), argmax
    choices agree wherever the alone margin exceeds that noise, and a batch of one is bit-exact.
    """
    from pe_rank.core.inprocess import stepper_for

    model, _ = conformance_models[name]
    stepper = stepper_for(model)
    windows = [window_inputs(model, prompt_builders[name], dl19, q, n) for q, n in WIDE_MARGIN_WINDOWS[:5]]
    choices = [[len(embeds) - 1, 0, len(embeds) // 2] for _, embeds in windows]
    alone = []
    for (ids, embeds), picks in zip(windows, choices):
        state, first = stepper.start(ids, embeds)
        alone.append([first] + [stepper.step(state, pick) for pick in picks])

    states = [stepper.start(ids, embeds)[0] for ids, embeds in windows]
    assert len({s.length for s in states}) == len(states), "the windows must differ in prompt length"
    for k in range(3):
        batched = stepper.step_many(states, [picks[k] for picks in choices])
        for w, (got, want) in enumerate(zip(batched, (a[k + 1] for a in alone))):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=BATCH_TOLERANCE, err_msg=f"window {w}, step {k}")
            top2 = np.sort(want)[-2:]
            if top2[1] - top2[0] > BATCH_TOLERANCE:
                assert int(np.argmax(got)) == int(np.argmax(want)), f"window {w}, step {k}"
    assert [s.length for s in states] == [len(ids) + 3 for ids, _ in windows]

    state, _ = stepper.start(*windows[0])
    np.testing.assert_array_equal(stepper.step_many([state], [choices[0][0]])[0], alone[0][1])
    with pytest.raises(ValueError, match="out of range"):
        stepper.step_many([states[0], states[1]], [0, 99])
    assert [s.length for s in states] == [len(ids) + 3 for ids, _ in windows]  # nothing ran


class StepBatchRecorder:
    """A real asyncio Triton client that also notes each pe_llm response's STEP_BATCH."""

    def __init__(self, client) -> None:
        self.client = client
        self.step_batches: list[int] = []

    async def infer(self, model_name: str, inputs: list, **kwargs):
        result = await self.client.infer(model_name, inputs, **kwargs)
        if model_name == "pe_llm":
            self.step_batches.append(int(result.as_numpy("STEP_BATCH")[0, 0]))
        return result


async def llm_counts(client) -> tuple[int, int]:
    """Triton's own statistics for pe_llm, once settled: (requests inferred, model executions).

    The python backend sends a batch's responses before it reports the batch's statistics, so a
    read right after the last response may still miss that batch: read until two reads agree.
    """
    async def read() -> tuple[int, int]:
        stats = (await client.get_inference_statistics("pe_llm")).model_stats[0]
        return stats.inference_count, stats.execution_count

    counts = await read()
    for _ in range(50):
        await asyncio.sleep(0.1)
        again = await read()
        if again == counts:
            return counts
        counts = again
    raise AssertionError(f"pe_llm statistics still changing after 5 s: {counts}")


def test_concurrent_windows_rank_as_if_alone_and_share_forward_passes(tritons, conformance_models,
                                                                     prompt_builders, dl19):
    name = "tiny-a"
    model, _ = conformance_models[name]
    from pe_rank.core.inprocess import stepper_for

    stepper = stepper_for(model)
    requests = []
    for q, n in WIDE_MARGIN_WINDOWS:
        hits = dl19[q]["hits"][:n]
        requests.append(RerankRequest(query=dl19[q]["query"], window_size=20, stride=10,
                                      passages=tuple(Passage(h["docid"], h["content"]) for h in hits)))
        _, margin = greedy_margins(stepper, *window_inputs(model, prompt_builders[name], dl19, q, n))
        assert margin > 10 * BATCH_TOLERANCE, f"query {q}, {n} passages: a near-tie, not comparable"
    url = tritons(name, "torch").grpc_url

    async def rank_all() -> tuple[list[list[str]], list[list[str]], list[int], list[int], tuple[int, int]]:
        from tritonclient.grpc.aio import InferenceServerClient

        client = InferenceServerClient(url)
        try:
            def reranker(recorder):
                return Reranker(TritonEmbedder(client, EmbeddingCache(0), "exact"), TritonStepBackend(recorder),
                                prompt_builders[name])

            alone_rec = StepBatchRecorder(client)
            alone = [[r.id for r in (await reranker(alone_rec).rerank(req)).ranking] for req in requests]
            together_rec = StepBatchRecorder(client)
            before = await llm_counts(client)
            results = await asyncio.gather(*(reranker(together_rec).rerank(req) for req in requests))
            after = await llm_counts(client)
            together = [[r.id for r in result.ranking] for result in results]
            delta = (after[0] - before[0], after[1] - before[1])
            return alone, together, alone_rec.step_batches, together_rec.step_batches, delta
        finally:
            await client.close()

    alone, together, alone_batches, together_batches, (inferred, executions) = asyncio.run(rank_all())
    assert together == alone
    assert set(alone_batches) <= {0, 1}  # one at a time: never batched (and so bit-exact)
    assert max(together_batches) > 1, f"pe_llm never batched steps: {together_batches}"
    assert inferred == len(together_batches) and executions < inferred, (inferred, executions)


def test_a_bad_choice_in_a_batch_fails_only_that_request(tritons, clients, conformance_models, prompt_builders, dl19):
    name = "tiny-a"
    model, _ = conformance_models[name]
    llm = Llm(clients(name))
    windows = [window_inputs(model, prompt_builders[name], dl19, q, n) for q, n in WIDE_MARGIN_WINDOWS[:3]]
    alone = [llm.run(ids, embeds, [1, 2]) for ids, embeds in windows]
    baseline = llm.live()
    url = tritons(name, "torch").grpc_url

    async def attempt(client) -> bool:
        """START three windows, then one CHOICE each at once, the middle one out of range."""
        async def infer(corrid: int, inputs: list, start: bool = False, end: bool = False):
            result = await client.infer("pe_llm", inputs, sequence_id=corrid, sequence_start=start,
                                        sequence_end=end, client_timeout=60)
            return result.as_numpy("SCORES")[0], int(result.as_numpy("STEP_BATCH")[0, 0])

        corrids = [new_corrid() for _ in windows]
        for corrid, (ids, embeds) in zip(corrids, windows):
            await infer(corrid, start_inputs(ids, embeds), start=True)
        before = await llm_counts(client)
        good_a, bad, good_c = await asyncio.gather(infer(corrids[0], [choice_input(1)]),
                                                   infer(corrids[1], [choice_input(99)]),
                                                   infer(corrids[2], [choice_input(1)]), return_exceptions=True)
        after = await llm_counts(client)
        assert isinstance(bad, InferenceServerException) and "out of range" in str(bad), bad
        for (scores, _), want in ((good_a, alone[0][1]), (good_c, alone[2][1])):
            np.testing.assert_allclose(scores, want, rtol=0, atol=BATCH_TOLERANCE)
        # the failed CHOICE changed nothing: the middle window goes on as if it never happened
        for w, corrid in enumerate(corrids):
            scores, _ = await infer(corrid, [choice_input(1 if w == 1 else 2)], end=True)
            np.testing.assert_allclose(scores, alone[w][1 if w == 1 else 2], rtol=0, atol=BATCH_TOLERANCE)
        shared = (after[0] - before[0], after[1] - before[1]) == (3, 1)
        if shared:
            assert good_a[1] == good_c[1] == 2  # the two valid steps ran as one forward
        return shared

    async def run() -> list[bool]:
        from tritonclient.grpc.aio import InferenceServerClient

        client = InferenceServerClient(url)
        try:
            outcomes = []
            while len(outcomes) < 5 and not any(outcomes):  # until the three land in one execute
                outcomes.append(await attempt(client))
            return outcomes
        finally:
            await client.close()

    outcomes = asyncio.run(run())
    assert any(outcomes), "the three CHOICE requests never shared a batch"
    assert llm.live() == baseline
