"""What the proxy observed of a handshake as it happened: when it went
upstream and where it waits, what the upstream answered, what the client sent
meanwhile, who ended it.

The bridge's codecs and stream note these as it happens; where no bridge
carries a handshake, the addon's hooks note what they can see
(`noted_by_hooks`). The core (`handshakes`, `lifecycle`) reads them from
here: nothing is copied.

The facts travel with the flow's request object, which the client's codec
makes, the stream owns and the upstream's codec is handed: no table on the
side. They are looked up by an attribute name, not a class, so that after a
script reload the new copy of the addon still reads what the codecs of
connections made before it note (they keep the earlier copy's classes).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .handshake import Handshake

# Where a handshake is (StreamFacts.stage), as far as the bridge sees it.
CONNECTING = "connecting"  # waiting for its upstream connection
SETTINGS = "settings"  # held for an HTTP/2 upstream's first SETTINGS
QUEUED = "queued"  # behind an HTTP/2 upstream's MAX_CONCURRENT_STREAMS
FORWARDED = "forwarded"  # its headers are written upstream

# Whose side ended a stream with an error (StreamFacts.ended_by).
CLIENT = "client"
UPSTREAM = "upstream"


@dataclass
class StreamFacts:
    """What the proxy observed of a handshake that mitmproxy's flow cannot show."""

    # The stream's classification of the request, made once for the stream,
    # the codecs and the addon.
    handshake: Handshake | None = None
    forwarded_at: float | None = None  # clock() when the request went upstream
    # One of the stages above; None until the bridge's stream has the handshake.
    stage: str | None = None
    # Why the bridge itself ended the handshake's stream, if it did (no
    # header values): the addon then blames neither peer.
    ended_by_proxy: str | None = None
    # CLIENT or UPSTREAM: whose codec reported the error that ended the stream.
    ended_by: str | None = None
    # The status the upstream sent, as it sent it (a 101 from an HTTP/1.1
    # upstream behind an extended CONNECT); None while it sent none.
    upstream_status: int | None = None
    # The status the upstream's side handed mitmproxy's stream, which the
    # response hooks start from; None if the upstream never answered (an
    # addon or the user answered in the proxy).
    answer_status: int | None = None
    # No bridge carries this handshake: the addon's hooks note its forwarding
    # (the request hook) and its answer (the responseheaders hook).
    noted_by_hooks: bool = False
    client_bytes_before_status: int = 0
    status_with_data: bool = False
    # Client messages that went upstream before the status, past mitmproxy's
    # WebSocket layer: (opcode, payload, time.time()), for flow.websocket.
    early_messages: list[tuple[int, bytes, float]] = field(default_factory=list)
    # The client's side of an extended CONNECT while it waits for its status
    # (h2bridge.ClientSideStream): where an HTTP/2 upstream's codec takes the
    # DATA the client sends before it.
    waiting_client: Any = None
    # The Sec-WebSocket-Key of the upgrade the proxy sent an HTTP/1.1
    # upstream for an extended CONNECT (the client sent none).
    key_sent: str | None = None
    # Why the proxy answered the client itself when the upstream's answer
    # could not reach it as it was (a wrong accept, a 2xx that ignored the
    # upgrade), if it did.
    proxy_refused: str | None = None
    # When an event stream's first event went through the proxy (its stream
    # function notes it; the addon's update hook takes it from here).
    first_event_at: float | None = None
    # The addon's clock, which it gives the facts when it starts to follow
    # the handshake (before anything goes upstream), so that the times the
    # bridge notes are on the clock the addon measures with.
    clock: Callable[[], float] = time.monotonic

    def waiting(self, stage: str) -> None:
        """Not (or no longer) written upstream: no stall clock from forwarding."""
        self.forwarded_at, self.stage = None, stage

    def forwarded(self) -> None:
        self.forwarded_at, self.stage = self.clock(), FORWARDED


_ATTRIBUTE = "ws_encode_facts"
_NOT_A_HANDSHAKE = "ws_encode_not_a_handshake"


def facts_of(request: object) -> StreamFacts | None:
    """The facts the bridge noted on this request, if it carried it."""
    return getattr(request, _ATTRIBUTE, None)


def note_not_a_handshake(request: object) -> None:
    """The bridge's stream classified `request` as it arrived, and it opens no
    handshake: the upstream's codec and the addon's hooks, which would ask
    again of every request, read that instead."""
    setattr(request, _NOT_A_HANDSHAKE, True)


def not_a_handshake(request: object) -> bool:
    return getattr(request, _NOT_A_HANDSHAKE, False)


def facts_for(request: object) -> StreamFacts:
    """The request's facts, made on first use."""
    facts = facts_of(request)
    if facts is None:
        facts = StreamFacts()
        setattr(request, _ATTRIBUTE, facts)
    return facts
