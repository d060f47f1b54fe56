"""The static KV pool and its batched step; the engine on it: budgets, faults, slots.

- A lone window's pool step is bit-identical to the reference step on a cache of its own; a
  batched step equals the windows stepped alone to float noise, and its device picks follow the
  host rule.
- The step is one set of operators whatever the batch (no Python loop over windows) and compiles
  with torch.compile(fullgraph=True).
- A failed step changes no window; the engine then steps its windows one by one, and only the
  window that fails alone fails.
- Slots are reused; a window too long for a slot runs on a cache of its own and never touches a
  neighbour; a burst of new windows is prefilled within the budget between two steps of a live one.
- The engine cannot hang: a raising ``is_cancelled`` or observer hook, or a fault in the loop itself.
"""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from conftest import CONFORMANCE, conformance_cases, decode_alone
from pe_rank.core.errors import EngineUnavailable
from pe_rank.core.ranker import WindowJob
from pe_rank.runtime.engine import DecodeEngine, EngineBackend, EngineLimits
from pe_rank.runtime.inprocess import stepper_for
from pe_rank.runtime.model import load_model
from pe_rank.runtime.pool import PoolStepper

TOLERANCE = 1e-4  # batched GEMMs and masked attention: float noise of scores up to ~10


@pytest.fixture(scope="module")
def model():
    return load_model(CONFORMANCE / "tiny-a")


def window(model, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids, _ = model.prompts.build(f"query number {seed} about fleas", n)
    return np.array(ids), rng.standard_normal((n, model.llm.config.hidden_size)).astype(np.float32)


def job(model, n: int, seed: int, **kwargs) -> WindowJob:
    return WindowJob(*window(model, n, seed), **kwargs)


def into_pool(pool: PoolStepper, slot: int, ids, embeds) -> tuple[int, np.ndarray]:
    prefill = pool.begin(slot, ids, embeds)
    pool.advance(prefill, prefill.remaining)
    return pool.finish(prefill)


def follow(stepper, ids, embeds, picks: list[int]) -> list[np.ndarray]:
    """The reference: a cache of its own, fed ``picks``."""
    state, first = stepper.start(ids, embeds)
    return [first] + [stepper.step(state, pick) for pick in picks]


def snapshot(pool: PoolStepper) -> list[torch.Tensor]:
    p = pool.pool
    return [t.clone() for t in (p.lengths, p.remaining, p.next_input, *p.keys, *p.values)]


# ---- the pool's step


def test_a_lone_window_steps_bit_identically_to_the_reference(model):
    stepper = stepper_for(model)
    pool = PoolStepper(stepper, slots=4, max_len=1024, max_passages=32)
    ids, embeds = window(model, 12, seed=3)
    pick, first = into_pool(pool, 2, ids, embeds)
    scores, picks = [first], []
    for _ in range(8):
        picks.append(pick)
        result = pool.step([2])
        pick = result.picks[0]
        scores.append(result.scores[0])
    for got, want in zip(scores, follow(stepper, ids, embeds, picks)):
        np.testing.assert_array_equal(got, want)


def test_batched_steps_of_changing_batches_equal_steps_alone(model):
    """Windows of different lengths join and leave batches: each row equals the window stepped alone
    (a key written into a neighbour's row would change it), and the device picks follow the rule."""
    stepper = stepper_for(model)
    pool = PoolStepper(stepper, slots=6, max_len=1024, max_passages=32)
    windows = [window(model, n, seed) for seed, n in enumerate((12, 3, 7, 10, 5))]
    picks: dict[int, list[int]] = {}
    scores: dict[int, list[np.ndarray]] = {}
    remaining = {}
    for slot, (ids, embeds) in enumerate(windows):
        pick, first = into_pool(pool, slot, ids, embeds)
        picks[slot], scores[slot], remaining[slot] = [pick], [first], np.ones(len(embeds), bool)
        remaining[slot][pick] = False
    for members in ([0, 1, 2, 3, 4], [1, 4], [0, 2, 3], [4, 3], [0]):
        result = pool.step(members)
        for slot, pick, row in zip(members, result.picks, result.scores):
            assert pick == int(np.argmax(np.where(remaining[slot], row, -np.inf)))  # the rule, on the device
            remaining[slot][pick] = False
            picks[slot].append(pick)
            scores[slot].append(row)
    for slot, (ids, embeds) in enumerate(windows):
        want = follow(stepper, ids, embeds, picks[slot][:-1])
        for k, (got, ref) in enumerate(zip(scores[slot], want)):
            np.testing.assert_allclose(got, ref, rtol=0, atol=TOLERANCE, err_msg=f"window {slot}, step {k}")


def test_a_failed_step_changes_no_window(model, monkeypatch):
    stepper = stepper_for(model)
    pool = PoolStepper(stepper, slots=4, max_len=1024, max_passages=32)
    windows = [window(model, n, seed) for seed, n in enumerate((6, 9, 4))]
    for slot, (ids, embeds) in enumerate(windows):
        into_pool(pool, slot, ids, embeds)
    before = snapshot(pool)
    monkeypatch.setattr(model.llm.layers[-1].mlp, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        pool.step([0, 1, 2])
    monkeypatch.undo()
    after = snapshot(pool)
    p = pool.pool
    for b, a in zip(before[:3], after[:3]):  # lengths, masks and next inputs: untouched
        assert torch.equal(b, a)
    for b, a in zip(before[3:], after[3:]):  # keys/values: at most the next free position was written
        for slot, length in enumerate(p.host_lengths[:3]):
            assert torch.equal(b[slot, :, :length], a[slot, :, :length])
    assert pool.step([0, 1, 2]).picks  # and the next step runs


def test_the_step_is_the_same_operators_whatever_the_batch(model):
    stepper = stepper_for(model)
    pool = PoolStepper(stepper, slots=16, max_len=1024, max_passages=32)
    for slot in range(16):
        into_pool(pool, slot, *window(model, 8, slot))

    def ops(batch: int) -> int:
        stepping = torch.ones(batch, dtype=torch.bool)
        with torch.inference_mode(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            pool.bucket_step(batch, 600, stepping)
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    counts = {batch: ops(batch) for batch in (2, 4, 16)}
    # a per-window loop grows with the batch (6,108 ops for one window, 43,368 for 32 before the pool);
    # here only view bookkeeping differs (a full-size slice is no operator)
    assert max(counts.values()) - min(counts.values()) <= 0.02 * min(counts.values()), counts
    assert counts[16] <= counts[2], counts


def test_the_step_compiles_whole(model):
    """torch.compile(fullgraph=True, dynamic=False): no graph break hides in the capturable step."""
    stepper = stepper_for(model)
    eager = PoolStepper(stepper, slots=4, max_len=1024, max_passages=16)
    compiled = PoolStepper(stepper, slots=4, max_len=1024, max_passages=16)
    for pool in (eager, compiled):
        for slot in range(4):
            into_pool(pool, slot, *window(model, 6, slot))
    stepping = torch.ones(4, dtype=torch.bool)
    step = torch.compile(compiled.bucket_step, fullgraph=True, dynamic=False)
    with torch.inference_mode():
        want = eager.bucket_step(4, 1024, stepping)
        got = step(4, 1024, stepping)
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE)


# ---- the engine on the pool


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.statuses: list[str] = []

    def on_step(self, batch: int) -> None:
        self.events.append(("step", batch))

    def on_prefill(self, tokens: int) -> None:
        self.events.append(("prefill", tokens))

    def on_window(self, outcome, status: str) -> None:
        self.statuses.append(status)

    def on_live(self, live: int) -> None:
        pass


def run_all(engine: DecodeEngine, jobs: list[WindowJob]):
    async def go():
        backend = EngineBackend(engine)
        return await asyncio.gather(*(backend.rank_window(j) for j in jobs), return_exceptions=True)

    return asyncio.run(asyncio.wait_for(go(), 120))


def test_slots_are_reused_and_a_long_window_never_touches_a_neighbour(model):
    """Eight windows through two slots sized for 12 passages; the 40-passage one does not fit and runs
    on its own cache. Every window decodes as alone (a write into a neighbour's row would change it)."""
    stepper = stepper_for(model)
    jobs = [job(model, n, seed) for seed, n in enumerate((6, 40, 9, 4, 12, 7, 5, 8))]
    limits = EngineLimits(max_live=2, max_tokens=len(jobs[4].prompt_ids) + 12, max_passages=16)
    engine = DecodeEngine(stepper, limits=limits, batch_steps=False)
    assert not engine.pool.fits(len(jobs[1].prompt_ids), 40) and engine.pool.fits(len(jobs[4].prompt_ids), 12)
    try:
        outcomes = run_all(engine, jobs)
    finally:
        engine.close()
    assert [(o.order, o.decode_steps) for o in outcomes] == [decode_alone(stepper, j) for j in jobs]
    assert engine.live == 0 and not engine.pool.pool.live.any()


def test_a_window_that_fails_its_step_fails_alone_and_no_window_is_fed_twice(model, monkeypatch):
    stepper = stepper_for(model)
    jobs = [job(model, n, seed) for seed, n in enumerate((8, 11, 6, 9))]
    want = [decode_alone(stepper, j) for j in jobs]
    engine = DecodeEngine(stepper, limits=EngineLimits(max_live=4, max_tokens=2048, max_passages=16))
    forward = engine.pool._forward
    bad_slot = {}

    def failing(inputs, rows, *args):
        if len(bad_slot) and bad_slot["slot"] in rows.tolist() and engine.pool.pool.host_lengths[bad_slot["slot"]] > \
                bad_slot["after"]:
            raise RuntimeError("injected step failure")
        return forward(inputs, rows, *args)

    monkeypatch.setattr(engine.pool, "_forward", failing)
    original_begin = engine.pool.begin

    def begin(slot, ids, embeds):  # the 11-passage window fails its third step, batched or alone
        prefill = original_begin(slot, ids, embeds)
        if len(embeds) == 11:
            bad_slot.update(slot=slot, after=len(ids) + 1)
        return prefill

    monkeypatch.setattr(engine.pool, "begin", begin)
    try:
        outcomes = run_all(engine, jobs)
    finally:
        engine.close()
    assert isinstance(outcomes[1], RuntimeError)
    assert [(o.order, o.decode_steps) for o in (outcomes[0], outcomes[2], outcomes[3])] == [want[0], want[2], want[3]]
    assert engine.healthy and engine.live == 0


def test_a_burst_is_prefilled_within_the_budget_between_steps_of_a_live_window(model):
    """While a 40-passage window decodes, 16 new windows arrive: at most `budget` prompt tokens are
    prefilled between two of its steps (without a budget all 16 would be)."""
    stepper = stepper_for(model)
    long_job = job(model, 40, seed=0)
    burst = [job(model, 12, seed) for seed in range(1, 17)]
    prompt = len(burst[0].prompt_ids)
    budget = prompt + 10  # one burst window and a bit per turn
    recorder = Recorder()
    engine = DecodeEngine(stepper, observer=recorder, batch_steps=True,
                          limits=EngineLimits(max_live=20, max_tokens=2048, max_passages=48, prefill_budget=budget))
    stepped = threading.Event()
    original = recorder.on_step
    recorder.on_step = lambda batch: (original(batch), stepped.set())

    async def go():
        backend = EngineBackend(engine)
        first = asyncio.ensure_future(backend.rank_window(long_job))
        await asyncio.get_running_loop().run_in_executor(None, stepped.wait, 60)
        return await asyncio.gather(first, *(backend.rank_window(j) for j in burst))

    try:
        outcomes = asyncio.run(asyncio.wait_for(go(), 120))
    finally:
        engine.close()
    assert all(sorted(o.order) == list(range(len(j.embeds))) for o, j in zip(outcomes, [long_job, *burst]))
    between, worst, live = 0, 0, False
    for kind, amount in recorder.events:  # from the first step on: a window is live and waits on each turn
        if kind == "prefill" and live:
            between += amount
            worst = max(worst, between)
        elif kind == "step":
            live, between = True, 0
    assert sum(a for k, a in recorder.events if k == "prefill") >= 16 * (prompt - len(
        model.prompts.shared_head(12)))  # the burst was prefilled ...
    assert worst <= budget, f"{worst} prompt tokens prefilled between two steps"  # ... a budget at a time


def test_a_prompt_longer_than_the_budget_is_prefilled_in_chunks_and_ranks_as_alone(model):
    stepper = stepper_for(model)
    jobs = [job(model, 30, seed) for seed in range(3)]
    recorder = Recorder()
    engine = DecodeEngine(stepper, observer=recorder, batch_steps=False,
                          limits=EngineLimits(max_live=4, max_tokens=2048, max_passages=48, prefill_budget=64))
    try:
        outcomes = run_all(engine, jobs)
    finally:
        engine.close()
    assert max(a for k, a in recorder.events if k == "prefill") <= 64
    for o, j in zip(outcomes, jobs):  # chunked prefill: other float rounding, the same decisions here
        order, _ = decode_alone(stepper, j)
        assert o.order == order


# ---- an engine that cannot hang (issue 22)


def test_a_raising_is_cancelled_ends_its_window_only(model):
    stepper = stepper_for(model)
    jobs = [job(model, n, seed) for seed, n in enumerate((6, 9, 7))]
    engine = DecodeEngine(stepper, limits=EngineLimits(max_live=4, max_tokens=2048, max_passages=16))
    results: list = [None] * 3
    done = [threading.Event() for _ in jobs]

    def reply(k):
        return lambda result: (results.__setitem__(k, result), done[k].set())

    def broken() -> bool:
        raise RuntimeError("the response sender is gone")

    try:
        for k, j in enumerate(jobs):
            engine.submit(j, reply(k), broken if k == 1 else (lambda: False))
        assert all(event.wait(60) for event in done), "a window was never answered"
    finally:
        engine.close()
    assert isinstance(results[1], EngineUnavailable)
    assert [results[0].order, results[2].order] == [decode_alone(stepper, jobs[0])[0], decode_alone(stepper, jobs[2])[0]]


def test_a_raising_observer_hook_does_not_stop_the_ranking(model):
    class Broken(Recorder):
        def on_step(self, batch: int) -> None:
            raise RuntimeError("metrics backend down")

        def on_window(self, outcome, status: str) -> None:
            raise RuntimeError("metrics backend down")

    stepper = stepper_for(model)
    jobs = [job(model, n, seed) for seed, n in enumerate((6, 9))]
    engine = DecodeEngine(stepper, observer=Broken(), limits=EngineLimits(max_live=4, max_tokens=2048, max_passages=16))
    try:
        outcomes = run_all(engine, jobs)
    finally:
        engine.close()
    assert [o.order for o in outcomes] == [decode_alone(stepper, j)[0] for j in jobs] and engine.healthy


def test_a_fault_of_the_loop_itself_answers_every_window_unavailable_and_refuses_more(model, monkeypatch):
    stepper = stepper_for(model)
    engine = DecodeEngine(stepper, limits=EngineLimits(max_live=4, max_tokens=2048, max_passages=16))
    monkeypatch.setattr(engine, "_step", lambda: (_ for _ in ()).throw(KeyError("a bug in the loop")))
    try:
        outcomes = run_all(engine, [job(model, 6, 0), job(model, 9, 1)])
        assert all(isinstance(o, EngineUnavailable) for o in outcomes), outcomes
        assert not engine.healthy and engine.live == 0
        with pytest.raises(EngineUnavailable, match="failed"):
            engine.submit(job(model, 6, 2), lambda result: None)
    finally:
        engine.close()


def test_closing_answers_queued_and_live_windows_unavailable(model):
    stepper = stepper_for(model)
    engine = DecodeEngine(stepper, limits=EngineLimits(max_live=1, max_tokens=2048, max_passages=64))
    results, answered = [], threading.Event()
    stepped = threading.Event()
    engine.observer = type("O", (Recorder,), {"on_step": lambda self, b: stepped.set()})()
    for seed in range(3):
        engine.submit(job(model, 60, seed), lambda r: (results.append(r), len(results) == 3 and answered.set()))
    assert stepped.wait(60)
    engine.close()
    assert answered.wait(30)
    assert any(isinstance(r, EngineUnavailable) for r in results)  # the queued ones at least


# ---- rankings under load are the rankings alone


def test_a_window_whose_prefill_spans_batched_steps_ranks_as_alone(model):
    """A batched step computes every row below its top, the rows of windows still prefilling too: their
    throw-away keys must not land inside the prompt already written (a fresh slot's position 0 did).
    The reference is the same chunked prefill with no step in between."""
    ids, embeds = window(model, 12, seed=3)

    def decode(neighbours: bool) -> list[np.ndarray]:
        pool = PoolStepper(stepper_for(model), slots=4, max_len=1024, max_passages=32)
        for slot, seed in ((1, 1), (2, 2)):
            into_pool(pool, slot, *window(model, 6, seed))
        prefill = pool.begin(0, ids, embeds)
        pool.advance(prefill, 5)
        if neighbours:
            pool.step([1, 2])  # rows 0..2: slot 0 is mid-prefill
        pool.advance(prefill, prefill.remaining)
        scores = [pool.finish(prefill)[1]]
        scores += [pool.step([0]).scores[0] for _ in range(6)]
        return scores

    for got, want in zip(decode(neighbours=True), decode(neighbours=False)):
        np.testing.assert_array_equal(got, want)


def submitted_together(engine: DecodeEngine, jobs: list[WindowJob]):
    """Every job queued before the engine's next turn, so the first step batches them all."""
    async def go():
        backend = EngineBackend(engine)
        with engine.submitting():  # the engine thread waits on this lock for new windows
            futures = [asyncio.ensure_future(backend.rank_window(j)) for j in jobs]
            await asyncio.sleep(0)  # each future submits on its first step, inside the lock
        return await asyncio.gather(*futures)

    return asyncio.run(asyncio.wait_for(go(), 120))


def test_a_near_tie_in_a_batched_step_restarts_the_window_alone_and_ranks_as_alone(model):
    """With a margin no gap passes, every window's first batched decision is a near-tie: each is prefilled
    again and decoded alone, and ranks exactly as decoded alone."""
    stepper = stepper_for(model)
    jobs = [job(model, n, seed) for seed, n in enumerate((12, 3, 7, 10, 5))]
    engine = DecodeEngine(stepper, tie_margin=1e9, limits=EngineLimits(max_live=8, prefill_budget=4096))
    try:
        outcomes = submitted_together(engine, jobs)
    finally:
        engine.close()
    assert engine.restarts == len(jobs)
    for outcome, j in zip(outcomes, jobs):
        assert outcome.order == decode_alone(stepper, j)[0]


def test_concurrent_requests_of_near_tied_passages_rank_as_each_alone():
    """tiny-b has passages whose scores differ by less than a batched step's float noise: sixteen
    concurrent requests through one engine give the original's rankings, not a batch's."""
    from pe_rank.runtime.inprocess import in_process_reranker
    from test_conformance import request_of

    tiny_b = load_model(CONFORMANCE / "tiny-b")
    reranker = in_process_reranker(tiny_b)
    cases = [c for name, _, c in conformance_cases() if name == "tiny-b"]
    jobs = [cases[i % len(cases)] for i in range(16)]

    async def go():
        return await asyncio.gather(*(reranker.rerank(request_of(c)) for c in jobs))

    try:
        results = asyncio.run(asyncio.wait_for(go(), 300))
    finally:
        tiny_b.engine.close()
    assert [[r.id for r in res.ranking] for res in results] == [c["expected_ranking"] for c in jobs]


def test_batch_noise_reports_every_decision_of_real_windows(model):
    """The noise tool behind the README's figures: every window's every decision compared, the noise
    within float noise, restarts growing with the margin."""
    from conftest import DATA
    from pe_rank.tools.batch_noise import MARGINS, measure
    from pe_rank.tools.evaluation import load_rankllm

    report = measure(model, load_rankllm(DATA / "bm25_dl19.json.gz")[:3], tie_margin=1e-3)
    assert report["windows"] == 6 and report["decisions"] == 6 * 19  # the prefill's and 18 steps' scores
    assert 0 <= report["max_abs_score_diff"] < TOLERANCE
    restarts = [report["windows_restarted_alone_by_margin"][str(m)] for m in MARGINS]
    assert restarts == sorted(restarts) and report["windows_restarted_alone"] == restarts[MARGINS.index(1e-3)]
