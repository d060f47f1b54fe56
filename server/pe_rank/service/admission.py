"""Admission by capacity: rank a few requests at once, queue a few more, refuse the rest at once.

Ranking is compute-bound: past the number of requests the machine ranks well side by side,
every admitted request only gets slower (16 clients on a 2-core CPU gave a 14 s p50 for a
1 s request). So, as TEI's concurrency limit and NIM's 429s do, a request that cannot start
soon is refused at once with a hint of when to retry, and the admitted ones keep their
latency. "Soon" is estimated from the work ahead: the windows of the requests queued and
running, times the seconds a window has recently taken at this load.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator

from .errors import DeadlineExceeded, Overloaded

_SMOOTHING = 0.2  # weight of the newest request in the seconds-per-window average


@dataclass(frozen=True)
class AdmissionLimits:
    max_running: int = 8         # requests ranked at once
    max_queued: int = 16         # requests waiting for a slot
    max_queue_wait_s: float = 2.0  # longest (estimated, then actual) wait for a slot


@dataclass
class _Waiter:
    future: asyncio.Future
    windows: int


class Admission:
    """FIFO slots on the event loop's thread; no locks (everything runs on the loop)."""

    def __init__(self, limits: AdmissionLimits) -> None:
        self.limits = limits
        self.running = 0
        self._running_windows = 0
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._s_per_window: float | None = None  # None until a request has finished

    @property
    def queued(self) -> int:
        return len(self._queue)

    def estimated_wait(self) -> float:
        """Seconds until a newcomer would start: the work ahead of it spread over the slots.

        Running requests are assumed half done. Unknown (nothing finished yet): 0.
        """
        if self._s_per_window is None:
            return 0.0
        ahead = sum(w.windows for w in self._queue) + self._running_windows / 2
        return self._s_per_window * ahead / self.limits.max_running

    def record(self, seconds: float, windows: int) -> None:
        """A request ranked ``windows`` windows in ``seconds``: update the per-window estimate."""
        per = seconds / max(windows, 1)
        prev = self._s_per_window
        self._s_per_window = per if prev is None else (1 - _SMOOTHING) * prev + _SMOOTHING * per

    @contextlib.asynccontextmanager
    async def slot(self, windows: int, deadline: float | None) -> AsyncIterator[float]:
        """Hold a slot while ranking; yields the seconds spent queued.

        Raises :class:`Overloaded` (with ``retry_after_s``) when the request cannot start within
        ``max_queue_wait_s``, at once if that is foreseeable, and :class:`DeadlineExceeded` when
        its deadline passes in the queue.
        """
        started = time.monotonic()
        if self.running < self.limits.max_running and not self._queue:
            self._take(windows)
        else:
            await self._wait(windows, deadline)
        try:
            yield time.monotonic() - started
        finally:
            self._release(windows)

    def _take(self, windows: int) -> None:
        self.running += 1
        self._running_windows += windows

    def _release(self, windows: int) -> None:
        self.running -= 1
        self._running_windows -= windows
        while self._queue and self.running < self.limits.max_running:
            waiter = self._queue.popleft()
            if not waiter.future.done():  # hand the slot over: no newcomer can take it in between
                self._take(waiter.windows)
                waiter.future.set_result(None)

    def _refusal(self, why: str) -> Overloaded:
        retry = max(self.estimated_wait(), 0.1)
        return Overloaded(f"{why}; retry in {retry:.1f} s", retry_after_s=retry)

    async def _wait(self, windows: int, deadline: float | None) -> None:
        limits = self.limits
        if len(self._queue) >= limits.max_queued:
            raise self._refusal(f"all {limits.max_running} slots busy and {limits.max_queued} requests queued")
        if self.estimated_wait() > limits.max_queue_wait_s:
            raise self._refusal(f"all {limits.max_running} slots busy; "
                                f"the wait would exceed {limits.max_queue_wait_s:g} s")
        waiter = _Waiter(asyncio.get_running_loop().create_future(), windows)
        self._queue.append(waiter)
        timeout = limits.max_queue_wait_s
        if deadline is not None:
            timeout = min(timeout, max(deadline - time.monotonic(), 0.0))
        try:
            # not wait_for: on Python 3.11 it swallows a cancellation that lands as the slot is handed over
            async with asyncio.timeout(timeout):
                await waiter.future
        except TimeoutError:
            self._leave(waiter)
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("deadline exceeded while queued for a slot") from None
            raise self._refusal(f"no slot freed within {limits.max_queue_wait_s:g} s") from None
        except BaseException:  # cancelled by the client
            self._leave(waiter)
            raise

    def _leave(self, waiter: _Waiter) -> None:
        """Give up a place in the queue; a slot handed over meanwhile is passed on."""
        if waiter.future.done() and not waiter.future.cancelled():
            self._release(waiter.windows)
            return
        waiter.future.cancel()
        with contextlib.suppress(ValueError):
            self._queue.remove(waiter)
