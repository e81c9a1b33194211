"""StallWatch without an event loop: time and the one timer driven by hand."""

from __future__ import annotations

from conftest import ManualClock
from hypothesis import given
from hypothesis import strategies as st
from wsencode.core.stallwatch import StallWatch


def watch_and_fired():
    loop = ManualClock(now=100.0)
    fired: list[tuple[str, float]] = []
    watch = StallWatch(loop.schedule, loop)
    on = lambda key: lambda: fired.append((key, loop.now))  # noqa: E731
    return loop, watch, fired, on


def test_stalls_fire_at_their_deadlines_with_one_timer():
    loop, watch, fired, on = watch_and_fired()
    for i, key in enumerate("abc"):
        loop.now = 100.0 + i
        watch.arm(key, 5.0, on(key))
        assert len(loop.live) == 1  # one timer, whatever waits
    loop.advance(200.0)
    assert fired == [("a", 105.0), ("b", 106.0), ("c", 107.0)]
    assert not loop.live and len(watch) == 0


def test_a_disarmed_handshake_never_fires_and_nothing_waits_no_timer():
    loop, watch, fired, on = watch_and_fired()
    watch.arm("a", 5.0, on("a"))
    watch.arm("b", 5.0, on("b"))
    watch.disarm("a")
    loop.advance(200.0)
    assert fired == [("b", 105.0)]
    watch.arm("c", 5.0, on("c"))
    watch.disarm("c")
    assert not loop.live  # the last one gone, its timer goes too


def test_a_shorter_threshold_set_later_fires_first():
    loop, watch, fired, on = watch_and_fired()
    watch.arm("slow", 10.0, on("slow"))
    loop.now = 101.0
    watch.arm("quick", 1.0, on("quick"))
    loop.advance(200.0)
    assert fired == [("quick", 102.0), ("slow", 110.0)]


def test_a_hook_fires_what_a_late_timer_has_not():
    loop, watch, fired, on = watch_and_fired()
    watch.arm("a", 5.0, on("a"))
    watch.arm("b", 6.0, on("b"))
    loop.now = 105.2  # the timer is due, but the event loop has not run it
    watch.fire_due()
    assert fired == [("a", 105.2)]
    watch.fire_due()  # nothing more is due
    assert fired == [("a", 105.2)]
    loop.advance(200.0, lag=0.5)
    assert fired == [("a", 105.2), ("b", 106.5)]


def test_rearming_counts_from_now():
    loop, watch, fired, on = watch_and_fired()
    watch.arm("a", 5.0, on("first"))
    loop.now = 103.0
    watch.arm("a", 5.0, on("second"))
    loop.advance(200.0)
    assert fired == [("second", 108.0)]


def test_a_stall_that_ends_its_handshake_finds_nothing_to_disarm():
    loop, watch, fired, on = watch_and_fired()
    watch.arm("a", 1.0, lambda: (watch.disarm("a"), fired.append(("a", loop.now))))
    watch.arm("b", 2.0, on("b"))
    loop.advance(200.0)
    assert fired == [("a", 101.0), ("b", 102.0)]


@given(st.lists(st.tuples(st.sampled_from(["arm", "disarm", "wait", "hook"]), st.sampled_from("abcdef"),
                          st.sampled_from([0.5, 1.0, 3.0]), st.floats(0.0, 2.0)), max_size=40))
def test_every_armed_stall_fires_once_at_its_deadline_or_is_disarmed(steps):
    loop, watch, fired, on = watch_and_fired()
    armed: dict[str, float] = {}  # key -> deadline
    for action, key, after, dt in steps:
        if action == "arm":
            watch.arm(key, after, on(key))
            armed[key] = loop.now + after
        elif action == "disarm":
            watch.disarm(key)
            armed.pop(key, None)
        else:
            to = loop.now + dt
            due = {k: deadline for k, deadline in armed.items() if deadline <= to}
            before = len(fired)
            if action == "hook":
                loop.now = to
                watch.fire_due()
            else:
                loop.advance(to)
            now_fired = [k for k, _ in fired[before:]]
            assert sorted(now_fired) == sorted(due)  # each due one, once
            deadlines = [due[k] for k in now_fired]
            assert deadlines == sorted(deadlines)  # earliest first
            for k in due:
                del armed[k]
        assert len(watch) == len(armed) and len(loop.live) == (1 if armed else 0)
