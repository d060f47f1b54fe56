"""In-flight batching of whole windows: one engine loop owns the LLM and steps every live window at once.

A window is submitted whole (:class:`~pe_rank.core.ranker.WindowJob`) and answered when it is
decided. Each turn of the loop:

1. takes queued windows into free slots of the static KV pool (:mod:`~pe_rank.runtime.pool`);
2. prefills them within a budget of prompt tokens (``prefill_budget``, chunked prefill as
   Sarathi-Serve and vLLM do), so a burst of new windows delays the live ones by one budget per
   turn, not by every prefill at once; a prompt longer than the budget is prefilled in chunks of
   exactly the budget, so its numerics never depend on the load;
3. drops windows whose caller left (``is_cancelled``) and frees their slots;
4. advances every live window by one decode step in ONE batched forward over the pool.

Rankings under load are the rankings alone. A batched step's scores differ from a lone step's by
float noise (other GEMM shapes, masked attention over padded keys; ~1e-5 of scores up to ~10 in
float32), enough to flip a near-tie. So when a batched step leaves a window a decision whose score
gap is within ``tie_margin`` (relative to its largest score), the window is not fed: it is
prefilled again and decoded alone to its end, bit-identical to the same window with no other load
(and so to the original PE-Rank). Each window restarts at most once; ``restarts`` counts them.

The device picks each window's next passage; its :class:`~pe_rank.core.ranker.WindowDecoder`
checks the pick on the host (the rule is written once, there) and says when the window is
decided, and the window is answered at once. There is no batching delay: at one window a step
starts as soon as the previous one ended. A window that does not fit a slot (prompt longer than
the pool's rows) runs on a cache of its own (:class:`~pe_rank.runtime.steps.TorchStepper`),
stepped alone.

Faults stay where they belong: a malformed window fails alone; a step that raises changes no
window (the pool moves only after a forward succeeds), so its windows are retried one by one and
only a window that fails alone fails; a reply hook, a telemetry hook or an ``is_cancelled`` that
raises affects its own window at most. Anything else that escapes the loop is the engine's death:
every window is answered with :class:`~pe_rank.core.errors.EngineUnavailable` (UNAVAILABLE,
retried elsewhere by the server), ``healthy`` turns False and later windows are refused at once.
Answers leave through a reply thread, so a slow response sender never holds the steps.

The same engine runs in-process (:class:`EngineBackend`) and inside Triton's ``pe_llm``.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from ..core.errors import EngineUnavailable, WindowCancelled
from ..core.ranker import WindowDecoder, WindowJob, WindowOutcome
from .pool import PoolStepper, Prefill
from .steps import TorchStepper, WindowState

log = logging.getLogger("pe_rank.engine")


class EngineClosed(EngineUnavailable):
    """The engine was closed (its model is unloading): the window may be retried on another Triton."""


Reply = Callable[[WindowOutcome | BaseException], None]


class EngineObserver(Protocol):
    """Telemetry hooks, called on the engine thread (Triton metrics, benchmarks); a hook that raises is logged."""

    def on_step(self, batch: int) -> None: ...

    def on_prefill(self, tokens: int) -> None: ...

    def on_window(self, outcome: WindowOutcome | None, status: str) -> None: ...

    def on_live(self, live: int) -> None: ...

    def on_restart(self) -> None: ...


class NoObserver:
    """An observer may implement any of the hooks; the engine calls those it has."""


@dataclass
class EngineLimits:
    """The pool's shape and the prefill budget (pe_llm's config parameters)."""

    max_live: int = 64          # slots: windows decoded at once
    max_tokens: int = 1024      # a slot's length: a window's prompt plus its passages
    max_passages: int = 100     # passages per window in a slot
    prefill_budget: int = 512   # prompt tokens prefilled per engine turn


@dataclass
class _Window:
    job: WindowJob
    reply: Reply
    is_cancelled: Callable[[], bool]
    slot: int = -1
    decoder: WindowDecoder | None = None
    prefill: Prefill | None = None   # while its prompt is being prefilled into the pool
    own_cache: bool = False          # too long for a slot: prefilled and stepped on a cache of its own
    state: WindowState | None = None  # that cache
    pick: int = -1                    # the passage fed at the next step (overflow windows)
    outcome: WindowOutcome = field(default_factory=lambda: WindowOutcome(order=[]))
    alone: bool = False               # restarted after a near-tie in a batched step: steps alone from now
    started: float = 0.0
    decode_started: float = 0.0


def default_tie_margin(dtype) -> float:
    """Relative score gap below which a batched step's decision is redone alone. float32: 3e-4, above the
    largest batched-vs-lone noise measured on the demo model over DL19's 86 windows decoded together
    (1.4e-4 relative), where it restarts 4 of 86 windows (1e-3 would restart 24;
    ``python -m pe_rank.tools.batch_noise``). float16/bfloat16: 0 (off): their noise is thousands of
    times larger, so the guard would redo nearly every window, and their lone rankings already differ
    from the float32 original's."""
    import torch

    return 3e-4 if dtype == torch.float32 else 0.0


def relative_gap(decoder: WindowDecoder, scores: np.ndarray) -> float:
    """The gap that decides the decoder's next feed, relative to the largest score (at least 1): what
    ``tie_margin`` is compared with."""
    return decoder.margin(scores) / max(1.0, float(np.abs(scores).max()))


class DecodeEngine:
    def __init__(self, stepper: TorchStepper, max_live: int = 64, observer: EngineObserver | None = None,
                 batch_steps: bool = True, limits: EngineLimits | None = None, graphs: bool = False,
                 tie_margin: float | None = None) -> None:
        """``batch_steps=False``: every window steps alone (no restarts needed, no batching gain).

        ``tie_margin`` (default :func:`default_tie_margin`; 0 turns the guard off, and a near-tie may
        then rank differently under load than alone): see the module's docstring.
        """
        limits = limits or EngineLimits(max_live=max_live)
        if min(limits.max_live, limits.max_tokens, limits.max_passages, limits.prefill_budget) < 1:
            raise ValueError("max_live, max_tokens, max_passages and prefill_budget must be at least 1")
        self.stepper, self.limits, self.batch_steps = stepper, limits, batch_steps
        self.tie_margin = default_tie_margin(stepper.dtype) if tie_margin is None else float(tie_margin)
        if not self.tie_margin >= 0:
            raise ValueError("tie_margin must be a number >= 0")
        self.restarts = 0  # windows redone alone after a near-tie in a batched step
        self.redone_steps = 0  # the steps those windows had run before
        self.observer = observer or NoObserver()
        self.pool = PoolStepper(stepper, limits.max_live, limits.max_tokens, limits.max_passages, graphs=graphs)
        self.slots: list[_Window | None] = [None] * limits.max_live
        self.mismatches = 0  # device picks the host rule overruled (none expected)
        self.failure: BaseException | None = None
        self._pending: collections.deque[_Window] = collections.deque()
        self._prefilling: collections.deque[_Window] = collections.deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._replies: queue.SimpleQueue = queue.SimpleQueue()
        self._replier = threading.Thread(target=self._send_replies, name="pe-rank-engine-replies", daemon=True)
        self._replier.start()

    # ---- callers (any thread)

    def submit(self, job: WindowJob, reply: Reply, is_cancelled: Callable[[], bool] = lambda: False) -> None:
        """Queue a window; ``reply`` gets its outcome or exception, on the reply thread, exactly once."""
        with self._wake:
            if self._closed:
                raise EngineClosed("the decode engine is closed")
            if self.failure is not None:
                raise EngineUnavailable(f"the decode engine failed: {self.failure!r}")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pe-rank-engine", daemon=True)
                self._thread.start()
            self._pending.append(_Window(job, reply, is_cancelled, started=time.perf_counter()))
            self._wake.notify()

    def submitting(self) -> threading.Condition:
        """Held, windows submitted under it are admitted in the same turn (the engine waits on it)."""
        return self._wake

    @property
    def live(self) -> int:
        return sum(slot is not None for slot in self.slots)

    @property
    def healthy(self) -> bool:
        """False once the loop itself failed (a closed engine is not unhealthy, it is gone)."""
        return self.failure is None

    def close(self) -> None:
        """Stop the loop; windows still queued or live are answered with EngineClosed (UNAVAILABLE)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        elif self._thread is None:
            self._shutdown(EngineClosed("the decode engine closed"))
        self._replies.put(None)
        if self._replier is not threading.current_thread():
            self._replier.join(timeout=30)

    # ---- the loop (engine thread)

    def _run(self) -> None:
        reason: BaseException = EngineClosed("the decode engine closed")
        try:
            while self._turn():
                pass
        except BaseException as exc:  # a fault of the engine itself: it dies, every window is told
            log.exception("the decode engine failed; its windows are answered UNAVAILABLE")
            self.failure = reason = exc
            reason = EngineUnavailable(f"the decode engine failed: {exc!r}")
        self._shutdown(reason)

    def _turn(self) -> bool:
        """One turn: admit, prefill within the budget, drop the cancelled, one decode step. False: closed."""
        with self._wake:
            while not self._closed and not self._pending and not self._prefilling and self.live == 0:
                self._wake.wait()
            if self._closed:
                return False
            admitted = self._take_pending()
        self._prefilling.extend(admitted)
        self._prefill_within_budget()
        self._drop_cancelled()
        self._step()
        return True

    def _take_pending(self) -> list[_Window]:
        free = [k for k, slot in enumerate(self.slots) if slot is None]
        taken = []
        while self._pending and free:
            window = self._pending.popleft()
            window.slot = free.pop(0)
            self.slots[window.slot] = window
            taken.append(window)
        return taken

    # ---- prefill

    def _prefill_within_budget(self) -> None:
        """Prefill queued windows in order until the turn's budget is spent (at least one chunk a turn)."""
        budget = self.limits.prefill_budget
        left = budget
        while self._prefilling and left > 0:
            window = self._prefilling[0]
            if self._caller_gone(window, "before its prefill"):
                self._prefilling.popleft()
                continue
            try:
                if window.decoder is None:
                    self._begin(window)
                if window.own_cache:  # too long for the pool: prefilled whole on its own cache
                    spent = self._prefill_alone(window)
                else:
                    todo = window.prefill.remaining
                    if todo > left and (todo <= budget or left < budget):
                        break  # fits a later turn whole, or needs a turn's whole budget for its next chunk
                    spent = min(todo, budget)
                    self.pool.advance(window.prefill, spent)
                    self._observe("on_prefill", spent)
                    if window.prefill.remaining:
                        left -= spent
                        continue
                    self._prefilled(window)
            except Exception as exc:  # a bad window fails alone; the engine goes on
                self._prefilling.popleft()
                self._fail(window, exc, "failed")
                continue
            self._prefilling.popleft()
            left -= spent

    def _begin(self, window: _Window) -> None:
        job = window.job
        window.decoder = WindowDecoder(len(job.embeds), job.mode, job.emit)
        window.outcome = WindowOutcome(order=[], prompt_tokens=len(job.prompt_ids))
        if self.pool.fits(len(job.prompt_ids), len(job.embeds)):
            window.prefill = self.pool.begin(window.slot, job.prompt_ids, job.embeds)
            window.outcome.cached_tokens = window.prefill.cached_tokens
        else:
            window.own_cache = True

    def _prefill_alone(self, window: _Window) -> int:
        window.state, scores = self.stepper.start(window.job.prompt_ids, window.job.embeds)
        window.outcome.cached_tokens = window.state.cached_tokens
        spent = len(window.job.prompt_ids) - window.state.cached_tokens
        self._observe("on_prefill", spent)
        self._first_scores(window, scores, device_pick=None)
        return spent

    def _prefilled(self, window: _Window) -> None:
        device_pick, scores = self.pool.finish(window.prefill)
        window.prefill = None
        self._first_scores(window, scores, device_pick)

    def _first_scores(self, window: _Window, scores: np.ndarray, device_pick: int | None) -> None:
        window.decode_started = time.perf_counter()
        window.outcome.prefill_ms = (window.decode_started - window.started) * 1e3
        self._advance(window, scores, device_pick)
        if self.slots[window.slot] is window:
            self._observe("on_live", self.live)

    # ---- decode steps

    def _drop_cancelled(self) -> None:
        for window in self._decoding():
            self._caller_gone(window, "during decoding")

    def _decoding(self) -> list[_Window]:
        """Windows past their prefill and not yet decided (pool slots, and own-cache windows)."""
        return [w for w in self.slots if w is not None and w.decoder is not None and not w.decoder.done
                and w.prefill is None and (w.state is not None or not w.own_cache)]

    def _step(self) -> None:
        """One decode step for every live window: the pool's in one forward (batching on), the rest alone."""
        windows = self._decoding()
        together = [w for w in windows if not w.own_cache and not w.alone]
        alone = [w for w in windows if w.alone]  # before the batched step, which may restart some
        if self.batch_steps and len(together) > 1:
            self._pool_step(together)
        else:
            for window in together:
                self._pool_step([window])
        for window in alone:
            self._pool_step([window])
        for window in windows:
            if window.own_cache:
                self._own_step(window)

    def _pool_step(self, windows: list[_Window]) -> None:
        try:
            result = self.pool.step([w.slot for w in windows])
        except Exception as exc:
            if len(windows) == 1:
                return self._fail(windows[0], exc, "failed")
            log.warning("a batched step of %d windows failed (%r); stepping them one by one", len(windows), exc)
            for window in windows:  # the failed step changed nothing: no window is fed twice
                self._pool_step([window])
            return
        self._observe("on_step", len(windows))
        for window, pick, scores in zip(windows, result.picks, result.scores):
            if len(windows) > 1 and self._near_tie(window, scores):
                self._restart_alone(window)
            else:
                self._advance(window, scores, pick)

    def _near_tie(self, window: _Window, scores: np.ndarray) -> bool:
        if self.tie_margin == 0 or not np.all(np.isfinite(scores)):
            return False  # non-finite scores fail in the rule, batched or not
        return relative_gap(window.decoder, scores) <= self.tie_margin

    def _restart_alone(self, window: _Window) -> None:
        """Prefill the window again (first in line) and decode it alone: its ranking is then the lone one."""
        self.restarts += 1
        self.redone_steps += window.decoder.decode_steps
        log.debug("slot %d: a near-tie after a batched step; the window restarts alone", window.slot)
        self.pool.free(window.slot)
        window.alone, window.decoder, window.prefill = True, None, None
        self._prefilling.appendleft(window)
        self._observe("on_restart")

    def _own_step(self, window: _Window) -> None:
        try:
            scores = self.stepper.step(window.state, window.pick)
        except Exception as exc:
            return self._fail(window, exc, "failed")
        self._observe("on_step", 1)
        self._advance(window, scores, None)

    def _advance(self, window: _Window, scores: np.ndarray, device_pick: int | None) -> None:
        """The host rule decides (and checks the device's pick); a decided window is answered at once."""
        try:
            pick = window.decoder.feed(scores)
        except Exception as exc:
            return self._fail(window, exc, "failed")
        if pick is None:
            return self._finish(window)
        window.pick = pick
        if device_pick is not None and device_pick != pick:
            self.mismatches += 1
            log.warning("slot %d: the device picked %d, the rule %d; the rule's pick is fed", window.slot,
                        device_pick, pick)
            self.pool.overrule(window.slot, device_pick, pick)

    def _finish(self, window: _Window) -> None:
        outcome = window.outcome
        outcome.order = window.decoder.order
        outcome.decode_steps = window.decoder.decode_steps
        outcome.decode_ms = (time.perf_counter() - window.decode_started) * 1e3
        self._release(window)
        self._answer(window, outcome, "done")

    def _fail(self, window: _Window, error: BaseException, status: str) -> None:
        self._release(window)
        self._answer(window, error, status)

    def _release(self, window: _Window) -> None:
        if window.slot >= 0 and self.slots[window.slot] is window:
            self.slots[window.slot] = None
            self.pool.free(window.slot)
            self._observe("on_live", self.live)
        window.state = window.prefill = None

    def _caller_gone(self, window: _Window, when: str) -> bool:
        """End the window if its caller left; an ``is_cancelled`` that raises ends its own window, not the engine."""
        try:
            gone = bool(window.is_cancelled())
        except Exception as exc:
            log.warning("is_cancelled of a window raised %r; the window is ended", exc)
            self._fail(window, EngineUnavailable(f"could not tell whether the caller left: {exc!r}"), "failed")
            return True
        if gone:
            self._fail(window, WindowCancelled(f"cancelled {when}"), "cancelled")
        return gone

    # ---- answers

    def _answer(self, window: _Window, result: WindowOutcome | BaseException, status: str) -> None:
        self._replies.put((window.reply, result))
        self._observe("on_window", result if isinstance(result, WindowOutcome) else None, status)

    def _send_replies(self) -> None:
        while (item := self._replies.get()) is not None:
            reply, result = item
            try:
                reply(result)
            except Exception:  # a caller's reply hook must not take anything down
                log.exception("window reply failed")

    def _observe(self, hook: str, *args) -> None:
        try:
            method = getattr(self.observer, hook, None)
            if method is not None:
                method(*args)
        except Exception:  # telemetry never stops the ranking
            log.exception("an engine observer hook failed")

    def _shutdown(self, reason: BaseException) -> None:
        with self._wake:
            queued = list(self._pending)
            self._pending.clear()
        self._prefilling.clear()
        for window in [w for w in self.slots if w is not None] + queued:
            self._fail(window, reason, "failed")


def warm_up(engine: DecodeEngine, prompts, sizes: tuple[int, ...] = (20, 20, 2), timeout: float = 600) -> float:
    """Decode a few throwaway windows at load (lone and batched steps, the usual window size's prompt
    head), so the first requests after a start cost what later ones do; returns the seconds it took."""
    started = time.perf_counter()
    hidden = engine.stepper.llm.config.hidden_size
    rng = np.random.default_rng(0)
    done = [threading.Event() for _ in sizes]
    errors: list[BaseException] = []

    def reply(event: threading.Event):
        return lambda result: (errors.append(result) if isinstance(result, BaseException) else None, event.set())

    for event, n in zip(done, sizes):
        ids, _ = prompts.build("warm-up query", n)
        embeds = (rng.standard_normal((n, hidden)) * 0.02).astype(np.float32)
        engine.submit(WindowJob(np.asarray(ids), embeds), reply(event))
    if not all(event.wait(timeout) for event in done) or errors:
        raise RuntimeError(f"the decode engine's warm-up failed: {errors[:1] or 'timed out'}")
    return time.perf_counter() - started


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
