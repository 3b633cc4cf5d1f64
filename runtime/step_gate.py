"""StepGate: how other threads meet the engine's step.

One thread at a time runs `Engine.step()`; it runs without a lock (the hot path takes none per
request). Everything another thread may do to the engine goes through the gate's short lock:
  - a submit or an abort applies at once when no step runs on another thread (so a
    single-threaded program sees it before the call returns), and is otherwise posted to the
    gate and applied by the stepping thread at the end of its step, under the lock;
  - a thread that wants tokens (a handle's iterator, generate()) waits for the next step's end
    when another thread serves (the last thread to step was another one), and runs the step
    itself when nobody does: no thread has stepped yet, it stepped last itself, or the serving
    thread has not stepped for SERVING_WAIT_S (then the reader steps and serves from then on).

Invariants: `stepping` is the ident of the thread inside step(), or None; `posted` is empty
whenever `stepping` is None (the step's end drains it before clearing `stepping`).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvpager.errors import ReentrantStep

# How long a reader waits for the serving thread's next step before it steps itself. Longer only
# delays a reader whose serving loop has stopped for good (it waits this long once, then serves).
SERVING_WAIT_S = 0.1


class StepGate:
    def __init__(self) -> None:
        self.lock = threading.RLock()  # short critical sections only; never held during a step
        self.cond = threading.Condition(self.lock)  # notified at the end of every step
        self._one_step = threading.Lock()  # one step at a time
        self.posted: list[Callable[[], None]] = []  # applied at the end of the running step
        self.stepping: int | None = None
        self.steps = 0
        self._last_stepper: int | None = None

    def in_step_elsewhere(self) -> bool:
        """Whether another thread is inside step() now (call with `lock` held)."""
        return self.stepping is not None and self.stepping != threading.get_ident()

    def apply_or_post(self, change: Callable[[], None]) -> None:
        """Apply change() now, or at the end of the step another thread is inside (call with
        `lock` held), so a step never sees a half-applied change."""
        if self.in_step_elsewhere():
            self.posted.append(change)
        else:
            change()

    def run_step(self, step: Callable[[], object]) -> object:
        """Run step() as this thread's step: ReentrantStep from inside a step on this thread;
        waits while another thread steps. What was posted meanwhile is applied at the end, in
        order, under the lock."""
        me = threading.get_ident()
        if self.stepping == me:
            raise ReentrantStep(
                "Engine.step() was called from inside a step (an on_token callback, or iterating "
                "a handle in one); a callback must return, not step the engine")
        with self._one_step:
            with self.lock:
                self.stepping = me
            try:
                return step()
            finally:
                with self.cond:
                    try:
                        for change in self.posted:
                            change()
                        self.posted.clear()
                    finally:
                        self.stepping = None
                        self.steps += 1
                        self._last_stepper = me
                        self.cond.notify_all()

    def wait_for_step(self) -> bool:
        """Wait until a step by another thread ends; True when one did. False when this thread
        should step itself (see the module docstring)."""
        me = threading.get_ident()
        with self.cond:
            start, deadline = self.steps, None
            while self.steps == start:
                if self.stepping is not None and self.stepping != me:
                    self.cond.wait()  # its end notifies
                    continue
                if self._last_stepper in (None, me):
                    return False
                now = time.monotonic()
                deadline = now + SERVING_WAIT_S if deadline is None else deadline
                if now >= deadline:
                    return False
                self.cond.wait(deadline - now)
            return True
