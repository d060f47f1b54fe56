"""The decode engine in-process: windows answered as decoded alone, batched, cancellable, isolated."""
from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from conftest import CONFORMANCE, decode_alone
from pe_rank.runtime.engine import DecodeEngine, EngineBackend, EngineClosed, WindowCancelled
from pe_rank.runtime.inprocess import load_in_process, stepper_for
from pe_rank.core.ranker import WindowJob
from pe_rank.core.types import Mode

# tiny-a windows (DL19 query, passages) whose every greedy decision is won by more than batched-GEMM noise
WIDE_MARGIN_WINDOWS = ((0, 4), (1, 7), (2, 11), (4, 20), (5, 9), (6, 13), (8, 6))


@pytest.fixture(scope="module")
def model():
    return load_in_process(CONFORMANCE / "tiny-a")[0]


def job_of(model, dl19, query: int, n: int, mode: Mode = Mode.FULL, emit: int = 0) -> WindowJob:
    texts = [h["content"] for h in dl19[query]["hits"][:n]]
    ids, _ = model.prompts.build(dl19[query]["query"], n)
    return WindowJob(np.asarray(ids), model.project(model.encode(texts)), mode, emit)


class Recorder:
    def __init__(self) -> None:
        self.batches: list[int] = []
        self.statuses: list[str] = []
        self.live: list[int] = []

    def on_step(self, batch: int) -> None:
        self.batches.append(batch)

    def on_window(self, outcome, status: str) -> None:
        self.statuses.append(status)

    def on_live(self, live: int) -> None:
        self.live.append(live)


def run_all(engine: DecodeEngine, jobs: list[WindowJob]):
    async def go():
        backend = EngineBackend(engine)
        return await asyncio.gather(*(backend.rank_window(job) for job in jobs), return_exceptions=True)

    return asyncio.run(go())


@pytest.mark.parametrize("mode,emit", [(Mode.FULL, 0), (Mode.FULL, 3), (Mode.FIRST, 0)])
def test_concurrent_windows_decode_as_alone_in_shared_steps(model, dl19, mode, emit):
    stepper = stepper_for(model)
    jobs = [job_of(model, dl19, q, n, mode, emit) for q, n in WIDE_MARGIN_WINDOWS]
    want = [decode_alone(stepper, job) for job in jobs]
    recorder = Recorder()
    engine = DecodeEngine(stepper, observer=recorder)
    try:
        outcomes = run_all(engine, jobs)
    finally:
        engine.close()
    assert [(o.order, o.decode_steps) for o in outcomes] == want
    assert all(sorted(o.order) == list(range(len(j.embeds))) for o, j in zip(outcomes, jobs))
    # every step ran once, but those of windows restarted alone after a near-tie in a batched step
    assert sum(recorder.batches) == sum(steps for _, steps in want) + engine.redone_steps
    if mode is Mode.FULL:
        assert max(recorder.batches) > 1, "the engine never batched steps of concurrent windows"
    assert recorder.statuses == ["done"] * len(jobs) and engine.live == 0
    for outcome, job in zip(outcomes, jobs):
        assert outcome.prompt_tokens == len(job.prompt_ids) and outcome.prefill_ms > 0


def test_without_step_batching_every_window_is_bit_identical_to_alone(model, dl19):
    """batch_steps=False (pe_llm's step_batching off): windows still interleave, each steps alone, so even
    windows whose decisions are closer than batched-GEMM noise (not only WIDE_MARGIN_WINDOWS) come out
    exactly as decoded alone."""
    stepper = stepper_for(model)
    jobs = [job_of(model, dl19, q, n) for q in range(12) for n in (8, 20)]
    want = [decode_alone(stepper, job) for job in jobs]
    recorder = Recorder()
    engine = DecodeEngine(stepper, observer=recorder, batch_steps=False)
    try:
        outcomes = run_all(engine, jobs)
    finally:
        engine.close()
    assert [(o.order, o.decode_steps) for o in outcomes] == want
    assert set(recorder.batches) == {1} and max(recorder.live) > 1  # interleaved, never batched


def test_more_windows_than_slots_all_complete(model, dl19):
    stepper = stepper_for(model)
    jobs = [job_of(model, dl19, q, n) for q, n in WIDE_MARGIN_WINDOWS]
    recorder = Recorder()
    engine = DecodeEngine(stepper, max_live=2, observer=recorder)
    try:
        outcomes = run_all(engine, jobs)
    finally:
        engine.close()
    assert [o.order for o in outcomes] == [decode_alone(stepper, job)[0] for job in jobs]
    assert max(recorder.live) <= 2 and max(recorder.batches) == 2


def test_a_failing_window_fails_alone(model, dl19):
    stepper = stepper_for(model)
    good = [job_of(model, dl19, q, n) for q, n in WIDE_MARGIN_WINDOWS[:3]]
    nan = WindowJob(good[1].prompt_ids, np.full_like(good[1].embeds, np.nan))
    wrong_width = WindowJob(good[0].prompt_ids, good[0].embeds[:, :-1])
    engine = DecodeEngine(stepper)
    try:
        outcomes = run_all(engine, [good[0], nan, good[1], wrong_width, good[2]])
    finally:
        engine.close()
    assert isinstance(outcomes[1], FloatingPointError) and isinstance(outcomes[3], ValueError)
    assert [o.order for o in (outcomes[0], outcomes[2], outcomes[4])] == [decode_alone(stepper, j)[0] for j in good]


def test_a_cancelled_window_is_dropped_at_its_next_step(model, dl19):
    """The caller's task is cancelled mid-decoding: the window stops, frees its slot, and later work goes on."""
    stepper = stepper_for(model)
    long_job = job_of(model, dl19, 3, 60)
    recorder = Recorder()
    engine = DecodeEngine(stepper, observer=recorder)
    stepped = threading.Event()
    original = recorder.on_step
    recorder.on_step = lambda batch: (original(batch), stepped.set())

    async def go():
        backend = EngineBackend(engine)
        task = asyncio.ensure_future(backend.rank_window(long_job))
        await asyncio.get_running_loop().run_in_executor(None, stepped.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return await backend.rank_window(job_of(model, dl19, 0, 4))

    try:
        after = asyncio.run(go())
    finally:
        engine.close()
    assert recorder.statuses == ["cancelled", "done"]
    assert 0 < len(recorder.batches) < 58, "the cancelled window kept decoding"
    assert after.order == decode_alone(stepper, job_of(model, dl19, 0, 4))[0] and engine.live == 0


def test_cancelled_before_prefill_and_closed_engine(model, dl19):
    stepper = stepper_for(model)
    engine = DecodeEngine(stepper)
    results, answered = [], threading.Event()
    engine.submit(job_of(model, dl19, 0, 4), lambda r: (results.append(r), answered.set()), is_cancelled=lambda: True)
    assert answered.wait(30)
    engine.close()
    assert len(results) == 1 and isinstance(results[0], WindowCancelled)
    with pytest.raises(EngineClosed):
        engine.submit(job_of(model, dl19, 0, 4), results.append)
