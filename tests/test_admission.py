"""Admission by capacity (service/admission.py) on a real event loop: slots, the queue, refusals."""
from __future__ import annotations

import asyncio
import time

import pytest

from pe_rank.service.admission import Admission, AdmissionLimits
from pe_rank.service.errors import DeadlineExceeded, Overloaded


def run(coro):
    return asyncio.run(coro)


async def hold(admission: Admission, release: asyncio.Event, log: list, name: str, windows: int = 1,
               deadline: float | None = None) -> float:
    async with admission.slot(windows, deadline) as queued_s:
        log.append(name)
        await release.wait()
        return queued_s


async def one_slot_taken(max_queue_wait_s: float, windows: int = 1, per_window_s: float | None = None):
    """An admission with one slot, held by a task until ``release`` is set: (admission, release, holder)."""
    admission = Admission(AdmissionLimits(max_running=1, max_queued=10, max_queue_wait_s=max_queue_wait_s))
    if per_window_s is not None:
        admission.record(seconds=per_window_s * 4, windows=4)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(admission, release, [], "first", windows=windows))
    await asyncio.sleep(0.01)
    return admission, release, holder


async def refused_with(admission: Admission, error: type, deadline: float | None = None):
    with pytest.raises(error) as raised:
        async with admission.slot(1, deadline):
            pass
    return raised.value


def test_requests_past_the_slots_and_the_queue_are_refused_at_once():
    async def main():
        admission = Admission(AdmissionLimits(max_running=2, max_queued=1, max_queue_wait_s=30))
        release, log = asyncio.Event(), []
        tasks = [asyncio.create_task(hold(admission, release, log, str(i))) for i in range(3)]
        await asyncio.sleep(0.05)
        assert admission.running == 2 and admission.queued == 1 and log == ["0", "1"]
        # at once: the refusal comes on the first step of the coroutine, before it ever waits on the loop
        entering = admission.slot(1, None).__aenter__()
        with pytest.raises(Overloaded) as refused:
            entering.send(None)
        assert "1 requests queued" in refused.value.message and refused.value.retry_after_s > 0
        release.set()
        queued = await asyncio.gather(*tasks)
        assert log == ["0", "1", "2"] and queued[2] > 0 and admission.running == 0 and admission.queued == 0

    run(main())


def test_the_queue_is_first_in_first_out_and_slots_are_handed_over():
    async def main():
        admission = Admission(AdmissionLimits(max_running=1, max_queued=10, max_queue_wait_s=30))
        gates = [asyncio.Event() for _ in range(4)]
        log: list[str] = []
        tasks = []
        for i, gate in enumerate(gates):
            tasks.append(asyncio.create_task(hold(admission, gate, log, str(i))))
            await asyncio.sleep(0.01)
        for gate in gates:
            gate.set()
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert log == ["0", "1", "2", "3"]

    run(main())


def test_a_foreseeably_long_wait_is_refused_with_the_estimate_as_retry_hint():
    async def main():
        admission, release, holder = await one_slot_taken(1.0, windows=10, per_window_s=0.5)  # ~5 s of work
        refused = await refused_with(admission, Overloaded)
        assert refused.retry_after_s == pytest.approx(0.5 * 10 / 2)  # running: assumed half done
        release.set()
        await holder

    run(main())


def test_a_wait_that_runs_past_the_limit_is_refused_and_leaves_the_queue():
    async def main():
        admission, release, holder = await one_slot_taken(0.1)
        refused = await refused_with(admission, Overloaded)
        assert "no slot freed within 0.1 s" in refused.message and admission.queued == 0
        release.set()
        await holder
        assert admission.running == 0

    run(main())


def test_a_deadline_passing_in_the_queue_is_deadline_exceeded():
    async def main():
        admission, release, holder = await one_slot_taken(30)
        await refused_with(admission, DeadlineExceeded, deadline=time.monotonic() + 0.1)
        assert admission.queued == 0
        release.set()
        await holder

    run(main())


def test_a_cancelled_waiter_frees_its_place_and_never_holds_a_slot():
    async def main():
        admission = Admission(AdmissionLimits(max_running=1, max_queued=10, max_queue_wait_s=30))
        release, log = asyncio.Event(), []
        first = asyncio.create_task(hold(admission, release, log, "first"))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(hold(admission, release, log, "gone"))
        after = asyncio.create_task(hold(admission, release, log, "after"))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        assert admission.queued == 1
        release.set()
        await asyncio.gather(first, after)
        assert log == ["first", "after"] and admission.running == 0 and admission.queued == 0

    run(main())


def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on():
    """The hand-over and the cancellation in one tick: the waiter never runs, its slot goes to the next."""
    async def main():
        admission = Admission(AdmissionLimits(max_running=1, max_queued=10, max_queue_wait_s=30))
        release, log = asyncio.Event(), []
        unlucky: asyncio.Task | None = None

        async def first() -> None:
            async with admission.slot(1, None):
                log.append("first")
                await release.wait()
            unlucky.cancel()  # the slot was just handed to it; it has not resumed yet

        holder = asyncio.create_task(first())
        await asyncio.sleep(0.01)
        unlucky = asyncio.create_task(hold(admission, asyncio.Event(), log, "unlucky"))
        last = asyncio.create_task(hold(admission, release, log, "last"))
        await asyncio.sleep(0.01)
        release.set()
        await holder
        await asyncio.wait_for(asyncio.gather(unlucky, last, return_exceptions=True), 5)
        assert log == ["first", "last"] and admission.running == 0 and unlucky.cancelled()

    run(main())
