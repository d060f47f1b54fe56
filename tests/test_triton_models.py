"""The Triton models on a real Triton server: embeddings, whole windows in pe_llm, pe_rank, errors."""
from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
import tritonclient.grpc as tclient
from tritonclient.utils import InferenceServerException

from conftest import CHECKPOINTS, CONFORMANCE, case_id, conformance_cases, decode_alone, metric_of
from pe_rank.runtime.inprocess import stepper_for
from pe_rank.core.prompt import PromptBuilder
from pe_rank.core.reranker import Reranker
from pe_rank.core.tokenization import load_prompt_tokenizer
from pe_rank.core.types import Passage, RerankRequest
from pe_rank.core.embeddings import WindowEmbeddings
from pe_rank.core.ranker import WindowJob
from pe_rank.core.types import Mode
from pe_rank.service.triton_client import TritonEncoder, TritonWindowBackend, window_inputs, window_outcome

pytestmark = pytest.mark.triton

TOLERANCE = {"torch": 1e-6, "python": 1e-4}


def tensor(name: str, array: np.ndarray) -> tclient.InferInput:
    dtype = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
             np.dtype(np.object_): "BYTES"}[array.dtype]
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


# ---- pe_llm helpers


def metric(tritons, name: str, series: str) -> float:
    return metric_of(tritons(name), series)


LIVE = 'pe_llm_live_windows{model="pe_llm"}'


def window_inputs_of(model, builder: PromptBuilder, dl19, query: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Real prompt ids and real projected passage embeddings [n, H] for one window."""
    texts = dl19_texts(dl19, n, query)
    prompt_ids, _ = builder.build(dl19[query]["query"], n)
    return np.array(prompt_ids), model.project(model.encode(texts))


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
            reranker = Reranker(WindowEmbeddings(TritonEncoder(client)), TritonWindowBackend(client),
                                prompt_builders[name])
            return await reranker.rerank(request_of(case))
        finally:
            await client.close()

    result = asyncio.run(rank())
    assert [r.id for r in result.ranking] == case["expected_ranking"]


# ---- 3. pe_llm decodes whole windows exactly as the in-process decoder


@pytest.mark.parametrize("mode,emit", [(Mode.FULL, 0), (Mode.FULL, 4), (Mode.FIRST, 0)])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_pe_llm_window_equals_decoding_in_process(name, mode, emit, clients, conformance_models, prompt_builders, dl19):
    model, _ = conformance_models[name]
    stepper = stepper_for(model)
    for query, n in ((0, 6), (1, 9), (3, 20)):
        ids, embeds = window_inputs_of(model, prompt_builders[name], dl19, query, n)
        job = WindowJob(ids, embeds, mode, emit)
        outcome = window_outcome(clients(name).infer("pe_llm", window_inputs(job), client_timeout=60))
        assert (outcome.order, outcome.decode_steps) == decode_alone(stepper, job), (query, n)
        assert sorted(outcome.order) == list(range(n)) and outcome.prefill_ms > 0


def test_prompt_head_comes_from_the_cache_across_windows(clients, conformance_models, prompt_builders, dl19):
    """CACHED_TOKENS: a window whose prompt begins with a head already prefilled (by any earlier window
    with the same size) takes those tokens from the cache; a foreign prompt none. Same order either way."""
    name = CHECKPOINTS[0]
    model, _ = conformance_models[name]
    client, builder = clients(name), prompt_builders[name]

    def run(ids, embeds):
        outcome = window_outcome(client.infer("pe_llm", window_inputs(WindowJob(ids, embeds)), client_timeout=60))
        return outcome.order, outcome.cached_tokens

    n = 11
    head = len(builder.shared_head(n))
    ids_a, embeds_a = window_inputs_of(model, builder, dl19, query=4, n=n)
    ids_b, embeds_b = window_inputs_of(model, builder, dl19, query=5, n=n)
    first_order, first = run(ids_a, embeds_a)
    assert first in (0, head)  # 0 unless an earlier test already ran a window of this size
    again_order, again = run(ids_a, embeds_a)
    assert again == head > 0 and again_order == first_order
    assert run(ids_b, embeds_b)[1] == head
    foreign = ids_a.copy()
    foreign[1] = (foreign[1] + 1) % model.llm.config.vocab_size
    assert run(foreign, embeds_a)[1] == 0


# ---- 4. a window whose caller left stops inside Triton


def test_a_window_past_its_deadline_stops_at_its_next_step(tritons, clients, conformance_models, prompt_builders, dl19):
    """A 100-passage window (98 decode steps) whose deadline passes while it decodes is dropped at its next step:
    pe_llm counts it cancelled and runs far fewer than its 98 steps. The deadline starts at a third of the time
    the window takes whole, measured here once warm; an attempt where the load made the window finish in time, or where the
    deadline passed before decoding began, is tried again with a shorter or longer deadline."""
    name = "tiny-a"
    model, _ = conformance_models[name]
    ids, embeds = window_inputs_of(model, prompt_builders[name], dl19, query=0, n=100)
    job = WindowJob(ids, embeds)
    cancelled = 'pe_llm_windows_total{model="pe_llm",status="cancelled"}'
    steps = 'pe_llm_decode_steps_total{model="pe_llm"}'
    alone = []
    for _ in range(2):  # how long this window takes here, whole, once warm (the first call is much slower)
        t0 = time.perf_counter()
        clients(name).infer("pe_llm", window_inputs(job))
        alone.append(time.perf_counter() - t0)
    timeout = min(alone) / 3
    tried = []
    for _ in range(8):
        before = (metric(tritons, name, cancelled), metric(tritons, name, steps))
        try:
            clients(name).infer("pe_llm", window_inputs(job), client_timeout=timeout)
        except InferenceServerException as exc:
            assert re.search("DEADLINE_EXCEEDED|Deadline", str(exc)), exc
        else:
            tried.append((round(timeout, 3), "finished"))
            timeout /= 2  # it finished within its deadline: the machine got faster; try again, shorter
            continue
        deadline = time.monotonic() + 60
        while metric(tritons, name, cancelled) == before[0] and time.monotonic() < deadline:
            time.sleep(0.1)  # the window is answered (cancelled) once its next step comes
        assert metric(tritons, name, cancelled) == before[0] + 1, "the abandoned window was never dropped"
        ran = metric(tritons, name, steps) - before[1]
        tried.append((round(timeout, 3), ran))
        assert ran < 98, "the abandoned window decoded to its end"
        if ran > 0:  # it was decoding when its deadline passed, and stopped
            assert metric(tritons, name, LIVE) == 0
            return
        timeout *= 2  # the deadline passed before its first step: try again, longer
    pytest.fail(f"no deadline landed while the window was decoding in 8 attempts (timeout, steps run): {tried}")


# ---- 5. bad inputs: clean errors, and the model keeps serving


def test_bad_inputs_return_errors_and_model_keeps_serving(tritons, clients, conformance_models, prompt_builders, dl19):
    name = "tiny-a"
    model, _ = conformance_models[name]
    client = clients(name)
    ids3, embeds3 = window_inputs_of(model, prompt_builders[name], dl19, query=4, n=3)
    ids2, _ = prompt_builders[name].build(dl19[4]["query"], 2)

    def infer(job: WindowJob):
        return window_outcome(client.infer("pe_llm", window_inputs(job), client_timeout=60))

    failed = 'pe_llm_windows_total{model="pe_llm",status="failed"}'
    failed_before = metric(tritons, name, failed)
    wide = np.concatenate([embeds3, np.zeros((3, 1), np.float32)], axis=1)
    with pytest.raises(InferenceServerException, match="passage embeddings"):
        infer(WindowJob(ids3, wide))
    with pytest.raises(InferenceServerException, match="2 placeholders for 3 passages"):
        infer(WindowJob(np.array(ids2), embeds3))
    with pytest.raises(InferenceServerException, match="prompt ids"):
        infer(WindowJob(np.concatenate([ids3, [10**9]]), embeds3))
    with pytest.raises(InferenceServerException, match="non-finite"):
        infer(WindowJob(ids3, np.full_like(embeds3, np.nan)))
    # those four windows reached the engine and failed there (the next two never reach it): counted "failed"
    # (the engine answers a window before it counts it: a bounded wait)
    deadline = time.monotonic() + 30
    while metric(tritons, name, failed) - failed_before < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(tritons, name, failed) - failed_before == 4
    bad_mode = window_inputs(WindowJob(ids3, embeds3))
    bad_mode[3] = tensor("MODE", np.array([b"sideways"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="MODE"):
        client.infer("pe_llm", bad_mode)
    with pytest.raises(InferenceServerException):  # a wrong dtype is refused by Triton before the model
        client.infer("pe_llm", [tensor("PROMPT_IDS", ids3.astype(np.float32)), tensor("PASSAGE_EMBEDS", embeds3)])
    assert infer(WindowJob(ids3, embeds3)).order == decode_alone(stepper_for(model), WindowJob(ids3, embeds3))[0]
    assert metric(tritons, name, LIVE) == 0


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


HOLD = len(WIDE_MARGIN_WINDOWS)


@pytest.fixture(scope="module")
def held(exported, tmp_path_factory):
    """held(name, step_batching) -> a Triton whose pe_llm holds windows until HOLD are waiting
    (``test_hold_windows``), so they are admitted between the same two steps whatever the machine's load.
    Step batching off goes through ``pe-rank export --step-batching off`` itself."""
    import shutil
    import subprocess
    import sys

    from pe_rank.service.embedded_triton import TritonServer

    running: dict[tuple[str, bool], TritonServer] = {}

    def get(name: str, step_batching: bool = True) -> TritonServer:
        if (name, step_batching) not in running:
            repo = tmp_path_factory.mktemp(f"held-{name}-{'on' if step_batching else 'off'}")
            if step_batching:
                shutil.copytree(exported(name), repo, dirs_exist_ok=True, symlinks=True)
            else:
                subprocess.run([sys.executable, "-m", "pe_rank", "export", "--model", str(CONFORMANCE / name),
                                "--repository", str(repo), "--target", "torch", "--cpu", "--step-batching", "off"],
                               check=True, capture_output=True, timeout=600)
            config = repo / "pe_llm" / "config.pbtxt"
            assert re.search(r'key: "step_batching"\s*value \{\s*string_value: "%s"' %
                             ("on" if step_batching else "off"), config.read_text())
            config.write_text(config.read_text() + 'parameters {\n  key: "test_hold_windows"\n  value {\n'
                                                   f'    string_value: "{HOLD}"\n  }}\n}}\n')
            running[(name, step_batching)] = TritonServer(repo).start()
        return running[(name, step_batching)]

    yield get
    for server in running.values():
        server.stop()


STEP_BATCHES = 'pe_llm_step_batch_size_count{model="pe_llm"}', 'pe_llm_step_batch_size_sum{model="pe_llm"}'


def rank_together(triton, requests: list[RerankRequest], builder: PromptBuilder) -> tuple[list[list[str]], float,
                                                                                            float, float]:
    """Every request at once through ``triton``: (rankings, step batches run, windows stepped, pe_llm calls).

    The counters are read once Triton has counted every window's call and decode step (bounded wait)."""
    calls = 'nv_inference_request_success{model="pe_llm",version="1"}'
    window_steps = sum(len(req.passages) - 2 for req in requests)  # full mode, one window each

    async def run():
        from tritonclient.grpc.aio import InferenceServerClient

        client = InferenceServerClient(triton.grpc_url)
        try:
            return await asyncio.gather(*(Reranker(WindowEmbeddings(TritonEncoder(client)),
                                                   TritonWindowBackend(client), builder).rerank(req)
                                          for req in requests))
        finally:
            await client.close()

    before = [metric_of(triton, series) for series in (*STEP_BATCHES, calls)]
    results = asyncio.run(run())
    deadline = time.monotonic() + 30
    while True:
        after = [metric_of(triton, series) for series in (*STEP_BATCHES, calls)]
        if (after[1] - before[1] >= window_steps and after[2] - before[2] >= len(requests)) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return ([[r.id for r in result.ranking] for result in results],
            *(a - b for a, b in zip(after, before)))


def test_concurrent_windows_rank_as_if_alone_and_share_forward_passes(held, conformance_models,
                                                                     prompt_builders, dl19):
    """Windows decoded together give the rankings they give alone; pe_llm's step batches (its own metrics)
    hold several windows; and Triton counts exactly one pe_llm call per window. pe_llm holds the windows
    until all have arrived (test_hold_windows), so they do decode together, however busy the machine."""
    name = "tiny-a"
    model, reranker = conformance_models[name]
    stepper = stepper_for(model)
    requests = []
    for q, n in WIDE_MARGIN_WINDOWS:
        hits = dl19[q]["hits"][:n]
        requests.append(RerankRequest(query=dl19[q]["query"], window_size=20, stride=10,
                                      passages=tuple(Passage(h["docid"], h["content"]) for h in hits)))
        _, margin = greedy_margins(stepper, *window_inputs_of(model, prompt_builders[name], dl19, q, n))
        assert margin > 10 * BATCH_TOLERANCE, f"query {q}, {n} passages: a near-tie, not comparable"
    # alone: in this process (pe_llm's windows equal in-process decoding, tested above)
    alone = [[r.id for r in asyncio.run(reranker.rerank(req)).ranking] for req in requests]
    together, steps_run, windows_stepped, llm_calls = rank_together(held(name), requests, prompt_builders[name])
    assert together == alone
    assert windows_stepped > steps_run > 0, "pe_llm never advanced two windows in one forward"
    assert windows_stepped == sum(n - 2 for _, n in WIDE_MARGIN_WINDOWS)  # every decode step of every window
    assert llm_calls == len(requests)  # one window each (n <= 20)


def test_step_batching_off_through_export_and_triton(held, conformance_models, prompt_builders, dl19):
    """`pe-rank export --step-batching off` reaches pe_llm in Triton: windows decoded together each step alone
    (every step batch is 1), and rank exactly as alone, near-ties included (tiny-b is full of 1e-6 ties)."""
    name = "tiny-b"
    _, reranker = conformance_models[name]
    requests = [RerankRequest(query=dl19[q]["query"], window_size=20, stride=10,
                              passages=tuple(Passage(h["docid"], h["content"]) for h in dl19[q]["hits"][:n]))
                for q, n in WIDE_MARGIN_WINDOWS]
    alone = [[r.id for r in asyncio.run(reranker.rerank(req)).ranking] for req in requests]
    together, steps_run, windows_stepped, llm_calls = rank_together(held(name, step_batching=False), requests,
                                                                    prompt_builders[name])
    assert together == alone
    assert steps_run == windows_stepped == sum(n - 2 for _, n in WIDE_MARGIN_WINDOWS), "a step batched windows"
    assert llm_calls == len(requests)


# ---- 7. pe_rank: a whole request as one Triton call


def rank_inputs(case_request: dict, **options) -> list[tclient.InferInput]:
    inputs = [tensor("QUERY", np.array([case_request["query"].encode()], dtype=np.object_)),
              tensor("PASSAGES", np.array([p["text"].encode() for p in case_request["passages"]], dtype=np.object_))]
    for name, value in options.items():
        if name == "MODE":
            inputs.append(tensor("MODE", np.array([value.encode()], dtype=np.object_)))
        else:
            inputs.append(tensor(name, np.array([value], dtype=np.int32)))
    return inputs


@pytest.mark.parametrize("item", conformance_cases(), ids=case_id)
def test_pe_rank_model_gives_the_conformance_rankings(item, clients):
    name, _, case = item
    r = case["request"]
    result = clients(name).infer("pe_rank", rank_inputs(r, WINDOW_SIZE=r["window_size"], STRIDE=r["stride"]),
                                 client_timeout=300)
    assert [r["passages"][i]["id"] for i in result.as_numpy("ORDER")] == case["expected_ranking"]


def test_pe_rank_top_n_mode_and_one_llm_call_per_window(tritons, clients, conformance_models, dl19):
    name = "tiny-b"
    _, reranker = conformance_models[name]
    hits = dl19[6]["hits"][:100]
    request = {"query": dl19[6]["query"], "passages": [{"id": h["docid"], "text": h["content"]} for h in hits]}
    calls = 'nv_inference_request_success{model="pe_llm",version="1"}'
    for mode, top_n in (("full", 0), ("full", 10), ("first", 5)):
        before = metric(tritons, name, calls)
        order = clients(name).infer("pe_rank", rank_inputs(request, TOP_N=top_n, MODE=mode),
                                    client_timeout=300).as_numpy("ORDER").tolist()
        deadline = time.monotonic() + 5
        while metric(tritons, name, calls) - before < 9 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert metric(tritons, name, calls) - before == 9  # 100 passages at 20/10: nine windows, nine calls
        want = asyncio.run(reranker.rerank(RerankRequest(
            query=request["query"], passages=tuple(Passage(p["id"], p["text"]) for p in request["passages"]),
            mode=Mode(mode), top_n=top_n or None)))
        assert order == [r.index for r in want.ranking], (mode, top_n)


def test_pe_rank_bad_inputs_are_invalid_arguments(clients):
    client = clients("tiny-a")
    good = {"query": "fleas", "passages": [{"text": "flea one"}, {"text": "dog"}]}
    for request, options, field in ((good, {"WINDOW_SIZE": 1}, "window_size"), (good, {"STRIDE": 0}, "stride"),
                                    (good, {"TOP_N": -1}, "top_n"), (good, {"MODE": "text"}, "MODE"),
                                    ({**good, "query": " "}, {}, "query"),
                                    ({**good, "passages": [{"text": ""}]}, {}, "passages[0].text"),
                                    ({**good, "query": "<PLACEHOLDER>"}, {}, "placeholder")):
        with pytest.raises(InferenceServerException, match=re.escape(field)) as err:
            client.infer("pe_rank", rank_inputs(request, **options), client_timeout=60)
        assert "INVALID_ARG" in str(err.value.status()), err.value
    assert client.infer("pe_rank", rank_inputs(good), client_timeout=60).as_numpy("ORDER").shape == (2,)


def test_pe_rank_requests_do_not_queue_behind_each_other(tritons, clients, dl19):
    """A short request sent while a long one is being ranked is answered first, while the long one still runs."""
    import threading

    client = clients("tiny-a")
    calls = 'nv_inference_request_success{model="pe_llm",version="1"}'
    q = dl19[9]
    long = {"query": q["query"], "passages": [{"text": h["content"]} for h in q["hits"]] * 3}  # 300: 29 windows
    short = {"query": q["query"], "passages": [{"text": h["content"]} for h in q["hits"][:3]]}
    done: list[str] = []

    def run(tag: str, request: dict) -> None:
        client.infer("pe_rank", rank_inputs(request), client_timeout=300)
        done.append(tag)

    before = metric(tritons, "tiny-a", calls)
    first = threading.Thread(target=run, args=("long", long))
    first.start()
    deadline = time.monotonic() + 120
    while metric(tritons, "tiny-a", calls) == before and time.monotonic() < deadline:
        time.sleep(0.02)  # the long request is being ranked: its first window answered
    assert metric(tritons, "tiny-a", calls) > before and not done
    run("short", short)
    long_windows_by_then = metric(tritons, "tiny-a", calls) - before - 1
    first.join(timeout=300)
    assert done == ["short", "long"]
    assert long_windows_by_then < 29, "the long request had already finished"


def test_a_cancelled_pe_rank_request_sends_no_further_window(tritons, clients, dl19):
    """pe_rank: a request whose client cancels it sends no window after that (its BLS loop stops)."""
    client = clients("tiny-a")
    triton = tritons("tiny-a")
    calls = 'nv_inference_request_success{model="pe_llm",version="1"}'
    pending = 'nv_inference_pending_request_count{model="pe_rank",version="1"}'
    q = dl19[10]
    long = {"query": q["query"], "passages": [{"text": h["content"]} for h in q["hits"]] * 3}  # 300: 29 windows
    before = metric_of(triton, calls)
    outcome: list = []
    call = client.async_infer("pe_rank", rank_inputs(long), callback=lambda result, error: outcome.append(error),
                              client_timeout=300)
    deadline = time.monotonic() + 120
    while metric_of(triton, calls) == before and time.monotonic() < deadline:
        time.sleep(0.02)  # its first window answered: the request is under way
    call.cancel()
    answered = metric_of(triton, calls) - before  # windows answered when the cancel went out
    deadline = time.monotonic() + 60
    while (metric_of(triton, pending) or metric_of(triton, LIVE)) and time.monotonic() < deadline:
        time.sleep(0.1)  # pe_rank has let the request go and pe_llm holds no window
    time.sleep(1.0)  # nothing more comes afterwards either
    sent = metric_of(triton, calls) - before
    # pe_rank sends a request's windows one after another: the one in flight at the cancel may still be
    # answered (on a busy machine it can sit in pe_llm's queue, neither pending in pe_rank nor live), none after
    assert answered <= sent <= answered + 1, f"{answered} windows answered at the cancel, {sent} in the end"
    assert 1 <= sent < 29 // 2, f"{sent} of 29 windows ran after the cancel"
    assert outcome and outcome[0] is not None  # the client saw its call cancelled, not a ranking


def test_pe_rank_unloaded_mid_request_still_answers_it(exported, dl19):
    """A request in flight when pe_rank is unloaded gets its whole ranking, then the model goes.

    Triton 2.51 itself holds the unload until in-flight responses are sent (this passes with the old
    finalize too); pe_rank's draining finalize is the backstop for a finalize that comes earlier
    (a shutdown past its exit timeout), where the old one stopped the loop and left callers hanging.
    """
    import threading

    from pe_rank.service.embedded_triton import TritonServer

    q = dl19[9]
    long = {"query": q["query"], "passages": [{"text": h["content"]} for h in q["hits"]] * 3}  # 300: 29 windows
    calls = 'nv_inference_request_success{model="pe_llm",version="1"}'
    with TritonServer(exported("tiny-a"), extra_args=["--model-control-mode=explicit", "--load-model=*"]) as triton:
        client = tclient.InferenceServerClient(triton.grpc_url)
        got: dict = {}

        def run() -> None:
            try:
                got["order"] = client.infer("pe_rank", rank_inputs(long), client_timeout=300).as_numpy("ORDER")
            except InferenceServerException as exc:
                got["error"] = exc

        worker = threading.Thread(target=run)
        worker.start()
        deadline = time.monotonic() + 120
        while metric_of(triton, calls) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)  # bounded wait for the state the test needs: its first window answered
        windows_before_unload = metric_of(triton, calls)
        client.unload_model("pe_rank")
        worker.join(timeout=300)
        assert 1 <= windows_before_unload < 29, "the unload did not land mid-request"
        assert "error" not in got, got.get("error")
        assert sorted(got["order"].tolist()) == list(range(300))
        assert metric_of(triton, calls) == 29
        deadline = time.monotonic() + 60
        while client.is_model_ready("pe_rank") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not client.is_model_ready("pe_rank")
