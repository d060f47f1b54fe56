"""A test-only gate in front of pe_llm's engine: ``test_hold_windows`` in its config.

Tests of in-flight batching must see windows decoded *together*, whatever the machine's load.
Left to timing, a window of a few passages can be decided before the next request's window
even reaches Triton (and on a busy machine often is). With the config parameter
``test_hold_windows: N`` (never written by ``pe-rank export``), pe_llm keeps each window it
receives until N are waiting, then hands them to the engine inside its ``submitting()`` lock:
they are admitted in the same engine turn and step together from then on. Windows held
longer than ``timeout_s`` (a test that sent fewer) go on as they are, so nothing waits forever,
and the model's ``finalize`` releases whatever is still held.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, ContextManager

PARAMETER = "test_hold_windows"


class WindowHold:
    """``hold(*args)`` calls ``submit(*args)`` now (``count`` <= 1), or once ``count`` calls are waiting."""

    def __init__(self, submit: Callable[..., None], count: int, timeout_s: float = 60.0,
                 together: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        self.submit, self.count, self.timeout_s, self.together = submit, count, timeout_s, together
        self._held: list[tuple] = []
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def __call__(self, *args) -> None:
        if self.count <= 1:
            return self.submit(*args)
        with self._lock:
            self._held.append(args)
            if len(self._held) < self.count:
                if self._timer is None:
                    self._timer = threading.Timer(self.timeout_s, self.release)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self.release()

    def release(self) -> None:
        """Hand every held window to the engine, in arrival order; one the engine refuses (closed) gets
        that error as its answer (``args[1]`` is the window's reply hook), so none is left waiting."""
        with self._lock:
            held, self._held = self._held, []
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        with self.together():
            for args in held:
                try:
                    self.submit(*args)
                except Exception as exc:
                    args[1](exc)
