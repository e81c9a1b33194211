"""Real clients, each saying what it saw: WebSocket clients for the matrix,
which wait for the status before they speak, as browsers do; and an
event-stream client (`read_event_stream`) that times a response's head and
its first decoded event, as `EventSource` sees them."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h11
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from wspeers import h2ws, h3ws
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, RejectConnection, Request, TextMessage

from .app import GREETING
from .codings import Decoder
from .sse import EventParser, ServerEvent, is_event_stream

BROWSER_CODINGS = "gzip, deflate, br, zstd"  # what Chromium offers on a WebSocket handshake
HELLO = "hello"


@dataclass
class Seen:
    """What the client saw: `outcome` is echoed, greeted, unreadable (frames
    arrived but not the message sent: compressed bytes), gave up (no status in
    time), refused <status>, or failed (...)."""

    outcome: str
    status: int | None = None
    status_s: float | None = None  # seconds from sending the handshake to its status
    content_encoding: str | None = None


def _judge(got, speaker: str) -> str:
    want = HELLO if speaker == "client" else GREETING
    return ("echoed" if speaker == "client" else "greeted") if got == want else "unreadable"


async def h2_client(port: int, path: str, speaker: str, accept_encoding: str | None, give_up: float,
                    gate: asyncio.Semaphore) -> Seen:
    """RFC 8441 over the proxy's HTTP/2 (scripts/wspeers/h2ws.py)."""
    client = h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost")
    return await extended_connect_client(client, path, speaker, accept_encoding, give_up, gate)


async def h3_client(port: int, path: str, speaker: str, accept_encoding: str | None, give_up: float,
                    gate: asyncio.Semaphore) -> Seen:
    """RFC 9220 over the proxy's HTTP/3, QUIC on UDP `port` (scripts/wspeers/h3ws.py)."""
    client = h3ws.H3WebSocketClient("127.0.0.1", port, server_hostname="localhost")
    return await extended_connect_client(client, path, speaker, accept_encoding, give_up, gate)


async def cancel(ws: h2ws.ClientWebSocket | h3ws.ClientWebSocket) -> None:
    """Cancel a WebSocket whose status never came, as a browser does: its stream reset, and the
    connection to be closed right after, reading nothing more. Over HTTP/3 the peer answers the
    reset with STOP_SENDING, which aioquic 1.2 asserts on when it reads it (a reset already sent)."""
    await ws.reset()
    # h3ws sends the reset from a callback it has just scheduled, which runs before this resumes;
    # a QUIC connection that starts closing first would never send it.
    await asyncio.sleep(0)


async def extended_connect_client(client: h2ws.H2WebSocketClient | h3ws.H3WebSocketClient, path: str, speaker: str,
                                  accept_encoding: str | None, give_up: float, gate: asyncio.Semaphore) -> Seen:
    """One WebSocket by extended CONNECT: the h2ws and h3ws clients share this API."""
    headers = [("accept-encoding", accept_encoding)] if accept_encoding else []
    async with gate:  # TLS or QUIC handshakes a few at a time: mitmproxy spends milliseconds of CPU on each
        await client.connect()
    async with client:
        ws = await client.open_websocket(path, "localhost", headers=headers)
        sent = time.monotonic()
        try:
            status = await ws.wait_status(give_up)
        except asyncio.TimeoutError:
            await cancel(ws)
            return Seen("gave up")
        seen = Seen("", status, time.monotonic() - sent, dict(ws.response_headers).get("content-encoding"))
        if not 200 <= status < 300:
            seen.outcome = f"refused {status}"
            return seen
        try:
            if speaker == "client":
                await ws.send_text(HELLO)
            seen.outcome = _judge(await ws.receive(give_up), speaker)
            await ws.close(timeout=1)
        except (h2ws.WebSocketClosed, asyncio.TimeoutError) as e:
            seen.outcome = seen.outcome or f"failed ({type(e).__name__})"
        return seen


async def h1_event(ws: WSConnection, reader: asyncio.StreamReader, *kinds):
    """The next wsproto event of one of `kinds`, reading from `reader` as needed."""
    while True:
        for event in ws.events():
            if isinstance(event, kinds):
                return event
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed by the proxy")
        ws.receive_data(data)


async def h1_client(port: int, path: str, speaker: str, accept_encoding: str | None, give_up: float,
                    gate: asyncio.Semaphore) -> Seen:
    """An HTTP/1.1 upgrade over TLS, with wsproto on an asyncio stream."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    ws = WSConnection(ConnectionType.CLIENT)
    headers = [(b"accept-encoding", accept_encoding.encode())] if accept_encoding else []

    def next_event(*kinds):
        return h1_event(ws, reader, *kinds)

    try:
        writer.write(ws.send(Request(host="localhost", target=path, extra_headers=headers)))
        sent = time.monotonic()
        try:
            answer = await asyncio.wait_for(next_event(AcceptConnection, RejectConnection), give_up)
        except asyncio.TimeoutError:
            return Seen("gave up")
        status_s = time.monotonic() - sent
        if isinstance(answer, RejectConnection):
            return Seen(f"refused {answer.status_code}", answer.status_code, status_s)
        fields = {k.decode().lower(): v.decode() for k, v in answer.extra_headers}
        seen = Seen("", 101, status_s, fields.get("content-encoding"))
        if speaker == "client":
            writer.write(ws.send(TextMessage(HELLO)))
        try:
            message = await asyncio.wait_for(next_event(Message), give_up)
            seen.outcome = _judge(message.data, speaker)
            writer.write(ws.send(CloseConnection(1000)))
        except (asyncio.TimeoutError, ConnectionError) as e:
            seen.outcome = f"failed ({type(e).__name__})"
        return seen
    finally:
        writer.close()


CLIENTS = {"h1": h1_client, "h2": h2_client, "h3": h3_client}


# -- event streams --------------------------------------------------------------------------------

Note = Callable[..., None]  # note(kind, value=None): what a transport hands the reader, as it happens


@dataclass
class EventStreamSeen:
    """What one event-stream request saw. Times are seconds from when the request went out
    (`sent_at`, on time.monotonic()'s clock); `None` where it never happened.

    `outcome`: "ended" (the server ended the response), "enough" (the events asked for were
    read, then the client closed), "gave up" (the time was up first) or "failed (...)" (the
    connection or the stream broke, or the body could not be decoded).
    """

    transport: str  # "h1", "h2" or "h3"
    outcome: str = ""
    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)  # the response's, names in lowercase
    sent_at: float | None = None
    head_s: float | None = None  # when the head (status and headers) arrived
    ended_s: float | None = None  # when the server ended the response
    events: list[ServerEvent] = field(default_factory=list)  # decoded, each with its `at_s`
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (when, bytes) of each body chunk as it came
    decoded: list[tuple[float, int]] = field(default_factory=list)  # (when, bytes) decoded out of each chunk

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    @property
    def content_type(self) -> str | None:
        return self.header("content-type")

    @property
    def content_encoding(self) -> str | None:
        return self.header("content-encoding")

    @property
    def first_event_s(self) -> float | None:
        """When the first event could be decoded: its bytes out of the decompressor, its blank line in."""
        return self.events[0].at_s if self.events else None

    @property
    def first_event_bytes(self) -> int | None:
        """How many decoded bytes were readable when the first event was: what an encoder let go at once."""
        if self.first_event_s is None:
            return None
        return sum(size for when, size in self.decoded if when <= self.first_event_s)


async def read_event_stream(transport: str, port: int, path: str = "/events", *, host: str = "127.0.0.1",
                            authority: str = "localhost", accept_encoding: str | None = None,
                            headers: Sequence[tuple[str, str]] = (), count: int | None = None,
                            give_up: float = 5.0, connect_within: float | None = None) -> EventStreamSeen:
    """GET `path` as `EventSource` does, over TLS to `host`:`port` (certificates not verified),
    and read it as an event stream until it ends, `count` events are decoded, or `give_up`
    seconds from the request going out are up; then close and say what was seen. Connecting
    and sending get `connect_within` seconds of their own (by default `give_up` again): a busy
    proxy's TLS handshake is not what is timed.

    `transport`: "h1" (HTTP/1.1, ALPN http/1.1), "h2" (HTTP/2, ALPN h2) or "h3" (HTTP/3 over
    QUIC on UDP `port`; `host` must be an IP address). The request carries `accept: text/event-stream`
    and `cache-control: no-cache`, as EventSource's does, `accept-encoding: ACCEPT_ENCODING` only
    when given, then `headers`; `authority` is its Host / :authority and the TLS server name.
    A body in content-encoding gzip, br or zstd is decoded as it arrives (zlib, brotli,
    zstandard), and the events of a text/event-stream response are parsed as their blank
    lines arrive: `first_event_s` is when the first one became readable.

        seen = await read_event_stream("h2", 8443, "/events?after=1&n=3", accept_encoding="gzip")
        seen.status, seen.head_s, seen.content_encoding, seen.first_event_s, [e.data for e in seen.events]
    """
    seen = EventStreamSeen(transport)
    feed: asyncio.Queue[tuple[str, object, float]] = asyncio.Queue()

    def note(kind: str, value: object = None) -> None:
        feed.put_nowait((kind, value, time.monotonic()))

    fields = [("accept", "text/event-stream"), ("cache-control", "no-cache"),
              *([("accept-encoding", accept_encoding)] if accept_encoding else []), *headers]
    opener = EVENT_STREAM_TRANSPORTS[transport](host, port, authority, path, fields, note)
    task = asyncio.ensure_future(_reporting_failures(opener, note))
    reading = _Reading(seen, count)
    try:
        connecting = give_up if connect_within is None else connect_within
        if not await asyncio.wait_for(_read(feed, reading, until_sent=True), connecting):
            await asyncio.wait_for(_read(feed, reading), give_up)
    except asyncio.TimeoutError:
        seen.outcome = "gave up"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return seen


async def _reporting_failures(opener, note: Note) -> None:
    try:
        await opener
    except Exception as e:  # the reader says it: failed (...)
        note("failed", f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    else:
        note("failed", "the connection closed before the response ended")


async def _read(feed: asyncio.Queue, reading: _Reading, until_sent: bool = False) -> bool:
    """Hand `reading` what the transport notes until the client is done (True), or, `until_sent`,
    until the request has gone out (False)."""
    while True:
        kind, value, at = await feed.get()
        if reading.noted(kind, value, at):
            return True
        if until_sent and kind == "sent":
            return False


class _Reading:
    """`seen`, filled in from what the transport notes; `noted` says when the client is done."""

    def __init__(self, seen: EventStreamSeen, wanted: int | None) -> None:
        self.seen = seen
        self.wanted = wanted
        self.decoder: Decoder | None = None
        self.parser: EventParser | None = None

    def noted(self, kind: str, value, at: float) -> bool:
        seen = self.seen
        if kind == "sent":
            seen.sent_at = at
            return False
        since = at - (seen.sent_at if seen.sent_at is not None else at)  # a failure may come first
        if kind == "head":
            return self._head(*value, since)
        if kind == "data":
            return self._data(value, since)
        if kind == "end":
            seen.ended_s, seen.outcome = since, "ended"
        else:
            seen.outcome = f"failed ({value})"
        return True

    def _head(self, status: int, headers: list[tuple[str, str]], since: float) -> bool:
        seen = self.seen
        seen.status, seen.headers, seen.head_s = status, headers, since
        coding = (seen.content_encoding or "identity").strip().lower()
        try:
            self.decoder = Decoder(coding) if coding != "identity" else None
        except ValueError:
            seen.outcome = f"failed (cannot decode content-encoding {seen.content_encoding})"
            return True
        self.parser = EventParser() if is_event_stream(seen.content_type) else None
        return False

    def _data(self, data: bytes, since: float) -> bool:
        seen = self.seen
        seen.chunks.append((since, len(data)))
        try:
            text = self.decoder.decode(data) if self.decoder else data
        except Exception as e:  # zlib.error, brotli.error, zstd's: whatever the codec raises
            seen.outcome = f"failed (undecodable {seen.content_encoding}: {e})"
            return True
        seen.decoded.append((since, len(text)))
        for event in self.parser.feed(text) if self.parser else []:
            event.at_s = since
            seen.events.append(event)
        if self.wanted is not None and len(seen.events) >= self.wanted:
            seen.outcome = "enough"
            return True
        return False


def _pseudo(authority: str, path: str) -> list[tuple[str, str]]:
    return [(":method", "GET"), (":scheme", "https"), (":authority", authority), (":path", path)]


async def _tls(host: str, port: int, authority: str, alpn: str):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # no CA store to load: nothing is verified
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols([alpn])
    reader, writer = await asyncio.open_connection(host, port, ssl=context, server_hostname=authority.split(":")[0])
    chosen = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    if chosen != alpn:
        writer.close()
        raise ConnectionError(f"the server did not negotiate {alpn} (ALPN: {chosen})")
    return reader, writer


async def _h1_events(host: str, port: int, authority: str, path: str, fields, note: Note) -> None:
    """HTTP/1.1 with h11, which undoes the chunked framing."""
    reader, writer = await _tls(host, port, authority, "http/1.1")
    conn = h11.Connection(h11.CLIENT)
    try:
        writer.write(conn.send(h11.Request(method="GET", target=path, headers=[("host", authority), *fields]))
                     + conn.send(h11.EndOfMessage()))
        note("sent")
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                note("head", (event.status_code, [(k.decode(), v.decode("latin-1")) for k, v in event.headers]))
            elif isinstance(event, h11.Data):
                note("data", bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                note("end")
                return
            elif isinstance(event, h11.ConnectionClosed):
                return
    finally:
        writer.close()


async def _h2_events(host: str, port: int, authority: str, path: str, fields, note: Note) -> None:
    """HTTP/2 with h2, one stream on a connection of its own."""
    reader, writer = await _tls(host, port, authority, "h2")
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    try:
        conn.initiate_connection()
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in _pseudo(authority, path) + fields],
                          end_stream=True)
        writer.write(conn.data_to_send())
        note("sent")
        while data := await reader.read(65536):
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if getattr(event, "stream_id", stream_id) == stream_id and _h2_noted(event, note):
                    return
            writer.write(conn.data_to_send())
    finally:
        with contextlib.suppress(h2.exceptions.ProtocolError):  # a connection already over
            conn.close_connection()
            writer.write(conn.data_to_send())
        writer.close()


def _h2_noted(event: h2.events.Event, note: Note) -> bool:
    """Note what an h2 event says of the stream; True once the stream is over."""
    if isinstance(event, h2.events.ResponseReceived):
        fields = [(k.decode(), v.decode("latin-1")) for k, v in event.headers]
        note("head", (int(dict(fields)[":status"]), [(k, v) for k, v in fields if not k.startswith(":")]))
    elif isinstance(event, h2.events.DataReceived) and event.data:
        note("data", event.data)
    if isinstance(event, h2.events.StreamEnded):
        note("end")
    elif isinstance(event, h2.events.StreamReset):
        note("failed", f"stream reset with error code {int(event.error_code)}")
    elif isinstance(event, h2.events.ConnectionTerminated):
        note("failed", f"GOAWAY with error code {int(event.error_code)}")
    else:
        return False
    return True


async def _h3_events(host: str, port: int, authority: str, path: str, fields, note: Note) -> None:
    """HTTP/3 with aioquic, through the peers' H3Peer (wspeers.h3ws)."""
    configuration = QuicConfiguration(is_client=True, alpn_protocols=h3ws.ALPN,
                                      server_name=authority.split(":")[0], verify_mode=ssl.CERT_NONE)
    stream_id = 0  # a client's first bidirectional stream

    def on_event(event) -> None:
        if isinstance(event, HeadersReceived) and event.stream_id == stream_id:
            fields = [(k.decode(), v.decode("latin-1")) for k, v in event.headers]
            note("head", (int(dict(fields)[":status"]), [(k, v) for k, v in fields if not k.startswith(":")]))
        elif isinstance(event, DataReceived) and event.stream_id == stream_id and event.data:
            note("data", event.data)
        elif isinstance(event, h3ws.StreamAborted) and event.stream_id == stream_id and event.frame == "reset":
            note("failed", f"stream reset with {h3ws.error_name(event.code)}")
        elif isinstance(event, h3ws.ConnectionClosed):
            note("failed", f"connection closed: {event}")
        if getattr(event, "stream_ended", False) and event.stream_id == stream_id:
            note("end")

    transport, peer = await h3ws.client_endpoint(
        lambda: h3ws.H3Peer(h3ws.HeldWindowQuic(configuration=configuration), on_event), (host, port))
    try:
        peer.connect((host, port))
        await peer.wait_connected()
        assert peer.quic.get_next_available_stream_id() == stream_id
        peer.send_headers(stream_id, [(k.encode(), v.encode()) for k, v in _pseudo(authority, path) + fields],
                          end_stream=True)
        note("sent")
        await peer.wait_closed()
    finally:
        if peer.closed is None:
            peer.close_connection()
            try:
                await asyncio.wait_for(peer.wait_closed(), 1)
            except asyncio.TimeoutError:
                pass  # QUIC's closing period outlasted it: the socket closes all the same
        transport.close()


EVENT_STREAM_TRANSPORTS = {"h1": _h1_events, "h2": _h2_events, "h3": _h3_events}
