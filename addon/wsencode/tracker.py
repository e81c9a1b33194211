"""Every handshake the addon follows, from receipt to its one `handshake` record.

The sans-I/O core behind the addon class: it is fed plain facts (a handshake
was received, forwarded, answered, ended; a stall timer fired; where the
handshake is) with times from an injected clock, and answers the report
records to write. It never touches a flow, a socket or the event loop, so
all of it is testable with a hand-driven clock.
"""

from __future__ import annotations

import textwrap
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import diagnosis
from .handshake import Handshake, Transport
from .lifecycle import EndCause, HandshakeEnded, Phase, Progress, Stage
from .policy import EncodingPolicy

REMEMBERED_STALLS = 1000
# Command answers are rows of the console's data viewer, which is 62 columns
# wide in an 80-column terminal: wrap at words, short enough never to be cut.
ANSWER_WIDTH = 60

Record = dict[str, Any]


def wrap(text: str) -> list[str]:
    """`text` as indented answer rows, broken at spaces only (never inside
    `accept-encoding`)."""
    return textwrap.wrap(text, ANSWER_WIDTH, initial_indent="    ", subsequent_indent="    ", break_on_hyphens=False)


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass
class TrackedHandshake:
    """One handshake and what was sent: plain data, no live objects."""

    flow_id: str
    progress: Progress
    policy: EncodingPolicy
    url: str  # redacted
    accept_encoding_client: str | None
    accept_encoding_upstream: str | None
    upstream_transport: str | None = None
    stage: Stage = Stage.QUEUED  # where it was last seen

    @property
    def transport(self) -> Transport:
        return self.progress.handshake.transport

    def record(self, event: str, now: float, text: str, **extra: Any) -> Record:
        """A report record (SPEC: Report records), without `ts`, which the
        writer adds."""
        progress = self.progress
        waited = progress.waited(now)
        return {
            "event": event,
            "flow_id": self.flow_id,
            "transport": self.transport.value,
            "upstream_transport": self.upstream_transport,
            "url": self.url,
            "policy": self.policy.value,
            "accept_encoding_client": self.accept_encoding_client,
            "accept_encoding_upstream": self.accept_encoding_upstream,
            "waited_s": None if waited is None else round(waited, 3),
            "status": progress.status,
            "upstream_status": progress.upstream_status,
            "client_bytes_before_status": progress.client_bytes_before_status,
            "stuck_in": self.stage.value,
            "received_s": round(progress.received(now), 3),
            "diagnosis": text,
            **extra,
        }


@dataclass
class Summary:
    """Counts since the addon was loaded, for `wsencode.summary`."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (outcome, transport)
    stalls: int = 0
    slowest_s: float | None = None  # the longest time to a status a client got
    slowest_url: str | None = None

    def lines(self, waiting: int, longest_s: float | None, report: str | None) -> list[str]:
        """The summary a person reads: one fact a line."""
        total = sum(self.outcomes.values())
        report_line = f"report: {report or 'off (set ws_encode_report)'}"
        if not total and not waiting:
            return ["no WebSocket handshake seen yet", report_line]
        by_outcome = Counter()
        by_transport = Counter()
        for (outcome, transport), n in self.outcomes.items():
            by_outcome[outcome] += n
            by_transport[transport] += n
        if total:
            outcomes = ", ".join(f"{n} {o}" for o, n in sorted(by_outcome.items()))
            transports = ", ".join(f"{n} over {t}" for t, n in sorted(by_transport.items()))
            lines = [f"{plural(total, 'WebSocket handshake')} finished: {outcomes} ({transports})"]
        else:
            lines = ["no WebSocket handshake finished yet"]
        if waiting:
            lines.append(f"{waiting} waiting for a status now, longest {longest_s:.1f} s")
        lines.append(f"{plural(self.stalls, 'stall')} reported")
        if self.slowest_s is not None:
            lines.append(f"slowest status: {self.slowest_s:.2f} s, {self.slowest_url}")
        lines.append(report_line)
        return lines

    def note(self, tracked: TrackedHandshake, now: float) -> None:
        progress = tracked.progress
        self.outcomes[progress.phase.value, tracked.transport.value] += 1
        if progress.status is not None:
            seconds = progress.received(now)
            if self.slowest_s is None or seconds > self.slowest_s:
                self.slowest_s, self.slowest_url = seconds, tracked.url


class Tracker:
    """The handshakes still waiting for a status, and what became of the rest."""

    def __init__(self) -> None:
        self.waiting: dict[str, TrackedHandshake] = {}
        # The last stalls, each with its latest sentence, for `wsencode.stalls`.
        self.stalls: OrderedDict[str, tuple[str, str]] = OrderedDict()  # flow id -> (url, text)
        self.summary = Summary()

    def received(
        self,
        flow_id: str,
        handshake: Handshake,
        now: float,
        policy: EncodingPolicy,
        url: str,
        accept_encoding: str | None,
        stalled: bool = False,
    ) -> TrackedHandshake:
        tracked = TrackedHandshake(
            flow_id,
            Progress(handshake, received_at=now),
            policy,
            url,
            accept_encoding_client=accept_encoding,
            accept_encoding_upstream=accept_encoding,
        )
        if stalled:  # adopted from an earlier copy of the addon, which reported it
            tracked.progress.stall()
        self.waiting[flow_id] = tracked
        return tracked

    def __iter__(self) -> Iterator[TrackedHandshake]:
        return iter(self.waiting.values())

    def __len__(self) -> int:
        return len(self.waiting)

    def get(self, flow_id: str) -> TrackedHandshake | None:
        return self.waiting.get(flow_id)

    def longest_wait(self, now: float) -> float | None:
        return max((t.progress.received(now) for t in self.waiting.values()), default=None)

    def stall_answers(self) -> list[str]:
        """`wsencode.stalls`: each stall as a headline and its sentence, wrapped."""
        lines = []
        for flow_id, (url, text) in reversed(self.stalls.items()):
            lines.append(f"[flow {flow_id[:8]}] {url}")
            lines += wrap(text)
        return lines

    def stall(self, flow_id: str, stage: Stage, now: float) -> Record | None:
        """The stall timer fired: the stall record, or None if the handshake
        has already ended."""
        tracked = self.waiting.get(flow_id)
        if tracked is None:
            return None
        try:
            tracked.progress.stall()
        except HandshakeEnded:
            return None
        tracked.stage = stage
        text = diagnosis.stall(tracked.progress, stage, now, tracked.accept_encoding_upstream)
        self.summary.stalls += 1
        self.stalls[flow_id] = (tracked.url, text)
        while len(self.stalls) > REMEMBERED_STALLS:
            self.stalls.popitem(last=False)
        return tracked.record("stall", now, text)

    def status(
        self,
        flow_id: str,
        status: int,
        now: float,
        content_encoding: str | None,
        status_with_data: bool = False,
        bad_accept: bool = False,
    ) -> Record | None:
        """The client got a status: the handshake's record."""
        tracked = self.waiting.get(flow_id)
        if tracked is None:
            return None
        progress = tracked.progress
        progress.bad_accept = bad_accept
        progress.status_arrived(status, now, content_encoding=content_encoding, with_data=status_with_data)
        return self._finish(tracked, Stage.DONE, now)

    def end(self, flow_id: str, cause: EndCause, stage: Stage, now: float, reason: str | None = None) -> Record | None:
        """The flow ended without a status: the handshake's record."""
        tracked = self.waiting.get(flow_id)
        if tracked is None:
            return None
        try:
            tracked.progress.end(cause, now, reason)
        except HandshakeEnded:
            return None
        return self._finish(tracked, stage, now)

    def forget(self, flow_id: str) -> None:
        """Stop following a handshake without a record (handed to a successor)."""
        self.waiting.pop(flow_id, None)

    def _finish(self, tracked: TrackedHandshake, stage: Stage, now: float) -> Record:
        del self.waiting[tracked.flow_id]
        progress = tracked.progress
        text = diagnosis.outcome(progress, stage, now, tracked.accept_encoding_upstream)
        tracked.stage = stage
        if tracked.flow_id in self.stalls:
            self.stalls[tracked.flow_id] = (tracked.url, text)
        self.summary.note(tracked, now)
        return tracked.record(
            "handshake",
            now,
            text,
            outcome=progress.phase.value,
            stalled=progress.stalled,
            content_encoding=progress.content_encoding,
        )
