"""What the probe's attempts say about the server, in one sentence and an exit code.

0: no stall; 1: the accept-encoding offer breaks the handshake (the status is
withheld, or the upgrade itself is encoded); 2: another failure, which the
offer does not explain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wsencode.report import printable

from .attempt import TRANSPORT_NAMES
from .proxy import Attempt

NO_STALL, ENCODING, OTHER = 0, 1, 2


def seconds(value: float) -> str:
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def status_line(a: Attempt, timeout: float) -> str:
    """What the client got, for the attempt's printed line."""
    seen = a.seen
    if seen.error:
        return f"failed: {seen.error}"
    if seen.status is None:
        return f"no status in {seconds(timeout)}"
    text = f"{seen.status} in {seconds(seen.status_s)}"
    if seen.content_encoding:
        text += f", content-encoding: {printable(seen.content_encoding)}"
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


def _also(not_tried: Sequence[str]) -> str:
    return f" ({'; '.join(not_tried)})" if not_tried else ""
