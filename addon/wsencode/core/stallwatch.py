"""When each waiting handshake's stall is due, and reporting it on time.

One timer on the event loop mitmproxy runs on, set for the earliest
deadline while any handshake waits: no timer per handshake, no polling loop,
no thread. A busy event loop runs a timer late, behind every callback
already queued (under a burst of HTTP/1.1 handshakes, by hundreds of
milliseconds), while the addon's hooks keep running for the flows it is busy
with: so the addon also calls `fire_due` from its hooks, which compares two
numbers when nothing is due.

Deadlines are kept in arming order, one queue per stall threshold (the
option can change while handshakes wait): the first of a queue is its
earliest, and `disarm` is a dictionary removal. The scheduler and the clock
are injected so tests can drive time by hand.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[[float, Callable[[], None]], Timer]
OnStall = Callable[[], None]


class StallWatch:
    def __init__(self, schedule: Scheduler, clock: Callable[[], float]):
        self._schedule = schedule
        self._clock = clock
        # stall threshold -> {key: (deadline, on_stall)}, in arming order
        self._queues: dict[float, OrderedDict[str, tuple[float, OnStall]]] = {}
        self._threshold_of: dict[str, float] = {}
        # Both None, or both set: the one timer, never later than the earliest deadline.
        self._timer: Timer | None = None
        self._timer_at: float | None = None

    def __len__(self) -> int:
        return len(self._threshold_of)

    def arm(self, key: str, after: float, on_stall: OnStall) -> None:
        self.arm_at(key, self._clock() + after, after, on_stall)

    def arm_at(self, key: str, deadline: float, after: float, on_stall: OnStall) -> None:
        """Due at `deadline`, in the queue of threshold `after` (a handshake
        re-armed from its receipt: the threshold changed, or a reload)."""
        self.disarm(key)
        queue = self._queues.setdefault(after, OrderedDict())
        in_order = not queue or next(reversed(queue.values()))[0] <= deadline
        queue[key] = (deadline, on_stall)
        if not in_order:
            self._queues[after] = OrderedDict(sorted(queue.items(), key=lambda item: item[1][0]))
        self._threshold_of[key] = after
        if self._timer_at is None or deadline < self._timer_at:
            self._set_timer(deadline)

    def disarm(self, key: str) -> None:
        after = self._threshold_of.pop(key, None)
        if after is None:
            return
        queue = self._queues[after]
        del queue[key]
        if not queue:
            del self._queues[after]
        if not self._threshold_of:
            self._set_timer(None)
        # (else the timer stays: if its deadline is gone, it finds nothing due and moves on)

    def fire_due(self) -> None:
        """Report every stall that is due, earliest first (called from hooks)."""
        if self._timer_at is not None and self._timer_at <= self._clock():
            self._fire()

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._fire()

    def _fire(self) -> None:
        now = self._clock()
        try:
            while (earliest := self._earliest()) is not None and earliest[0] <= now:
                _, key, on_stall = earliest
                # Forgotten before reporting, so a report that ends the
                # handshake finds nothing to disarm.
                self.disarm(key)
                on_stall()
        finally:
            earliest = self._earliest()
            self._set_timer(None if earliest is None else earliest[0])

    def _earliest(self) -> tuple[float, str, OnStall] | None:
        firsts = [(deadline, key, on_stall) for queue in self._queues.values()
                  for key, (deadline, on_stall) in (next(iter(queue.items())),)]
        return min(firsts, key=lambda first: first[0], default=None)

    def _set_timer(self, at: float | None) -> None:
        if at == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if at is None else self._schedule(max(0.0, at - self._clock()), self._on_timer)
        self._timer_at = at
