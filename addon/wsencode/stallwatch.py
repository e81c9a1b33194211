"""One timer per waiting handshake, on the event loop mitmproxy runs on.

No polling loop and no thread: `arm` schedules a single callback with the
loop's `call_later`, which `disarm` cancels when the status arrives or the
flow ends. The scheduler is injected so tests can drive time by hand.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[[float, Callable[[], None]], Timer]


class StallWatch:
    def __init__(self, schedule: Scheduler):
        self._schedule = schedule
        self._timers: dict[str, Timer] = {}

    def arm(self, key: str, after: float, on_stall: Callable[[], None]) -> None:
        self.disarm(key)
        # A partial, not a closure: fewer objects per waiting handshake.
        self._timers[key] = self._schedule(after, functools.partial(self._fire, key, on_stall))

    def _fire(self, key: str, on_stall: Callable[[], None]) -> None:
        # Forget the timer before reporting, so a report that ends the
        # handshake does not try to cancel the timer that is firing.
        del self._timers[key]
        on_stall()

    def disarm(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
