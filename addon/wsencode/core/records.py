"""The records the addon writes (the contract's "Report records"), as a type.

One `Record` per event: a `stall` while a handshake waits, and one
`handshake` when it has its outcome. Plain data: `as_dict` is what the report
line, the flow's metadata and the bundle keep, in the contract's field order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STALL = "stall"
HANDSHAKE = "handshake"
WEBSOCKET = "websocket"  # the record's kind
EVENT_STREAM = "event-stream"


@dataclass(frozen=True)
class Outcome:
    """What only a `handshake` record says."""

    outcome: str  # lifecycle.Phase's value: upgraded, opened, rejected, no-status
    stalled: bool
    content_encoding: str | None
    first_event_s: float | None = None  # an event stream's: from its head to its first event


@dataclass(frozen=True)
class Record:
    event: str  # STALL or HANDSHAKE
    flow_id: str
    transport: str
    upstream_transport: str | None
    url: str  # redacted
    policy: str
    accept_encoding_client: str | None
    accept_encoding_upstream: str | None
    waited_s: float | None
    status: int | None  # as the client got it
    upstream_status: int | None  # as the upstream sent it; None if it sent none
    client_bytes_before_status: int
    stuck_in: str
    received_s: float
    diagnosis: str
    kind: str = WEBSOCKET
    outcome: Outcome | None = None  # a `handshake` record's

    @property
    def what(self) -> str:
        """What the record is about, in a log line."""
        return "WebSocket handshake" if self.kind == WEBSOCKET else "Event stream"

    def as_dict(self) -> dict[str, Any]:
        fields = {
            "event": self.event,
            "kind": self.kind,
            "flow_id": self.flow_id,
            "transport": self.transport,
            "upstream_transport": self.upstream_transport,
            "url": self.url,
            "policy": self.policy,
            "accept_encoding_client": self.accept_encoding_client,
            "accept_encoding_upstream": self.accept_encoding_upstream,
            "waited_s": self.waited_s,
            "status": self.status,
            "upstream_status": self.upstream_status,
            "client_bytes_before_status": self.client_bytes_before_status,
            "stuck_in": self.stuck_in,
            "received_s": self.received_s,
            "diagnosis": self.diagnosis,
        }
        if self.outcome is not None:
            fields.update(outcome=self.outcome.outcome, stalled=self.outcome.stalled,
                          content_encoding=self.outcome.content_encoding)
            if self.kind == EVENT_STREAM:
                fields["first_event_s"] = self.outcome.first_event_s
        return fields
