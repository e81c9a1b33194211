"""The life of one handshake, as a state machine with every transition in one table.

    WAITING --stall timer--> STALLED
    WAITING | STALLED --success status--> UPGRADED
    WAITING | STALLED --2xx head-->       OPENED  (an event stream)
    WAITING | STALLED --other status-->   REJECTED
    WAITING | STALLED --flow ended-->     NO_STATUS

An event stream's outcome comes with its head; its record waits for its first
event or its end, which are noted on its OPENED progress, not transitions.

UPGRADED, OPENED, REJECTED and NO_STATUS are final: each handshake gets exactly one
`handshake` record, and at most one `stall` record. Where a waiting
handshake is (`Stage`) is a separate, observed fact: it says who is holding
it, not what may happen next. Times are passed in by the caller (seconds
from any monotonic clock), so this is testable without sockets or sleeps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .handshake import Handshake
from .streamfacts import StreamFacts


class Phase(enum.Enum):
    WAITING = "waiting"
    STALLED = "stalled"
    UPGRADED = "upgraded"
    OPENED = "opened"  # an event stream's 2xx head reached the client
    REJECTED = "rejected"
    NO_STATUS = "no-status"

    @property
    def final(self) -> bool:
        return self in (Phase.UPGRADED, Phase.OPENED, Phase.REJECTED, Phase.NO_STATUS)


class Event(enum.Enum):
    STALL_TIMER = "stall timer"
    SUCCESS_STATUS = "success status"
    STREAM_OPENED = "2xx head"
    OTHER_STATUS = "other status"
    ENDED = "ended"


TRANSITIONS: dict[tuple[Phase, Event], Phase] = {
    (Phase.WAITING, Event.STALL_TIMER): Phase.STALLED,
    (Phase.WAITING, Event.SUCCESS_STATUS): Phase.UPGRADED,
    (Phase.WAITING, Event.OTHER_STATUS): Phase.REJECTED,
    (Phase.WAITING, Event.ENDED): Phase.NO_STATUS,
    (Phase.STALLED, Event.SUCCESS_STATUS): Phase.UPGRADED,
    (Phase.STALLED, Event.OTHER_STATUS): Phase.REJECTED,
    (Phase.STALLED, Event.ENDED): Phase.NO_STATUS,
    (Phase.WAITING, Event.STREAM_OPENED): Phase.OPENED,
    (Phase.STALLED, Event.STREAM_OPENED): Phase.OPENED,
}


class Stage(enum.Enum):
    """Where a handshake is while it waits for its status (the record's `stuck_in`).

    Only FORWARDED is the upstream's doing; every other stage is the proxy's
    (or the user's, for INTERCEPTED), so only there can an encoder be blamed.
    """

    CONNECTING = "connecting"  # to the upstream
    TLS = "tls"  # the upstream TLS handshake
    SETTINGS = "settings"  # an HTTP/2 upstream's first SETTINGS not yet received
    QUEUED = "queued"  # inside the proxy, e.g. behind MAX_CONCURRENT_STREAMS
    INTERCEPTED = "intercepted"  # held by the user's interception
    FORWARDED = "forwarded"  # sent upstream, waiting for the status
    DONE = "done"  # the status arrived, or the handshake ended


class HandshakeEnded(Exception):
    """An event arrived for a handshake that already has its outcome."""


class EndCause(enum.Enum):
    """Why a handshake ended without a status, as far as the proxy can tell."""

    CLIENT_GONE = "client-gone"
    UPSTREAM_CLOSED = "upstream-closed"
    UPSTREAM_UNREACHABLE = "upstream-unreachable"
    KILLED = "killed"
    PROXY_RESET = "proxy-reset"  # the proxy itself ended the stream (a cap, a malformed frame)
    PROXY_STOPPED = "proxy-stopped"


class AnsweredBy(enum.Enum):
    """Who produced the status a client got: a record never blames the
    upstream for what it never saw."""

    UPSTREAM = "upstream"
    PROXY = "proxy"  # ws-encode's bridge refused the upstream's answer (a wrong accept) with a status of its own
    BEFORE_UPSTREAM = "before-upstream"  # another addon or the user answered before the upstream had the request
    CHANGED = "changed"  # the upstream answered; another addon or the user changed the status


def who_answered(facts: StreamFacts, status: int) -> AnsweredBy:
    """Who produced `status`, the status the client gets, from what the
    upstream's side handed mitmproxy's stream (`facts.answer_status`)."""
    if facts.proxy_refused is not None:
        return AnsweredBy.PROXY
    if facts.answer_status is None:
        return AnsweredBy.BEFORE_UPSTREAM
    return AnsweredBy.UPSTREAM if status == facts.answer_status else AnsweredBy.CHANGED


@dataclass
class Progress:
    """What is known about one handshake so far; plain data.

    Its lifecycle is here; what the proxy observed of it (when it went
    upstream, what the upstream answered, what the client sent meanwhile) is
    in `facts`, which the bridge's codecs and stream note as it happens, or
    the addon's hooks where no bridge carries it. `received_at`, `status_at`
    and `ended_at` are monotonic seconds, on the clock the facts use too.
    """

    handshake: Handshake
    received_at: float
    facts: StreamFacts
    phase: Phase = Phase.WAITING
    stalled: bool = False
    status: int | None = None  # as the client got it
    status_at: float | None = None
    answered_by: AnsweredBy | None = None
    content_encoding: str | None = None
    content_type: str | None = None  # the success response's as the upstream sent it, "" for none; None: not known
    bad_accept: bool = False  # a 101 whose Sec-WebSocket-Accept does not answer the key
    end_cause: EndCause | None = None
    end_reason: str | None = None  # the proxy's own words for PROXY_RESET
    ended_at: float | None = None
    first_event_at: float | None = None  # an event stream's first event through the proxy

    @property
    def forwarded_at(self) -> float | None:
        """When the request was written upstream; None while it is not."""
        return self.facts.forwarded_at

    @property
    def upstream_status(self) -> int | None:
        """As the upstream sent it (101 from an HTTP/1.1 upstream behind an extended CONNECT)."""
        return self.facts.upstream_status

    @property
    def client_bytes_before_status(self) -> int:
        return self.facts.client_bytes_before_status

    @property
    def status_with_data(self) -> bool:
        """The status came in the same read as the first response data."""
        return self.facts.status_with_data

    def _advance(self, event: Event) -> Phase:
        try:
            nxt = TRANSITIONS[(self.phase, event)]
        except KeyError:
            raise HandshakeEnded(f"{event.value} after {self.phase.value}") from None
        self.phase = nxt
        return nxt

    def stall(self) -> None:
        self._advance(Event.STALL_TIMER)
        self.stalled = True

    def status_arrived(self, status: int, now: float, content_encoding: str | None = None,
                       bad_accept: bool = False, content_type: str | None = None) -> Phase:
        """The client got `status`."""
        if not self.handshake.is_success(status):
            event = Event.OTHER_STATUS
        else:
            event = Event.SUCCESS_STATUS if self.handshake.is_websocket else Event.STREAM_OPENED
        phase = self._advance(event)
        self.status = status
        self.status_at = now
        self.answered_by = who_answered(self.facts, status)
        self.content_encoding = content_encoding
        self.content_type = content_type
        self.bad_accept = bad_accept
        return phase

    def end(self, cause: EndCause, now: float, reason: str | None = None) -> Phase:
        if self.phase is Phase.OPENED and self.ended_at is None:
            phase = self.phase  # an event stream that opened: its end is only noted, for its record
        else:
            phase = self._advance(Event.ENDED)
        self.end_cause = cause
        self.end_reason = reason
        self.ended_at = now
        return phase

    def first_event(self, now: float) -> None:
        """An opened event stream's first event went through the proxy."""
        if self.phase is not Phase.OPENED or self.first_event_at is not None:
            raise HandshakeEnded(f"a first event after {self.phase.value}")
        self.first_event_at = now

    @property
    def first_event_s(self) -> float | None:
        """Seconds from an event stream's head to its first event; None if none came."""
        if self.first_event_at is None or self.status_at is None:
            return None
        return max(0.0, self.first_event_at - self.status_at)

    def _until(self, now: float) -> float:
        until = self.status_at if self.status_at is not None else self.ended_at
        return until if until is not None else now

    def waited(self, now: float) -> float | None:
        """Seconds from forwarding to the status, to the end, or to `now`;
        None if the request never went upstream."""
        if self.forwarded_at is None:
            return None
        return max(0.0, self._until(now) - self.forwarded_at)

    def received(self, now: float) -> float:
        """Seconds from the proxy receiving the handshake to the status, to
        the end, or to `now`: what the client has been waiting."""
        return max(0.0, self._until(now) - self.received_at)
