"""A WebSocket opened by an extended CONNECT (RFC 8441 over HTTP/2, RFC 9220
over HTTP/3), as the proxy carries it: the form it keeps, the translation to
and from an HTTP/1.1 upgrade, and the named states of its two sides.

The flow of such a WebSocket is what the client sent and got, from its first
hook to its last: `CONNECT` with `:protocol: websocket` (kept as the
request's first header field, as browsers' developer tools show it: mitmproxy
has no field for it), answered by a 2xx. Only the codecs of the upstream
connection translate, where mitmproxy already converts HTTP/2 requests to
HTTP/1.1: to an HTTP/1.1 upstream it goes as a `GET` upgrade with a key of the
proxy's own, whose `101` comes back as a 2xx once its accept answers that key
(RFC 6455 section 4.1); an HTTP/1.1 client's upgrade goes to an HTTP/2 or
HTTP/3 upstream as an extended CONNECT, whose 2xx comes back as the `101` the
client asked for.

Header fields here are (name, value) byte pairs, as both mitmproxy's Headers
and the HTTP/2 and HTTP/3 libraries hold them; nothing here imports mitmproxy,
so the HTTP/2 and HTTP/3 codecs share it and tests drive it directly.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from wsproto.utilities import generate_accept_token, generate_nonce

from .frames import client_messages, whole_messages_length
from .streamfacts import StreamFacts

Fields = Sequence[tuple[bytes, bytes]]

# Client DATA kept while a status is awaited; beyond this the stream is reset.
MAX_EARLY_BYTES = 1 << 20

PROTOCOL = b":protocol"
WEBSOCKET = b"websocket"

# Fields that belong to HTTP/1.1's connection (RFC 9113 section 8.2.2, RFC
# 9114 section 4.2) or to its upgrade (RFC 6455 section 4): never sent on an
# HTTP/2 or HTTP/3 stream. Also content-length: a CONNECT stream's DATA is the
# tunnel, not a body (RFC 9113 section 8.5), and an upstream h2 that counts it
# against a length fails its whole connection.
HTTP1_ONLY = frozenset({
    b"connection", b"upgrade", b"keep-alive", b"proxy-connection", b"transfer-encoding",
    b"sec-websocket-key", b"sec-websocket-accept", b"host", b"content-length",
})


def protocol_of(method: bytes, fields: Fields) -> bytes | None:
    """The `:protocol` an extended CONNECT asks for, or None for any other request."""
    if method != b"CONNECT":
        return None
    for name, value in fields:
        if name == PROTOCOL:
            return value
    return None


def is_extended_connect(method: bytes, fields: Fields) -> bool:
    return protocol_of(method, fields) is not None


def with_protocol(protocol: bytes, fields: Fields) -> list[tuple[bytes, bytes]]:
    """The flow's header fields of an extended CONNECT: `:protocol` first."""
    return [(PROTOCOL, protocol), *fields]


def stream_fields(fields: Fields) -> list[tuple[bytes, bytes]]:
    """`fields` as an HTTP/2 or HTTP/3 stream may carry them: lowercase
    names, without `:protocol` (a pseudo-header of its own there) and
    without HTTP/1.1's connection and upgrade fields."""
    return [(k.lower(), v) for k, v in fields if k != PROTOCOL and k.lower() not in HTTP1_ONLY]


def upgrade_fields(fields: Fields, key: str) -> list[tuple[bytes, bytes]]:
    """An extended CONNECT's fields as the HTTP/1.1 upgrade that asks the
    same (RFC 6455 section 4.1), with the proxy's key."""
    return [
        *((k, v) for k, v in fields if k != PROTOCOL and k.lower() not in HTTP1_ONLY),
        (b"upgrade", b"websocket"), (b"connection", b"Upgrade"), (b"sec-websocket-key", key.encode()),
    ]


def new_key() -> str:
    """A Sec-WebSocket-Key of the proxy's own (RFC 6455 section 4.1: 16 random bytes, base64)."""
    return generate_nonce().decode()


def refusal(method: bytes, protocol: bytes | None, version: str, authority: bytes,
            websockets_on: bool) -> tuple[int, str] | None:
    """Why an extended CONNECT cannot be carried, with the status that says
    so on its own stream (RFC 8441 section 4, RFC 9220 section 3), or None."""
    if method != b"CONNECT":
        return 400, ":protocol on a request that is not a CONNECT"
    if (protocol or b"").lower() != WEBSOCKET:
        return 501, "extended CONNECT for a protocol other than websocket"
    if not websockets_on:
        return 501, "WebSockets are turned off (the websocket option)"
    if version.strip() != "13":
        return 400, "extended CONNECT without sec-websocket-version: 13"
    if not authority:
        return 400, "extended CONNECT without :authority"
    return None


def accept_for(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer `key` with (`key` as
    mitmproxy decodes it: bytes that are not UTF-8 are lone surrogates)."""
    return generate_accept_token(key.strip().encode("utf-8", "surrogateescape")).decode()


def _values(fields: Fields, name: bytes) -> list[bytes]:
    return [v for k, v in fields if k.lower() == name]


def answer_problem(status: int, fields: Fields, key: str) -> str | None:
    """Why an HTTP/1.1 upstream's answer to the proxy's upgrade (with `key`)
    cannot reach a client that sent an extended CONNECT as it is, or None:
    a 101 that answers the key opens the WebSocket, any other non-2xx is a
    refusal the client gets."""
    if status != 101:
        if 200 <= status < 300:
            # A 2xx answering an extended CONNECT opens the WebSocket (RFC
            # 8441 section 5): an upstream that ignored the upgrade must not
            # read so to the client.
            return f"the upstream answered the WebSocket upgrade with {status} instead of switching protocols"
        return None
    if [v.strip().lower() for v in _values(fields, b"upgrade")] != [WEBSOCKET]:
        return "the upstream switched protocols to something other than websocket"
    accept = b",".join(_values(fields, b"sec-websocket-accept")).strip()
    if accept != accept_for(key).encode():
        return "the upstream answered the WebSocket handshake with a wrong Sec-WebSocket-Accept"
    return None


def success_fields(fields: Fields) -> list[tuple[bytes, bytes]]:
    """A `101`'s fields as the 2xx that answers an extended CONNECT: what
    the WebSocket negotiated (extensions, subprotocol) and the rest, without
    HTTP/1.1's upgrade fields."""
    return stream_fields(fields)


def switching_fields(fields: Fields, key: str) -> list[tuple[bytes, bytes]]:
    """An extended CONNECT's 2xx as the `101` an HTTP/1.1 client's upgrade
    (with `key`) asked for."""
    return [
        *((k, v) for k, v in fields if k.lower() not in HTTP1_ONLY),
        (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_for(key).encode()),
    ]


def upgrade_key(fields: Iterable[tuple[bytes, bytes]]) -> str:
    """An HTTP/1.1 upgrade's Sec-WebSocket-Key, decoded as mitmproxy decodes it."""
    return b", ".join(_values(list(fields), b"sec-websocket-key")).decode("utf-8", "surrogateescape")


# -- the client's side of an extended CONNECT -----------------------------------


class ClientPhase(enum.Enum):
    """Where the client's side of an extended CONNECT is, which decides where
    the DATA it sends goes."""

    WAITING = enum.auto()  # for the status: kept, for after it
    RELAYING = enum.auto()  # an upstream stream has the CONNECT: whole messages go to it (and are kept, in case)
    ANSWERED = enum.auto()  # that upstream answered; its status is on its way through the stream: kept
    OPEN = enum.auto()  # the status is sent: mitmproxy's WebSocket layer carries it

    @property
    def before_status(self) -> bool:
        return self is not ClientPhase.OPEN


class ClientStep(enum.Enum):
    UPSTREAM_HAS_CONNECT = enum.auto()  # the upstream's codec sent it
    UPSTREAM_ANSWERED = enum.auto()  # with any status
    UPSTREAM_FAILED = enum.auto()  # reset the CONNECT or went away: the WebSocket may go elsewhere next
    STATUS_SENT = enum.auto()  # to the client


CLIENT_TRANSITIONS: dict[tuple[ClientPhase, ClientStep], ClientPhase] = {
    (ClientPhase.WAITING, ClientStep.UPSTREAM_HAS_CONNECT): ClientPhase.RELAYING,
    (ClientPhase.RELAYING, ClientStep.UPSTREAM_ANSWERED): ClientPhase.ANSWERED,
    (ClientPhase.RELAYING, ClientStep.UPSTREAM_FAILED): ClientPhase.WAITING,
    (ClientPhase.WAITING, ClientStep.STATUS_SENT): ClientPhase.OPEN,  # (an HTTP/1.1 upstream: nothing relayed)
    (ClientPhase.ANSWERED, ClientStep.STATUS_SENT): ClientPhase.OPEN,
}


@dataclass
class ClientSideStream:
    """A client's extended CONNECT stream, on the client-facing connection."""

    facts: StreamFacts
    phase: ClientPhase = ClientPhase.WAITING
    early: bytearray = field(default_factory=bytearray)  # client DATA kept for after the status
    ended_early: bool = False  # the client ended its side before the status
    # While RELAYING: the (upstream connection, stream id) whole messages go to,
    # and what went there, kept until the upstream answers: if it resets the
    # CONNECT instead, the bytes go to wherever the WebSocket goes next.
    relay: tuple[Any, int] | None = None
    relayed: bytearray = field(default_factory=bytearray)

    def step(self, step: ClientStep) -> bool:
        """Take `step` if CLIENT_TRANSITIONS has it from this phase; a step
        that does not apply (a second answer, say) changes nothing."""
        after = CLIENT_TRANSITIONS.get((self.phase, step))
        if after is None:
            return False
        self.phase = after
        if after is not ClientPhase.RELAYING:
            self.relay = None
        if step is ClientStep.UPSTREAM_ANSWERED:
            self.facts.early_messages += client_messages(self.relayed)
            self.relayed.clear()
        elif step is ClientStep.UPSTREAM_FAILED:
            self.early[:0] = self.relayed
            self.relayed.clear()
        elif after is ClientPhase.OPEN:
            self.facts.waiting_client = None  # no upstream will look for it now
        return True

    @property
    def is_open(self) -> bool:
        return self.phase is ClientPhase.OPEN

    @property
    def over_cap(self) -> bool:
        return len(self.early) + len(self.relayed) > MAX_EARLY_BYTES

    def take(self, data: bytes) -> bytes:
        """DATA the client sent before its status; what of it goes upstream
        now: while an upstream stream has the CONNECT, whole messages, or a
        server that waits for them would never answer (mitmproxy's WebSocket
        layer, which carries the rest, must start where no message is half
        sent)."""
        self.facts.client_bytes_before_status += len(data)
        self.early += data
        return self._whole_messages() if self.relay else b""

    def relay_to(self, upstream: Any, sid: int) -> bytes | None:
        """An upstream stream has the CONNECT: what goes there now, or None
        if this side is not waiting for it."""
        if not self.step(ClientStep.UPSTREAM_HAS_CONNECT):
            return None
        self.relay = (upstream, sid)
        return self._whole_messages()

    def hand_over(self) -> tuple[bytes, bool]:
        """Once the status is out: what the WebSocket layer gets now — the
        DATA kept, and whether the client ended its side meanwhile."""
        data, ended = bytes(self.early), self.ended_early
        self.early, self.ended_early = bytearray(), False
        return data, ended

    def _whole_messages(self) -> bytes:
        whole = whole_messages_length(self.early)
        data = bytes(self.early[:whole])
        del self.early[:whole]
        self.relayed += data
        return data


# -- an extended CONNECT on an upstream connection -----------------------------------


class UpstreamPhase(enum.Enum):
    """An upstream CONNECT stream's phase."""

    WAITING = enum.auto()  # for the status
    OPEN = enum.auto()


@dataclass
class UpstreamStream:
    """An extended CONNECT stream on an upstream HTTP/2 or HTTP/3 connection."""

    facts: StreamFacts
    # The Sec-WebSocket-Key of an HTTP/1.1 client's upgrade, which the 101 it
    # gets must answer; None when the client itself sent the extended CONNECT.
    key: str | None
    relay_from: ClientSideStream | None = None
    phase: UpstreamPhase = UpstreamPhase.WAITING

    @property
    def is_open(self) -> bool:
        return self.phase is UpstreamPhase.OPEN


# -- where the stream has a handshake upstream ------------------------------------


class Route(enum.Enum):
    """Where a handshake's stream has it upstream."""

    FIRST = enum.auto()  # on the connection mitmproxy chose
    HTTP1 = enum.auto()  # on an HTTP/1.1 connection of its own: the upstream could not take an extended CONNECT
    ACCEPTED = enum.auto()  # the upstream accepted: its stream carries the WebSocket


class RouteStep(enum.Enum):
    NEEDS_HTTP1 = enum.auto()  # the upstream codec's NeedsHttp1
    UPSTREAM_ACCEPTED = enum.auto()  # a 101, or a 2xx answering an extended CONNECT, reached the stream


ROUTE_TRANSITIONS: dict[tuple[Route, RouteStep], Route] = {
    (Route.FIRST, RouteStep.NEEDS_HTTP1): Route.HTTP1,
    (Route.FIRST, RouteStep.UPSTREAM_ACCEPTED): Route.ACCEPTED,
    (Route.HTTP1, RouteStep.UPSTREAM_ACCEPTED): Route.ACCEPTED,
}
