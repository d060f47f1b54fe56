"""Per-sequence decoding state kept inside pe_llm, with idle expiry.

Triton's sequence batcher frees a sequence slot after ``max_sequence_idle_microseconds``
but does not tell a Python model, so the model expires idle state itself (on every
execute and from a timer), and the count of live sequences is reported with every
response so leaks are visible from outside.
"""
from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

T = TypeVar("T")


class SequenceStore(Generic[T]):
    def __init__(self, idle_timeout_s: float, sweep_every_s: float = 1.0) -> None:
        self.idle_timeout_s = idle_timeout_s
        self._states: dict[int, tuple[T, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, args=(sweep_every_s,), daemon=True)
        self._sweeper.start()

    def put(self, corrid: int, state: T) -> None:
        with self._lock:
            self._states[corrid] = (state, time.monotonic())

    def get(self, corrid: int) -> T:
        with self._lock:
            if corrid not in self._states:
                raise KeyError(f"sequence {corrid} has no state (no START, already ended, or idle-expired)")
            state, _ = self._states[corrid]
            self._states[corrid] = (state, time.monotonic())
            return state

    def drop(self, corrid: int) -> None:
        with self._lock:
            self._states.pop(corrid, None)

    def expire_idle(self) -> int:
        cutoff = time.monotonic() - self.idle_timeout_s
        with self._lock:
            stale = [c for c, (_, used) in self._states.items() if used < cutoff]
            for corrid in stale:
                del self._states[corrid]
        return len(stale)

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            self._states.clear()

    def _sweep_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.expire_idle()
