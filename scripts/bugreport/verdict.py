"""What the probe's attempts say about the server, in one sentence and an exit code.

0: no stall; 1: the accept-encoding offer breaks the handshake (the status is
withheld, or the upgrade itself is encoded), or holds an event stream's head
or first event; 2: another failure, which the offer does not explain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wsencode.bundle import counted
from wsencode.core.records import EVENT_STREAM
from wsencode.report import printable
from wslab.clients import EventStreamSeen
from wslab.sse import is_event_stream

from .attempt import TRANSPORT_NAMES
from .proxy import Attempt

NO_STALL, ENCODING, OTHER = 0, 1, 2
# Seconds by which an event stream's head or first event must come later with the offer than
# without it to count as held: less is not told apart from a busy machine's jitter.
MIN_DELAY = 0.25


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def status_line(a: Attempt, timeout: float) -> str:
    """What the client got, for the attempt's printed line."""
    seen = a.seen
    if seen.error:
        return f"failed: {seen.error}"
    if seen.status is None:
        return f"no {'head' if a.shake.kind == EVENT_STREAM else 'status'} in {seconds(timeout)}"
    text = f"{seen.status} in {seconds(seen.status_s)}"
    if seen.content_encoding:
        text += f", content-encoding: {printable(seen.content_encoding)}"
    if seen.stream is not None:
        text += ", " + first_event_line(seen.stream, timeout) + "".join(f", then {e}" for e in seen.events)
    return text


def first_event_line(stream: EventStreamSeen, timeout: float) -> str:
    """When an event stream's first event came, and what came with it."""
    if stream.first_event_s is None:
        return "ended without an event" if stream.ended_s is not None else f"no event in {seconds(timeout)}"
    text = f"first event after {seconds(stream.first_event_s)}"
    together = _at_once(stream)
    if together > 1:
        text += f" ({together} events, {stream.first_event_bytes} bytes at once)"
    return text


def healthy(a: Attempt, stall_after: float) -> bool:
    """Upgraded, the status not withheld, the response not encoded."""
    return a.seen.upgraded and not a.content_encoding and not a.withheld(stall_after)


@dataclass
class Verdict:
    code: int
    text: str


def _count(n: int, total: int) -> str:
    return ("both" if total == 2 else f"all {total}") if n == total and total > 1 else f"{n} of {total}"


def _fast(attempts: Sequence[Attempt]) -> str:
    """How the healthy side went: 'both got 200 in 12 ms'."""
    statuses = sorted({a.seen.status for a in attempts})
    slowest = max(a.seen.status_s for a in attempts)
    return f"{_count(len(attempts), len(attempts))} got {'/'.join(map(str, statuses))} in {seconds(slowest)}"


def _withheld(attempts: Sequence[Attempt], timeout: float) -> str:
    got = [a for a in attempts if a.seen.status is not None]
    text = f"{len(got)} of {len(attempts)} attempts got a status in {seconds(timeout)}"
    if got:
        text += f" (the slowest after {seconds(max(a.seen.status_s for a in got))})"
    return text


def _failure(attempts: Sequence[Attempt], timeout: float, stall_after: float) -> str:
    """Why attempts failed, without their times: 'refused with 403', 'no status in 5 s'."""
    reasons = []
    for a in attempts:
        if a.seen.error:
            reason = f"failed: {a.seen.error}"
        elif a.seen.status is None:
            reason = f"no status in {seconds(timeout)}"
        elif not a.seen.upgraded:
            reason = f"refused with {a.seen.status}"
        elif a.withheld(stall_after):
            reason = f"status withheld {seconds(stall_after)} or more"
        else:
            reason = f"upgraded with content-encoding: {a.content_encoding}"
        if reason not in reasons:
            reasons.append(reason)
    return ", ".join(reasons)


def names(named: Sequence[str]) -> str:
    """'HTTP/2', 'HTTP/2 and HTTP/1.1', 'HTTP/2, HTTP/3 and HTTP/1.1'."""
    return ", ".join(named[:-1]) + f" and {named[-1]}" if len(named) > 1 else "".join(named)


def tried(attempts: Sequence[Attempt]) -> str:
    """The transports the attempts went over: 'HTTP/2, HTTP/3 and HTTP/1.1'."""
    return names([n for t, n in TRANSPORT_NAMES.items() if any(a.shake.transport == t for a in attempts)])


def judge(attempts: Sequence[Attempt], timeout: float, stall_after: float, not_tried: Sequence[str] = ()) -> Verdict:
    """The verdict over all attempts, by transport: the offer's side against the other. `not_tried`:
    why a transport was left out, one phrase each."""
    stalls, encoded, other, fine = [], [], [], []
    for transport, name in TRANSPORT_NAMES.items():  # HTTP/2 and HTTP/3 first: where a held 200 deadlocks
        mine = [a for a in attempts if a.shake.transport == transport]
        if not mine:
            continue
        offered = [a for a in mine if a.shake.offer]
        plain = [a for a in mine if not a.shake.offer]
        if not all(healthy(a, stall_after) for a in plain):
            bad = [a for a in plain if not healthy(a, stall_after)]
            other.append(f"over {name}, {_count(len(bad), len(plain))} attempts without accept-encoding failed "
                         f"too ({_failure(bad, timeout, stall_after)}): not an encoding problem")
        elif any(not a.seen.upgraded or a.withheld(stall_after) for a in offered):
            stalls.append((name, f"{_withheld(offered, timeout)} with the offer, {_fast(plain)} without"))
        elif any(a.content_encoding for a in offered):
            codings = sorted({a.content_encoding for a in offered if a.content_encoding})
            n = sum(bool(a.content_encoding) for a in offered)
            encoded.append((name, f"{n} of {len(offered)} successful responses carried content-encoding: "
                                  f"{', '.join(codings)} with the offer, none without"))
        else:
            fine.append((name, mine))
    parts = []
    if stalls:
        parts.append(f"this server withholds the {names([n for n, _ in stalls])} WebSocket status while "
                     "accept-encoding is offered: "
                     + "; ".join(f"{n}: {t}" if len(stalls) > 1 else t for n, t in stalls))
    if encoded:
        parts.append(f"this server encodes the {names([n for n, _ in encoded])} WebSocket handshake response while "
                     "accept-encoding is offered, so its messages arrive compressed: "
                     + "; ".join(t for _, t in encoded))
    if parts:
        parts += [f"over {n} the status came in {seconds(max(a.seen.status_s for a in m))} either way"
                  for n, m in fine]
        return Verdict(ENCODING, "; ".join(parts + other) + _also(not_tried))
    if other:
        return Verdict(OTHER, "no stall attributable to encoding, but " + "; ".join(other) + _also(not_tried))
    slowest = max(a.seen.status_s for a in attempts)
    return Verdict(NO_STALL, f"no stall: status in {seconds(slowest)} on every attempt over {tried(attempts)}"
                   + _also(not_tried))


# -- event streams ---------------------------------------------------------------------------


def _at_once(stream: EventStreamSeen) -> int:
    """How many events became readable at the moment the first one did."""
    return sum(e.at_s == stream.first_event_s for e in stream.events)


def _all_at_the_end(stream: EventStreamSeen) -> bool:
    """Every event came at once, and the stream ended: only its end let them out."""
    return stream.ended_s is not None and bool(stream.events) and _at_once(stream) == len(stream.events)


def head_held(offered: Attempt, plain: Attempt, stall_after: float) -> bool:
    """The offer held the head: withheld past the stall (by the addon's clock, from forwarding), or sent
    MIN_DELAY or more later than without the offer and no earlier than the server's first event came
    without it: held until the body started, as an encoder that chooses its coding from the body does."""
    if offered.seen.status is None or offered.withheld(stall_after):
        return True
    first_without = plain.seen.stream.first_event_s
    return (first_without is not None and offered.seen.status_s - plain.seen.status_s >= MIN_DELAY
            and offered.seen.status_s >= first_without - MIN_DELAY)


def first_event_held(offered: Attempt, plain: Attempt) -> bool:
    """The offer held the first event: it never came while without the offer one did, or it came MIN_DELAY
    or more later, together with others or with the stream's end (what a compressor's buffer lets go)."""
    with_offer, without = offered.seen.stream, plain.seen.stream
    if without.first_event_s is None or offered.seen.status is None:
        return False
    if with_offer.first_event_s is None:
        return True
    burst = _at_once(with_offer) > 1 or _all_at_the_end(with_offer)
    return burst and with_offer.first_event_s - without.first_event_s >= MIN_DELAY


def _head_phrase(offered: Attempt, plain: Attempt, timeout: float) -> str:
    without = f"{seconds(plain.seen.status_s)} without"
    if offered.seen.status is None:
        return f"withholds the head (none in {seconds(timeout)} with the offer, {without})"
    delay = max(0.0, offered.seen.status_s - plain.seen.status_s)
    first = offered.seen.stream.first_event_s
    came = "with the first event " if first is not None and first - offered.seen.status_s < MIN_DELAY else ""
    return (f"delays the head by {seconds(delay)} (it came {came}after {seconds(offered.seen.status_s)} with the "
            f"offer, {without})")


def _event_phrase(offered: Attempt, plain: Attempt, timeout: float) -> str:
    stream = offered.seen.stream
    without = f"the first after {seconds(plain.seen.stream.first_event_s)} without"
    if stream.first_event_s is None:
        none = "the stream ended without one" if stream.ended_s is not None else f"none in {seconds(timeout)}"
        return f"holds the first event ({none} with the offer, {without})"
    came = f"{counted(_at_once(stream), 'event')} at once after {seconds(stream.first_event_s)} with the offer"
    if _all_at_the_end(stream):
        return f"holds the first event until the stream ends ({came}, {without})"
    return f"holds the first event until {stream.first_event_bytes} bytes ({came}, {without})"


def _stream_failure(a: Attempt, timeout: float, stall_after: float) -> str | None:
    """Why an attempt without the offer did not open an event stream, or None if it did."""
    if a.seen.error:
        return f"failed: {a.seen.error}"
    if a.seen.status is None:
        return f"no head in {seconds(timeout)}"
    if not 200 <= a.seen.status < 300:
        return f"answered {a.seen.status}"
    if a.withheld(stall_after):
        return f"head withheld {seconds(stall_after)} or more"
    return None


def held_by_proxy(a: Attempt, stall_after: float) -> float | None:
    """Seconds by which the client got its first event after the probe's own proxy passed it, if
    `stall_after` or more (mitmproxy holds an event stream that is not streamed: mitmproxy#4469)."""
    stream, record = a.seen.stream, a.record
    if record is None or record.get("first_event_s") is None or stream.first_event_s is None:
        return None
    late = stream.first_event_s - (record["received_s"] + record["first_event_s"])
    return late if late >= stall_after else None


def judge_event_streams(attempts: Sequence[Attempt], timeout: float, stall_after: float,
                        not_tried: Sequence[str] = (), asked: bool = False) -> Verdict:
    """The verdict over event-stream attempts, one with the offer and one without per transport. Unless
    `asked` (--event-stream), a response without the offer that is not text/event-stream is no event stream."""
    opened = [a for a in attempts if not a.shake.offer and _stream_failure(a, timeout, stall_after) is None]
    if opened and not asked and not any(is_event_stream(a.seen.stream.content_type) for a in opened):
        content_type = printable(opened[0].seen.stream.content_type or "none")
        return Verdict(OTHER, f"not an event stream: without accept-encoding the answer was {opened[0].seen.status} "
                              f"with content-type: {content_type} (--event-stream probes it as one all the same)")
    held, other, fine = [], [], []
    for transport, name in TRANSPORT_NAMES.items():
        mine = [a for a in attempts if a.shake.transport == transport]
        offered = next((a for a in mine if a.shake.offer), None)
        plain = next((a for a in mine if not a.shake.offer), None)
        if offered is None or plain is None:
            continue
        proxied = [late for a in (plain, offered) if (late := held_by_proxy(a, stall_after)) is not None]
        if proxied:
            other.append(f"over {name} the probe's own proxy passed the first event {seconds(max(proxied))} late "
                         "(a bug in ws-encode: please report it)")
        elif (failure := _stream_failure(plain, timeout, stall_after)) is not None:
            other.append(f"over {name}, the attempt without accept-encoding failed too ({failure}): "
                         "not an encoding problem")
        elif offered.seen.error:
            other.append(f"over {name}, the attempt with accept-encoding failed ({offered.seen.error}), "
                         "the one without opened")
        elif offered.seen.status is not None and not 200 <= offered.seen.status < 300:
            held.append(f"over {name} the offer gets {offered.seen.status} instead of the event stream "
                        f"({plain.seen.status} without)")
        else:
            phrases = ([_head_phrase(offered, plain, timeout)] if head_held(offered, plain, stall_after) else []) + \
                      ([_event_phrase(offered, plain, timeout)] if first_event_held(offered, plain) else [])
            if phrases:
                held.append(f"over {name} the offer " + " and ".join(phrases))
            else:
                fine.append((name, offered, plain))
    if held:
        parts = held + [f"over {name} {_prompt([o, p], timeout)} either way" for name, o, p in fine]
        return Verdict(ENCODING, "this server holds its event stream while accept-encoding is offered: "
                       + "; ".join(parts + other) + _also(not_tried))
    if other:
        return Verdict(OTHER, "no hold attributable to encoding, but " + "; ".join(other) + _also(not_tried))
    tried_all = [a for _, o, p in fine for a in (o, p)]
    codings = sorted({printable(o.seen.content_encoding) for _, o, _ in fine if o.seen.content_encoding})
    encoded = f"; with the offer it came with content-encoding: {', '.join(codings)}, its events as promptly" \
        if codings else ""
    return Verdict(NO_STALL, f"no difference: {_prompt(tried_all, timeout)} with and without accept-encoding over "
                             f"{tried(tried_all)}{encoded}" + _also(not_tried))


def _prompt(attempts: Sequence[Attempt], timeout: float) -> str:
    """'the head in 12 ms and the first event after 0.40 s' (the slowest of `attempts`)."""
    head = f"the head in {seconds(max(a.seen.status_s for a in attempts))}"
    firsts = [a.seen.stream.first_event_s for a in attempts if a.seen.stream.first_event_s is not None]
    if len(firsts) < len(attempts):
        return f"{head} and no event in {seconds(timeout)} on {len(attempts) - len(firsts)} of {len(attempts)}"
    return f"{head} and the first event after {seconds(max(firsts))}"


def _also(not_tried: Sequence[str]) -> str:
    return f" ({'; '.join(not_tried)})" if not_tried else ""
