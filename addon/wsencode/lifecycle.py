"""The life of one handshake, as a state machine with every transition in one table.

    WAITING --stall timer--> STALLED
    WAITING | STALLED --success status--> UPGRADED
    WAITING | STALLED --other status-->   REJECTED
    WAITING | STALLED --flow ended-->     NO_STATUS

UPGRADED, REJECTED and NO_STATUS are final: each handshake gets exactly one
`handshake` record, and at most one `stall` record. Where a waiting
handshake is (`Stage`) is a separate, observed fact: it says who is holding
it, not what may happen next. Times are passed in by the caller (seconds
from any monotonic clock), so this is testable without sockets or sleeps.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .handshake import Handshake


class Phase(enum.Enum):
    WAITING = "waiting"
    STALLED = "stalled"
    UPGRADED = "upgraded"
    REJECTED = "rejected"
    NO_STATUS = "no-status"

    @property
    def final(self) -> bool:
        return self in (Phase.UPGRADED, Phase.REJECTED, Phase.NO_STATUS)


class Event(enum.Enum):
    STALL_TIMER = "stall timer"
    SUCCESS_STATUS = "success status"
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
}


class Stage(enum.Enum):
    """Where a handshake is while it waits for its status (SPEC: `stuck_in`).

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


@dataclass
class Progress:
    """What is known about one handshake so far; plain data.

    `received_at`, `forwarded_at`, `status_at` and `ended_at` are monotonic
    seconds; `forwarded_at` stays None until the request is really written
    upstream.
    """

    handshake: Handshake
    received_at: float
    forwarded_at: float | None = None
    phase: Phase = Phase.WAITING
    stalled: bool = False
    status: int | None = None  # as the client got it
    upstream_status: int | None = None  # as the upstream sent it (101 from an HTTP/1.1 upstream behind an extended CONNECT)
    status_at: float | None = None
    content_encoding: str | None = None
    status_with_data: bool = False
    bad_accept: bool = False  # a 101 whose Sec-WebSocket-Accept does not match the key
    end_cause: EndCause | None = None
    end_reason: str | None = None  # the proxy's own words for PROXY_RESET
    ended_at: float | None = None
    client_bytes_before_status: int = 0

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

    def status_arrived(
        self,
        status: int,
        now: float,
        content_encoding: str | None = None,
        with_data: bool = False,
    ) -> Phase:
        success = self.handshake.is_success(status)
        phase = self._advance(Event.SUCCESS_STATUS if success else Event.OTHER_STATUS)
        self.status = status
        self.upstream_status = status if self.upstream_status is None else self.upstream_status
        self.status_at = now
        self.content_encoding = content_encoding
        self.status_with_data = with_data
        return phase

    def end(self, cause: EndCause, now: float, reason: str | None = None) -> Phase:
        phase = self._advance(Event.ENDED)
        self.end_cause = cause
        self.end_reason = reason
        self.ended_at = now
        return phase

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
