"""In-flight batching of whole windows: one engine loop owns the LLM and steps every live window at once.

A window is submitted whole (:class:`~pe_rank.core.ranker.WindowJob`) and answered when it is
decided. Between decode steps the loop admits new windows (their prefill runs as they
arrive), then advances every live window by one decode step in ONE batched forward
(:meth:`TorchStepper.step_many`), and answers each window the moment its decoder is done. A
window never waits for another window to finish, and there is no batching delay: at one
window a step starts as soon as the previous one ended. A window whose caller went away
(``is_cancelled``) is dropped before its next step and its KV cache freed.

Live windows sit in a fixed set of slots (``max_live``), not a growing list: a batch is a
set of slot indices, the shape CUDA graphs of the batched step will want.

The same engine runs in-process (:class:`EngineBackend`) and inside Triton's ``pe_llm``.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from ..core.errors import EngineUnavailable, WindowCancelled
from ..core.ranker import WindowDecoder, WindowJob, WindowOutcome
from .steps import TorchStepper, WindowState

log = logging.getLogger("pe_rank.engine")


class EngineClosed(EngineUnavailable):
    """The engine was closed (its model is unloading): the window may be retried on another Triton."""


Reply = Callable[[WindowOutcome | BaseException], None]


class EngineObserver(Protocol):
    """Telemetry hooks, called on the engine thread (Triton metrics, benchmarks)."""

    def on_step(self, batch: int) -> None: ...

    def on_window(self, outcome: WindowOutcome | None, status: str) -> None: ...

    def on_live(self, live: int) -> None: ...


class NoObserver:
    def on_step(self, batch: int) -> None:
        pass

    def on_window(self, outcome: WindowOutcome | None, status: str) -> None:
        pass

    def on_live(self, live: int) -> None:
        pass


@dataclass
class _Window:
    job: WindowJob
    reply: Reply
    is_cancelled: Callable[[], bool]
    decoder: WindowDecoder | None = None
    state: WindowState | None = None
    pick: int = -1                # the passage to feed at the next step
    outcome: WindowOutcome = field(default_factory=lambda: WindowOutcome(order=[]))
    decode_started: float = 0.0


class DecodeEngine:
    def __init__(self, stepper: TorchStepper, max_live: int = 64, observer: EngineObserver | None = None,
                 batch_steps: bool = True) -> None:
        """``batch_steps=False``: every window steps alone, bit-identical to a lone request.

        Batched steps differ from lone ones by float noise (~1e-6), which can flip a near-tie
        between two passages (seen: a gap of 1.2e-7) so a ranking under load may differ from the
        same request alone; windows still interleave, only the batching gain is lost.
        """
        if max_live < 1:
            raise ValueError("max_live must be at least 1")
        self.stepper = stepper
        self.batch_steps = batch_steps
        self.observer = observer or NoObserver()
        self.slots: list[_Window | None] = [None] * max_live
        self._pending: collections.deque[_Window] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    # ---- callers (any thread)

    def submit(self, job: WindowJob, reply: Reply, is_cancelled: Callable[[], bool] = lambda: False) -> None:
        """Queue a window; ``reply`` gets its outcome or exception, on the engine thread, exactly once."""
        with self._wake:
            if self._closed:
                raise EngineClosed("the decode engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pe-rank-engine", daemon=True)
                self._thread.start()
            self._pending.append(_Window(job, reply, is_cancelled))
            self._wake.notify()

    @property
    def live(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def close(self) -> None:
        """Stop the loop; windows still queued or live are answered with EngineClosed."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # ---- the loop (engine thread)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._closed and not self._pending and self.live == 0:
                    self._wake.wait()
                if self._closed:
                    break
                admitted = self._take_pending()
            for window, slot in admitted:
                self._admit(window, slot)
            self._drop_cancelled()
            self._step()
        self._shutdown()

    def _take_pending(self) -> list[tuple[_Window, int]]:
        free = [k for k, slot in enumerate(self.slots) if slot is None]
        taken = []
        while self._pending and free:
            taken.append((self._pending.popleft(), free.pop(0)))
        return taken

    def _admit(self, window: _Window, slot: int) -> None:
        """Prefill a new window into ``slot``; a window decided by its prefill is answered at once."""
        if window.is_cancelled():
            return self._answer(window, WindowCancelled("cancelled before its prefill"), "cancelled")
        job = window.job
        try:
            t0 = time.perf_counter()
            window.decoder = WindowDecoder(len(job.embeds), job.mode, job.emit)
            window.state, scores = self.stepper.start(job.prompt_ids, job.embeds)
            window.decode_started = time.perf_counter()
            window.outcome = WindowOutcome(order=[], prompt_tokens=len(job.prompt_ids),
                                           cached_tokens=window.state.cached_tokens,
                                           prefill_ms=(window.decode_started - t0) * 1e3)
            pick = window.decoder.feed(scores)
        except Exception as exc:  # a bad window fails alone; the engine goes on
            return self._answer(window, exc, "failed")
        if pick is None:
            return self._finish(window)
        window.pick = pick
        self.slots[slot] = window
        self.observer.on_live(self.live)

    def _drop_cancelled(self) -> None:
        for k, window in enumerate(self.slots):
            if window is not None and window.is_cancelled():
                self._free(k)
                self._answer(window, WindowCancelled("cancelled during decoding"), "cancelled")

    def _step(self) -> None:
        """One decode step for every live window, in one forward when it can be."""
        live = [k for k, window in enumerate(self.slots) if window is not None]
        if not live:
            return
        windows = [self.slots[k] for k in live]
        batches = [windows] if self.batch_steps else [[w] for w in windows]
        rows = [row for batch in batches for row in self._forward(batch)]
        for k, window, row in zip(live, windows, rows):
            self._advance(k, window, row)

    def _forward(self, windows: list[_Window]) -> list:
        """Each window's scores (or the exception its step raised)."""
        try:
            rows: list = self.stepper.step_many([w.state for w in windows], [w.pick for w in windows])
            self.observer.on_step(len(windows))
            return rows
        except Exception:  # step_many leaves every state untouched when it raises: retry each alone
            rows = []
            for window in windows:
                try:
                    rows.append(self.stepper.step(window.state, window.pick))
                    self.observer.on_step(1)
                except Exception as exc:
                    rows.append(exc)
            return rows

    def _advance(self, slot: int, window: _Window, row) -> None:
        try:
            if isinstance(row, Exception):
                raise row
            pick = window.decoder.feed(row)
        except Exception as exc:
            self._free(slot)
            return self._answer(window, exc, "failed")
        if pick is None:
            self._free(slot)
            return self._finish(window)
        window.pick = pick

    def _finish(self, window: _Window) -> None:
        outcome = window.outcome
        outcome.order = window.decoder.order
        outcome.decode_steps = window.decoder.decode_steps
        outcome.decode_ms = (time.perf_counter() - window.decode_started) * 1e3
        self._answer(window, outcome, "done")

    def _free(self, slot: int) -> None:
        self.slots[slot] = None  # drops the window's KV cache
        self.observer.on_live(self.live)

    def _answer(self, window: _Window, result: WindowOutcome | BaseException, status: str) -> None:
        window.state = None
        try:
            window.reply(result)
        except Exception:  # a caller's reply hook must not take the engine down
            log.exception("window reply failed")
        self.observer.on_window(result if isinstance(result, WindowOutcome) else None, status)

    def _shutdown(self) -> None:
        with self._wake:
            queued = list(self._pending)
            self._pending.clear()
        for k, window in enumerate(self.slots):
            if window is not None:
                self._free(k)
                self._answer(window, EngineClosed("the decode engine closed"), "failed")
        for window in queued:
            self._answer(window, EngineClosed("the decode engine closed"), "failed")


class EngineBackend:
    """The in-process window backend: concurrent requests in this process share the engine's batches."""

    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine

    async def rank_window(self, job: WindowJob) -> WindowOutcome:
        future: concurrent.futures.Future = concurrent.futures.Future()

        def reply(result: WindowOutcome | BaseException) -> None:
            try:
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
            except concurrent.futures.InvalidStateError:
                pass  # the caller cancelled meanwhile

        self.engine.submit(job, reply, future.cancelled)
        return await asyncio.wrap_future(future)
