"""One handshake through the probe's proxy, as a browser makes it, and what the client saw.

Like the lab's clients (wslab/clients.py) the client waits for the status
before it speaks, as browsers do; unlike them it carries the user's headers,
sub-protocols and Origin, sends the user's message, and judges nothing but
time: a live server's replies are its own business. An event stream is read
by the lab's own event-stream client (`read_event_stream`), as EventSource
reads one: its head, and its events as they decode.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from dataclasses import dataclass, field

from wspeers import h2ws, h3ws
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, RejectConnection, Request, TextMessage
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from wsencode.core.records import EVENT_STREAM, WEBSOCKET
from wsencode.report import printable
from wslab.clients import BROWSER_CODINGS, EventStreamSeen, cancel, h1_event, read_event_stream

# Set by the client itself: a user's copy would clash with it or break the
# upgrade. (":protocol": a recorded HTTP/2 flow shows its extended CONNECT's.)
MECHANICS = frozenset({
    ":protocol", "host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol", "accept-encoding", "content-length", "transfer-encoding", "keep-alive",
    "proxy-connection", "te",
})
# An event-stream request's own: the client sends them as EventSource does.
EVENT_STREAM_MECHANICS = MECHANICS | {"accept", "cache-control"}
# Events an event-stream attempt reads at the most before it closes: the first, and what came with it.
EVENTS_READ = 20
TRANSPORT_NAMES = {"h2": "HTTP/2", "h3": "HTTP/3", "h1": "HTTP/1.1"}  # in the order they are tried and judged
# Seconds to set up TLS or QUIC with the local proxy: not what is measured, and
# a busy machine can take a while for the proxy's first certificate.
PROXY_CONNECT = 15.0
SPEAKERS = ("client", "server")
__all__ = ["BROWSER_CODINGS", "Handshake", "Seen", "run"]


@dataclass(frozen=True)
class Handshake:
    """What one attempt sends: its transport, encoding offer, who speaks first (a WebSocket's), or
    that it is an event stream's request."""

    transport: str  # h1, h2 or h3, between the client and the proxy
    offer: str | None  # the accept-encoding value, or None for none
    speaker: str | None  # client: send `message` once the status is in; server: wait for its first message
    path: str
    authority: str
    headers: tuple[tuple[str, str], ...] = ()  # the user's, without MECHANICS
    subprotocols: tuple[str, ...] = ()
    message: str = "hello"
    kind: str = WEBSOCKET  # or EVENT_STREAM: a GET that accepts text/event-stream, speaker None

    @property
    def label(self) -> str:
        offer = "with accept-encoding" if self.offer else "no accept-encoding"
        speaker = f" {self.speaker}-first" if self.kind == WEBSOCKET else ""
        return f"{TRANSPORT_NAMES[self.transport]:<8} {offer:<21}{speaker}"

    def fields(self) -> list[tuple[str, str]]:
        if self.kind == EVENT_STREAM:  # (read_event_stream adds its own and the offer)
            return [(k, v) for k, v in self.headers if k.lower() not in EVENT_STREAM_MECHANICS]
        extra = [("accept-encoding", self.offer)] if self.offer else []
        if self.subprotocols:
            extra.append(("sec-websocket-protocol", ", ".join(self.subprotocols)))
        return extra + [(k, v) for k, v in self.headers if k.lower() not in MECHANICS]


@dataclass
class Seen:
    """What the client saw, with times in seconds from sending the handshake."""

    status: int | None = None
    status_s: float | None = None
    content_encoding: str | None = None
    reply_s: float | None = None  # the first message from the server, within the attempt's timeout
    error: str | None = None  # the connection failed (not: no status in time)
    events: list[str] = field(default_factory=list)
    stream: EventStreamSeen | None = None  # an event stream's: its head, chunks and events

    @property
    def upgraded(self) -> bool:
        return self.status == 101 or (self.status is not None and 200 <= self.status < 300)


def _left(sent: float, timeout: float) -> float:
    """What is left of an attempt's `timeout` (from sending the handshake) for the first message."""
    return max(0.05, sent + timeout - time.monotonic())


def _no_verify(alpn: str) -> ssl.SSLContext:
    # The proxy in front mints its own certificate; the target's was checked before.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([alpn])
    return context


async def h2_handshake(port: int, shake: Handshake, timeout: float) -> Seen:
    client = h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost")
    return await extended_connect_handshake(client, shake, timeout)


async def h3_handshake(port: int, shake: Handshake, timeout: float) -> Seen:
    """RFC 9220 through the proxy's HTTP/3, QUIC on UDP `port`."""
    client = h3ws.H3WebSocketClient("127.0.0.1", port, server_hostname="localhost")
    try:
        return await extended_connect_handshake(client, shake, timeout)
    except (ConnectionError, h3ws.WebSocketClosed) as e:
        closed = client.closed
        if closed is None or str(closed) not in str(e):
            raise
        # A connection close's reason phrase is the peer's words, and may quote a header: left out.
        said = f"connection closed by {closed.initiator} with {h3ws.error_name(closed.error_code)}"
        raise ConnectionError(str(e).replace(str(closed), said)) from None


async def extended_connect_handshake(client: h2ws.H2WebSocketClient | h3ws.H3WebSocketClient, shake: Handshake,
                                     timeout: float) -> Seen:
    """One WebSocket by extended CONNECT: the h2ws and h3ws clients share this API."""
    seen = Seen()
    await client.connect(PROXY_CONNECT)
    async with client:
        headers = [(k.lower(), v) for k, v in shake.fields()]
        ws = await client.open_websocket(shake.path, shake.authority, headers=headers)
        sent = time.monotonic()
        try:
            seen.status = await ws.wait_status(timeout)
        except asyncio.TimeoutError:
            await cancel(ws)
            return seen
        seen.status_s = time.monotonic() - sent
        seen.content_encoding = dict(ws.response_headers).get("content-encoding")
        if not seen.upgraded:
            return seen
        try:
            if shake.speaker == "client":
                await ws.send_text(shake.message, timeout)
            await ws.receive(_left(sent, timeout))
            seen.reply_s = time.monotonic() - sent
            await ws.close(timeout=1)
        except (h2ws.WebSocketClosed, asyncio.TimeoutError) as e:
            seen.events.append(type(e).__name__)
    return seen


async def h1_handshake(port: int, shake: Handshake, timeout: float) -> Seen:
    seen = Seen()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=_no_verify("http/1.1"), server_hostname="localhost"),
        PROXY_CONNECT)
    ws = WSConnection(ConnectionType.CLIENT)

    def next_event(*kinds):
        return h1_event(ws, reader, *kinds)

    try:
        extra = [(k.encode(), v.encode()) for k, v in shake.fields() if k != "sec-websocket-protocol"]
        writer.write(ws.send(Request(host=shake.authority, target=shake.path, extra_headers=extra,
                                     subprotocols=list(shake.subprotocols))))
        sent = time.monotonic()
        try:
            answer = await asyncio.wait_for(next_event(AcceptConnection, RejectConnection), timeout)
        except asyncio.TimeoutError:
            return seen
        seen.status_s = time.monotonic() - sent
        if isinstance(answer, RejectConnection):
            seen.status = answer.status_code
            return seen
        seen.status = 101
        fields = {k.decode().lower(): v.decode() for k, v in answer.extra_headers}
        seen.content_encoding = fields.get("content-encoding")
        if shake.speaker == "client":
            writer.write(ws.send(TextMessage(shake.message)))
        try:
            await asyncio.wait_for(next_event(Message), _left(sent, timeout))
            seen.reply_s = time.monotonic() - sent
            writer.write(ws.send(CloseConnection(1000)))
        except (asyncio.TimeoutError, ConnectionError) as e:
            seen.events.append(type(e).__name__)
        return seen
    finally:
        writer.close()


CLIENTS = {"h1": h1_handshake, "h2": h2_handshake, "h3": h3_handshake}

# wsproto's handshake errors, as wsproto/handshake.py words them. Those that
# quote what the server sent are cut before the quote: a server that echoes a
# header back (Sec-WebSocket-Protocol, say) puts the user's credentials there.
# A wording not listed here is not printed: it might quote one too.
PROTOCOL_ERRORS = ("Missing header, 'Connection: Upgrade'", "Missing header, 'Upgrade: websocket'",
                   "Bad accept token", "Bad HTTP message")
QUOTING_PROTOCOL_ERRORS = ("unrecognized subprotocol", "unrecognized extension")


def failure(e: BaseException) -> str:
    """What went wrong with an attempt, for printing: never a value the server sent."""
    message = str(e)
    if isinstance(e, (LocalProtocolError, RemoteProtocolError)):
        quoting = next((q for q in QUOTING_PROTOCOL_ERRORS if message.startswith(q)), None)
        if quoting is not None:
            message = f"{quoting} (value not shown)"
        elif message not in PROTOCOL_ERRORS:
            message = "a handshake response wsproto does not accept (details not shown)"
    return printable(f"{type(e).__name__}: {message}" if message else type(e).__name__)


# What the event-stream client says of a failure in its own words (or the system's), printed as is.
OWN_STREAM_FAILURES = ("the connection closed before the response ended", "stream reset with ", "GOAWAY with ",
                       "cannot decode content-encoding ", "undecodable ", "ConnectionError: ",
                       "ConnectionRefusedError: ", "ConnectionResetError: ", "OSError: ")


def stream_failure(outcome: str) -> str:
    """Why an event-stream attempt failed (its outcome, "failed (...)"), for printing: never a reason
    phrase a peer sent, nor a protocol error's, which may quote a header."""
    said = outcome.removeprefix("failed (").removesuffix(")")
    if said.startswith("connection closed: "):  # an HTTP/3 connection close: its code, not its reason
        return printable(said.removeprefix("connection closed: ").split(": ", 1)[0])
    if said.startswith(OWN_STREAM_FAILURES):
        return printable(said)
    return printable(re.split(r"[:\s]", said, maxsplit=1)[0] + " (details not shown)")


async def event_stream(port: int, shake: Handshake, timeout: float) -> Seen:
    """An event-stream request through the proxy, read until it ends, EVENTS_READ events have
    decoded, or `timeout` seconds from sending it; connecting has PROXY_CONNECT of its own."""
    headers = [(k.lower(), v) for k, v in shake.fields()]  # (HTTP/2 and HTTP/3 refuse a name in capitals)
    stream = await read_event_stream(shake.transport, port, shake.path, authority=shake.authority,
                                     accept_encoding=shake.offer, headers=headers, count=EVENTS_READ,
                                     give_up=timeout, connect_within=PROXY_CONNECT)
    seen = Seen(stream.status, stream.head_s, stream.content_encoding, stream=stream)
    if stream.sent_at is None and not stream.outcome.startswith("failed"):
        seen.error = f"no connection to the probe's proxy in {PROXY_CONNECT:g} s"
    elif stream.outcome.startswith("failed"):
        failure = stream_failure(stream.outcome)
        if stream.status is None:
            seen.error = failure
        else:
            seen.events.append(failure)  # after its head: what the stream did, not a failed attempt
    return seen


async def run(port: int, shake: Handshake, timeout: float) -> Seen:
    """One attempt; a connection that fails is in `error`, not raised."""
    if shake.kind == EVENT_STREAM:
        return await event_stream(port, shake, timeout)
    try:
        return await CLIENTS[shake.transport](port, shake, timeout)
    except (OSError, asyncio.TimeoutError, h2ws.WebSocketClosed, LocalProtocolError, RemoteProtocolError) as e:
        return Seen(error=failure(e))
