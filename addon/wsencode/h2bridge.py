"""The one place ws-encode reaches into mitmproxy's internals: HTTP/2 WebSockets (RFC 8441).

Stock mitmproxy cannot carry a WebSocket over HTTP/2 (mitmproxy issue #4607):
its HTTP/2 server never advertises SETTINGS_ENABLE_CONNECT_PROTOCOL and
rejects `:protocol`. This module translates at the HTTP/2 codec boundary, so
mitmproxy's own HTTP stream and WebSocket layers run unchanged:

- client side (`WsHttp2Server`): an extended CONNECT with `:protocol:
  websocket` is handed to the stream as an HTTP/1.1-style `GET` upgrade (fresh
  `Sec-WebSocket-Key`), ended at the headers; the stream's `101` goes out as
  `:status 200` with the stream left open; resets and closes after the
  upgrade reach the WebSocket layer as the peer closing, and an orderly close
  ends the stream with END_STREAM. DATA the client sends before the status
  goes straight to an HTTP/2 upstream that has the CONNECT (whole frames
  only), and is otherwise kept and handed to the WebSocket layer after the
  status (the client side's phases and their one table: `ClientPhase`,
  `CLIENT_TRANSITIONS`).
- upstream over HTTP/2 (`WsHttp2Client`): a WebSocket upgrade waits for the
  server's first SETTINGS (RFC 8441 section 3) and goes out as an extended
  CONNECT if the server advertises 0x8; its 2xx comes back to the stream as a
  `101` with the matching accept hash.
- upstream over HTTP/1.1: mitmproxy's own HTTP/1 client sends the `GET`
  upgrade as it is; nothing to do here.
- an HTTP/2 upstream that does not advertise 0x8, or resets the CONNECT with
  HTTP_1_1_REQUIRED: the stream (`WsHttpStream`) opens a separate HTTP/1.1
  connection for that WebSocket, as browsers do (its route upstream and its
  one table: `Route`, `ROUTE_TRANSITIONS`). `WsHttpStream` also notes where a
  handshake waits and when it really goes upstream (`StreamFacts.stage`,
  `forwarded_at`), and once the addon shows a flow as it was on the wire
  (CONNECT, 200: `wireform`), gives mitmproxy's code the GET and 101 back
  while it runs (`translated_while_running`).
- many WebSockets on one HTTP/2 connection: their upstream connections go
  past mitmproxy's per-server throttle (`_Throttle`); a finished WebSocket's
  stream, and its closed HTTP/1.1 upstream connection, are dropped; and a
  peer that does not read gets that stream reset once MAX_BUFFERED_BYTES wait
  for its window (`Backlog`), since mitmproxy's HTTP/2 codec buffers without
  bound and never holds the other side back.

It is installed by replacing the class names that mitmproxy's HTTP layer
looks up when it creates a connection or a stream, and uninstalled by putting
the originals back; connections already open keep the classes they started
with (the throttle is set on a client connection's handler, found through the
proxyserver addon, when its first WebSocket asks for a connection). What it
uses of mitmproxy is probed first (`incompatibility`: names, parameters, and
that mitmproxy looks the replaced names up where they are replaced), not the
version number; tested on mitmproxy 11.0, 11.1 and 12.3. The addon imports
this module only through `bridge.Bridge`, which says in one line why it
cannot be used and leaves mitmproxy stock.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import enum
import inspect
import logging
import re
import time
import types
from dataclasses import dataclass, field

import h2.errors
import h2.events
import h2.exceptions
import h2.utilities
from mitmproxy import connection, ctx, flow, http
from mitmproxy.net.http import url
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import websocket
from mitmproxy.proxy.layers.http import _http1, _http2
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection
from mitmproxy.proxy.mode_specs import ReverseMode
from mitmproxy.websocket import WebSocketData

from .extconnect import (
    PROTOCOL, WEBSOCKET, ClientSideStream, ClientStep, Route, RouteStep, ROUTE_TRANSITIONS, UpstreamPhase,
    UpstreamStream, answer_problem, new_key, protocol_of, stream_fields, success_fields, switching_fields,
    upgrade_fields, upgrade_key,
)
from .frames import whole_messages_length
from .handshake import classify
from .report import printable
from .streamfacts import (
    CLIENT, CONNECTING, QUEUED, SETTINGS, UPSTREAM, StreamFacts, facts_for, facts_of, not_a_handshake,
    note_not_a_handshake,
)

logger = logging.getLogger("ws_encode")

NEEDS_HTTP1 = "ws_encode: the HTTP/2 upstream cannot take this WebSocket (no RFC 8441), retrying over HTTP/1.1"
# mitmproxy 12 marks an upgraded stream's close by its WebSocket layer with a
# code; 11 has no codes, and only its message ("EOF") tells that close apart.
_PASSTHROUGH_CLOSE = getattr(getattr(http_layers, "ErrorCode", None), "PASSTHROUGH_CLOSE", None)
# Client DATA kept while a status is awaited; beyond this the stream is reset.
MAX_EARLY_BYTES = 1 << 20
# Bytes of one WebSocket stream that may wait in mitmproxy's send buffer for
# the peer's HTTP/2 flow-control window; beyond this that stream alone is
# reset. mitmproxy grants every peer the largest window and acknowledges DATA
# as it arrives, so toward a peer that does not read nothing else stops the
# other side (HTTP/1.1 has TCP's backpressure instead). Larger than the stream
# windows browsers grant (Chromium: 6 MiB), so a peer that reads only meets
# it with a burst this big in flight.
MAX_BUFFERED_BYTES = 16 << 20
# The status the proxy answers a WebSocket with when the upstream's answer
# does not open it (a wrong accept, a 2xx that ignored the upgrade).
BAD_UPSTREAM_ANSWER = 502

def response_error(sid: int, message: str) -> http_layers.ResponseProtocolError:
    # mitmproxy 12 wants an ErrorCode, 11 an int status; both keep a class default.
    return http_layers.ResponseProtocolError(sid, message, http_layers.ResponseProtocolError.code)


def request_error(sid: int, message: str) -> http_layers.RequestProtocolError:
    return http_layers.RequestProtocolError(sid, message, http_layers.RequestProtocolError.code)


@dataclass
class NeedsHttp1(http_layers.ResponseProtocolError):
    """The upstream codec to the stream: this WebSocket must go over HTTP/1.1
    (the upstream has no RFC 8441, or reset the CONNECT with HTTP_1_1_REQUIRED).
    A type of its own, so the stream never has to read a message to know."""

    @classmethod
    def on(cls, sid: int) -> NeedsHttp1:
        return cls(sid, NEEDS_HTTP1, http_layers.ResponseProtocolError.code)


def is_passthrough_close(event: http_layers.HttpEvent) -> bool:
    """Whether mitmproxy's HttpStream is closing one side of an upgraded
    stream (its WebSocket layer closed that peer's connection)."""
    if _PASSTHROUGH_CLOSE is not None:
        return getattr(event, "code", None) is _PASSTHROUGH_CLOSE
    return getattr(event, "message", None) == "EOF"


def opens_websocket(request: http.Request) -> bool:
    """A well-formed WebSocket handshake (an upgrade or an extended CONNECT),
    as the addon classifies it."""
    if not_a_handshake(request):
        return False
    facts = facts_of(request)
    handshake = facts.handshake if facts is not None and facts.handshake is not None else classify(request)
    return handshake is not None and not handshake.malformed


def is_extended_connect(request: http.Request) -> bool:
    return protocol_of(request.data.method, request.headers.fields) is not None


def passthrough_close(cls: type[http_layers.HttpEvent], sid: int) -> http_layers.HttpEvent:
    """What mitmproxy's stream sends a codec when its WebSocket layer closes
    that side (12 marks it with a code, 11 only says "EOF")."""
    return cls(sid, "EOF", _PASSTHROUGH_CLOSE) if _PASSTHROUGH_CLOSE is not None else cls(sid, "EOF")


# DOTALL: a quoted value may hold the very line feed h2 complains about.
_QUOTED = re.compile(r"""b?(['"])((?:\\.|(?!\1).)*)\1""", re.DOTALL)
PSEUDO_HEADERS = frozenset({":method", ":scheme", ":path", ":authority", ":protocol", ":status"})


def without_values(text: str) -> str:
    """h2's messages quote header values, which may be secrets: every quoted
    string but a pseudo-header's name becomes <value>, and any control
    character left (an unpaired quote) is escaped, so no log line is split."""
    return printable(_QUOTED.sub(lambda m: m.group(0) if m.group(2) in PSEUDO_HEADERS else "<value>", text))


def malformed(headers: list[tuple[bytes, bytes]], trailers: bool) -> str | None:
    """What h2's own validation finds wrong with request headers, or None."""
    flags = h2.utilities.HeaderValidationFlags(
        is_client=False, is_trailer=trailers, is_response_header=False, is_push_promise=False
    )
    try:
        for _ in h2.utilities.validate_headers(headers, flags):
            pass
    except h2.exceptions.ProtocolError as e:
        return without_values(str(e))
    return None


def _protocol(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """A received header block's `:protocol` (pseudo-headers come first)."""
    for name, value in headers:
        if name == PROTOCOL:
            return value
        if not name.startswith(b":"):
            return None
    return None


class _CountedDeque(collections.deque):
    """One stream's send buffer in mitmproxy's BufferedH2Connection, which
    also counts its bytes (BufferedH2Connection only appends, appendlefts and
    poplefts chunks)."""

    size = 0

    def append(self, chunk) -> None:
        super().append(chunk)
        self.size += len(chunk.data)

    def appendleft(self, chunk) -> None:
        super().appendleft(chunk)
        self.size += len(chunk.data)

    def popleft(self):
        chunk = super().popleft()
        self.size -= len(chunk.data)
        return chunk


class Backlog:
    """What both codecs need to give up on a peer that does not read: the
    bytes each stream has waiting for the peer's window, and events handed to
    a stream on the next turn of the event loop instead of now."""

    def __init__(self, h2_conn: BufferedH2Connection) -> None:
        h2_conn.stream_buffers = collections.defaultdict(_CountedDeque)
        self.buffers = h2_conn.stream_buffers
        self.later: dict[commands.RequestWakeup, http_layers.HttpEvent] = {}

    def over_cap(self, sid: int) -> bool:
        buffered = self.buffers.get(sid)
        return buffered is not None and buffered.size > MAX_BUFFERED_BYTES

    def defer(self, event: http_layers.HttpEvent) -> commands.RequestWakeup:
        """A stream that is sending data must not be handed an event while it
        does (mitmproxy's WebSocket layer is not re-entrant)."""
        wakeup = commands.RequestWakeup(0)
        self.later[wakeup] = event
        return wakeup

    def due(self, event: events.Event) -> http_layers.HttpEvent | None:
        return self.later.pop(event.command, None) if isinstance(event, events.Wakeup) else None

    def due_now(self) -> layer.CommandGenerator[None]:
        """Every deferred event, handed over now: the connection is closing,
        and a closed codec takes no Wakeup."""
        later, self.later = self.later, {}
        for event in later.values():
            yield http_layers.ReceiveHttp(event)


def not_reading(peer: str) -> str:
    return f"the {peer} does not read: more than {MAX_BUFFERED_BYTES} bytes waited for its flow-control window"


class WsHttp2Server(_http2.Http2Server):
    """mitmproxy's client-facing HTTP/2 codec, plus RFC 8441 WebSockets."""

    def __init__(self, context):
        super().__init__(context)
        self.h2_conn.local_settings.enable_connect_protocol = 1
        # Applied at once and sent with the preface (h2 sends acknowledged values).
        self.h2_conn.local_settings.acknowledge()
        self.websockets: dict[int, ClientSideStream] = {}
        # h2 makes a malformed request a connection error, which would take
        # every other stream down with it; RFC 9113 section 8.1.1 makes it a
        # stream error. So this connection validates request headers itself.
        self.validate_requests = self.h2_conn.config.validate_inbound_headers
        self.h2_conn.config = copy.copy(self.h2_conn.config)
        self.h2_conn.config.validate_inbound_headers = False
        self.backlog = Backlog(self.h2_conn)

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if self.validate_requests and isinstance(event, (h2.events.RequestReceived, h2.events.TrailersReceived)):
            problem = malformed(event.headers, trailers=isinstance(event, h2.events.TrailersReceived))
            if problem:
                yield from self._reset(event.stream_id, f"malformed request headers: {problem}")
                return False
        if isinstance(event, h2.events.RequestReceived) and _protocol(event.headers) is not None:
            yield from self._extended_connect(event)
            return False
        ws = self.websockets.get(getattr(event, "stream_id", 0))
        if ws is None:
            return (yield from super().handle_h2_event(event))
        sid = event.stream_id
        if ws.phase.before_status and isinstance(event, h2.events.DataReceived):
            yield from self._early_data(sid, ws, event)
            return False
        if ws.phase.before_status and isinstance(event, h2.events.StreamEnded):
            ws.ended_early = True
            return False
        if isinstance(event, h2.events.TrailersReceived):
            # Only DATA may follow on a CONNECT stream (RFC 9113 section 8.5).
            yield from self._reset(sid, "trailers on a WebSocket stream")
            return False
        if ws.is_open and isinstance(event, h2.events.StreamReset):
            # After the upgrade a reset is the peer going away, which is what
            # the WebSocket layer understands; as an error it would crash it.
            del self.websockets[sid]
            self.streams.pop(sid, None)
            yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(sid))
            return False
        done = yield from super().handle_h2_event(event)
        if self.is_closed(sid):
            self.websockets.pop(sid, None)
        return done

    def _early_data(self, sid: int, ws: ClientSideStream, event: h2.events.DataReceived) -> layer.CommandGenerator[None]:
        ws.facts.client_bytes_before_status += len(event.data)
        self.h2_conn.acknowledge_received_data(event.flow_controlled_length, sid)
        ws.early += event.data
        if ws.relay:
            # An HTTP/2 upstream has the CONNECT: pass whole messages on, or
            # a server that waits for them would never answer.
            upstream, upstream_sid = ws.relay
            whole = whole_messages_length(ws.early)
            if whole:
                data = bytes(ws.early[:whole])
                del ws.early[:whole]
                ws.relayed += data
                yield http_layers.SendHttp(http_layers.RequestData(upstream_sid, data), upstream)
        if len(ws.early) + len(ws.relayed) > MAX_EARLY_BYTES:
            yield from self._reset(sid, f"more than {MAX_EARLY_BYTES} bytes of data before the status")

    def _extended_connect(self, event: h2.events.RequestReceived) -> layer.CommandGenerator[None]:
        sid = event.stream_id
        headers = [(k, v) for k, v in event.headers if k != b":protocol"]
        try:
            host, port, method, scheme, authority, path, fields = _http2.parse_h2_request_headers(headers)
        except ValueError as e:
            yield from self._refuse(sid, 400, f"malformed extended CONNECT: {without_values(str(e))}")
            return
        if method != b"CONNECT":
            yield from self._refuse(sid, 400, ":protocol on a request that is not a CONNECT")
        elif (_protocol(event.headers) or b"").lower() != b"websocket":
            yield from self._refuse(sid, 501, "extended CONNECT for a protocol other than websocket")
        elif not self.context.options.websocket:
            yield from self._refuse(sid, 501, "WebSockets are turned off (the websocket option)")
        elif fields.get("sec-websocket-version", "").strip() != "13":
            yield from self._refuse(sid, 400, "extended CONNECT without sec-websocket-version: 13")
        elif not authority:
            yield from self._refuse(sid, 400, "extended CONNECT without :authority")
        else:
            # The flow keeps what the client sent: CONNECT, with :protocol as its first header field.
            fields.insert(0, PROTOCOL.decode(), WEBSOCKET.decode())
            request = http.Request(
                host=host, port=port, method=b"CONNECT", scheme=scheme, authority=authority,
                path=path, http_version=b"HTTP/2.0", headers=fields, content=None,
                trailers=None, timestamp_start=time.time(), timestamp_end=None,
            )
            ws = ClientSideStream(facts_for(request))
            ws.facts.waiting_client = ws
            self.websockets[sid] = ws
            self.streams[sid] = _http2.StreamState.HEADERS_RECEIVED
            # The request is whole at its headers: what the client sends on the
            # stream is the WebSocket's, kept here until its status.
            yield http_layers.ReceiveHttp(http_layers.RequestHeaders(sid, request, end_stream=True))
            yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(sid))

    def _reset(
        self, sid: int, reason: str, code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR, *, later: bool = False
    ) -> layer.CommandGenerator[None]:
        yield commands.Log(f"ws_encode: reset HTTP/2 stream {sid}: {reason}", logging.WARNING)
        self.h2_conn.reset_stream(sid, code)
        ws = self.websockets.pop(sid, None)
        if ws is not None:
            ws.facts.ended_by_proxy = reason
        if self.streams.pop(sid, None) is not None:
            # The WebSocket layer understands only the peer going away.
            end = http_layers.RequestEndOfMessage(sid) if ws is not None and ws.is_open else request_error(sid, reason)
            yield self.backlog.defer(end) if later else http_layers.ReceiveHttp(end)
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def _refuse(self, sid: int, status: int, reason: str) -> layer.CommandGenerator[None]:
        yield commands.Log(f"ws_encode: refused HTTP/2 stream {sid}: {reason}", logging.WARNING)
        self.h2_conn.send_headers(sid, [(b":status", b"%d" % status)], end_stream=True)
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if (due := self.backlog.due(event)) is not None:
            yield http_layers.ReceiveHttp(due)
            return
        ws = self.websockets.get(event.stream_id) if isinstance(event, http_layers.HttpEvent) else None
        if ws is None:
            if isinstance(event, http_layers.ResponseHeaders) and event.response.status_code == 101:
                # HTTP/2 has no 101; stock mitmproxy crashes trying to send one.
                event = response_error(event.stream_id, "upstream switched protocols on a request that did not ask for a WebSocket")
            yield from super()._handle_event(event)
        elif ws.phase.before_status:
            if isinstance(event, http_layers.ResponseHeaders) and 200 <= event.response.status_code < 300:
                yield from self._send_success(event)
            else:
                # A refusal or an error: an ordinary response from here on.
                del self.websockets[event.stream_id]
                yield from super()._handle_event(event)
        elif isinstance(event, http_layers.ResponseEndOfMessage):
            # The stream ends the 2xx "message" once the WebSocket layer is set
            # up; on HTTP/2 that would close the stream. Instead, hand over
            # what the client sent before the status.
            if ws.early:
                data, ws.early = bytes(ws.early), bytearray()
                yield http_layers.ReceiveHttp(http_layers.RequestData(event.stream_id, data))
            if ws.ended_early:
                ws.ended_early = False
                yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(event.stream_id))
        elif isinstance(event, http_layers.ResponseProtocolError) and is_passthrough_close(event):
            # The WebSocket layer closed the client side: an orderly end of stream.
            if self.is_open_for_us(event.stream_id):
                self.h2_conn.end_stream(event.stream_id)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
            _forget_if_closed(self, event.stream_id)
        else:
            yield from super()._handle_event(event)
            if isinstance(event, http_layers.ResponseData) and self.backlog.over_cap(event.stream_id):
                yield from self._reset(event.stream_id, not_reading("client"), h2.errors.ErrorCodes.CANCEL, later=True)

    def _send_success(self, event: http_layers.ResponseHeaders) -> layer.CommandGenerator[None]:
        ws = self.websockets[event.stream_id]
        ws.step(ClientStep.STATUS_SENT)  # from now on the WebSocket layer carries the client's data
        if self.is_open_for_us(event.stream_id):
            status = b"%d" % event.response.status_code
            headers = [(b":status", status), *stream_fields(event.response.headers.fields)]
            self.h2_conn.send_headers(event.stream_id, headers, end_stream=False)
            yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def close_connection(self, msg: str) -> layer.CommandGenerator[None]:
        yield from self.backlog.due_now()
        yield from _close_open_websockets(self, http_layers.RequestEndOfMessage)
        yield from super().close_connection(msg)


def _forget_if_closed(codec, sid: int) -> None:
    """After the proxy's end of a WebSocket stream: if the peer had ended its
    side first, no h2 event will come for that stream any more, so what the
    codec keeps of it goes now (else at the peer's END_STREAM)."""
    if codec.is_closed(sid):
        codec.websockets.pop(sid, None)
        codec.streams.pop(sid, None)


def _close_open_websockets(codec, end_of_message) -> layer.CommandGenerator[None]:
    """A connection going away ends its open WebSockets as their peer closing."""
    for sid, ws in list(codec.websockets.items()):
        if ws.is_open and codec.streams.pop(sid, None) is not None:
            yield http_layers.ReceiveHttp(end_of_message(sid))
    codec.websockets.clear()


def extended_connect_headers(request: http.Request) -> list[tuple[bytes, bytes]]:
    """The header block of the extended CONNECT that asks an HTTP/2 or
    HTTP/3 upstream for the WebSocket `request` opens (an extended CONNECT
    itself, or an HTTP/1.1 client's upgrade)."""
    authority = request.authority or request.host_header or f"{request.host}:{request.port}"
    return [
        (b":method", b"CONNECT"),
        (PROTOCOL, protocol_of(request.data.method, request.headers.fields) or WEBSOCKET),
        (b":scheme", request.scheme.encode() or b"https"),
        (b":path", request.data.path),
        (b":authority", authority.encode("utf-8", "surrogateescape")),  # (as mitmproxy decoded the Host header)
        *stream_fields(request.headers.fields),
    ]


class BatchRecordingH2Connection(BufferedH2Connection):
    """Remembers the events of the last read, so a status can be seen to
    arrive together with data (mitmproxy runs the flow's hooks before the
    rest of a read is processed)."""

    last_batch: list[h2.events.Event] | tuple[()] = ()  # (immutable until the first read)

    def receive_data(self, data: bytes) -> list[h2.events.Event]:
        self.last_batch = super().receive_data(data)
        return self.last_batch


class WsHttp2Client(_http2.Http2Client):
    """mitmproxy's upstream HTTP/2 codec, plus RFC 8441 WebSockets."""

    def __init__(self, context):
        super().__init__(context)
        # The same connection state the stock client made, in a class that
        # records each read's events.
        self.h2_conn.__class__ = BatchRecordingH2Connection
        self.settings_received = False
        self.held: list[http_layers.HttpEvent] = []  # WebSocket events before the first SETTINGS
        self.closed = False
        self.websockets: dict[int, UpstreamStream] = {}  # by our stream id
        self.refused: set[int] = set()  # their stream ids sent back for HTTP/1.1
        self.backlog = Backlog(self.h2_conn)

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.HttpEvent):
            if event.stream_id in self.refused:
                return  # the rest of a request that went elsewhere
            if self._must_hold(event):
                # Stream ids are only taken when headers are really sent, so a held
                # CONNECT does not make later requests' ids go backwards.
                if isinstance(event, http_layers.RequestHeaders):
                    facts_for(event.request).waiting(SETTINGS)
                self.held.append(event)
                return
            if self._cannot_take(event):
                self.refused.add(event.stream_id)
                yield http_layers.ReceiveHttp(NeedsHttp1.on(event.stream_id))
                return
        theirs = getattr(event, "stream_id", None)  # mitmproxy renames it when it sends
        yield from super()._handle_event(event)
        if isinstance(event, http_layers.RequestHeaders) and any(e is event for e in self.stream_queue.get(theirs, ())):
            # Queued behind the server's MAX_CONCURRENT_STREAMS; _send_connect
            # says when it really goes.
            facts = facts_of(event.request)
            if facts is not None:
                facts.waiting(QUEUED)
        if self.held and (self.settings_received or self.closed):
            held, self.held = self.held, []
            for e in held:
                if not self.closed:
                    yield from self._handle_event(e)
                elif isinstance(e, http_layers.RequestHeaders):
                    yield http_layers.ReceiveHttp(response_error(e.stream_id, "server closed connection before its SETTINGS"))

    def _must_hold(self, event: http_layers.HttpEvent) -> bool:
        if any(e.stream_id == event.stream_id for e in self.held):
            return True
        return (
            isinstance(event, http_layers.RequestHeaders)
            and not self.settings_received
            and not self.closed
            and opens_websocket(event.request)
        )

    def _cannot_take(self, event: http_layers.HttpEvent) -> bool:
        return (
            isinstance(event, http_layers.RequestHeaders)
            and self.settings_received
            and opens_websocket(event.request)
            and not self.h2_conn.remote_settings.enable_connect_protocol
        )

    def _handle_event2(self, event: events.Event) -> layer.CommandGenerator[None]:
        if (due := self.backlog.due(event)) is not None:
            yield http_layers.ReceiveHttp(due)
            return
        if isinstance(event, http_layers.RequestHeaders) and opens_websocket(event.request):
            yield from self._send_connect(event)
            return
        ws = self.websockets.get(event.stream_id) if isinstance(event, http_layers.HttpEvent) else None
        if ws is not None and isinstance(event, http_layers.RequestEndOfMessage):
            return  # the CONNECT stream stays open for the WebSocket
        if ws is not None and isinstance(event, http_layers.RequestProtocolError) and is_passthrough_close(event):
            if self.is_open_for_us(event.stream_id):
                self.h2_conn.end_stream(event.stream_id)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
            _forget_if_closed(self, event.stream_id)
            return
        yield from super()._handle_event2(event)
        if ws is not None and isinstance(event, http_layers.RequestProtocolError):
            # mitmproxy reset the CONNECT for the stream (the client failed
            # it): no h2 event will come for it any more.
            _forget_if_closed(self, event.stream_id)
        if ws is not None and isinstance(event, http_layers.RequestData) and self.backlog.over_cap(event.stream_id):
            yield from self._reset(event.stream_id, ws, not_reading("upstream"), h2.errors.ErrorCodes.CANCEL, later=True)

    def _send_connect(self, event: http_layers.RequestHeaders) -> layer.CommandGenerator[None]:
        sid = event.stream_id
        self.last_activity = time.time()
        self.h2_conn.send_headers(sid, extended_connect_headers(event.request), end_stream=False)
        self.streams[sid] = _http2.StreamState.EXPECTING_HEADERS
        # An HTTP/1.1 client's upgrade gets a 101 that answers its key.
        key = None if is_extended_connect(event.request) else upgrade_key(event.request.headers.fields)
        ws = self.websockets[sid] = UpstreamStream(facts_for(event.request), key)
        # The request is really on its way now (it may have waited for SETTINGS).
        ws.facts.forwarded()
        client_side = ws.facts.waiting_client
        if client_side is not None and client_side.relay_to(self.conn, self.their_stream_id[sid]):
            # What an HTTP/2 client sent before the status goes upstream now,
            # and whatever follows goes straight here (see WsHttp2Server).
            whole = whole_messages_length(client_side.early)
            if whole:
                data = bytes(client_side.early[:whole])
                del client_side.early[:whole]
                client_side.relayed += data
                self.h2_conn.send_data(sid, data)
            ws.relay_from = client_side
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
        ws = self.websockets.get(getattr(event, "stream_id", 0))
        if ws is None:
            return (yield from super().handle_h2_event(event))
        sid = event.stream_id
        if isinstance(event, h2.events.ResponseReceived) and ws.phase is UpstreamPhase.WAITING:
            return (yield from self._status(sid, ws, event))
        if isinstance(event, h2.events.StreamReset):
            yield from self._stream_reset(sid, ws, event)
            return False
        if isinstance(event, h2.events.TrailersReceived):
            # Only DATA may follow on a CONNECT stream (RFC 9113 section 8.5).
            yield from self._reset(sid, ws, "the upstream sent trailers on a WebSocket stream")
            return False
        done = yield from super().handle_h2_event(event)
        if self.is_closed(sid):
            self.websockets.pop(sid, None)
        return done

    def _status(self, sid: int, ws: UpstreamStream, event: h2.events.ResponseReceived) -> layer.CommandGenerator[bool]:
        if ws.relay_from is not None:
            # Whatever the answer, the rest goes through mitmproxy's stream.
            ws.relay_from.step(ClientStep.UPSTREAM_ANSWERED)
        try:
            status, fields = _http2.parse_h2_response_headers(event.headers)
        except ValueError:
            del self.websockets[sid]
            return (yield from super().handle_h2_event(event))  # mitmproxy reports it
        ws.facts.upstream_status = status
        if not 200 <= status < 300:
            # A refusal: an ordinary response, and the CONNECT's end of request.
            del self.websockets[sid]
            if self.is_open_for_us(sid):
                self.h2_conn.end_stream(sid)
            return (yield from super().handle_h2_event(event))
        ws.phase = UpstreamPhase.OPEN
        # The status came in the same read as the first response data:
        # the fingerprint of an encoder that buffers the status.
        ws.facts.status_with_data = any(
            isinstance(e, h2.events.DataReceived) and e.stream_id == sid and e.data
            for e in self.h2_conn.last_batch
        )
        if ws.key is None:
            response = http.Response(
                http_version=b"HTTP/2.0", status_code=status, reason=b"",
                headers=fields, content=None, trailers=None,
                timestamp_start=time.time(), timestamp_end=None,
            )
        else:
            response = http.Response(
                http_version=b"HTTP/2.0", status_code=101, reason=b"Switching Protocols",
                headers=http.Headers(switching_fields(fields.fields, ws.key)), content=None, trailers=None,
                timestamp_start=time.time(), timestamp_end=None,
            )
        self.streams[sid] = _http2.StreamState.HEADERS_RECEIVED
        # The stream takes the WebSocket at the end of this status's message.
        yield http_layers.ReceiveHttp(http_layers.ResponseHeaders(sid, response, end_stream=False))
        yield http_layers.ReceiveHttp(http_layers.ResponseEndOfMessage(sid))
        return False

    def _stream_reset(self, sid: int, ws: UpstreamStream, event: h2.events.StreamReset) -> layer.CommandGenerator[None]:
        if ws.phase is UpstreamPhase.WAITING and event.error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED:
            yield from self._stream_gone(sid, ws, NeedsHttp1.on(sid))
        else:
            yield from self._stream_gone(sid, ws, f"stream reset by server ({_error_name(event.error_code)})")

    def _reset(
        self, sid: int, ws: UpstreamStream, reason: str, code: int = h2.errors.ErrorCodes.PROTOCOL_ERROR, *, later: bool = False
    ) -> layer.CommandGenerator[None]:
        """The bridge itself ends an upstream WebSocket stream."""
        yield commands.Log(f"ws_encode: reset upstream HTTP/2 stream {sid}: {reason}", logging.WARNING)
        ws.facts.ended_by_proxy = reason
        self.h2_conn.reset_stream(sid, code)
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        yield from self._stream_gone(sid, ws, reason, later=later)

    def _stream_gone(
        self, sid: int, ws: UpstreamStream, error: str | NeedsHttp1, *, later: bool = False
    ) -> layer.CommandGenerator[None]:
        """The upstream stream ended abnormally: an open WebSocket sees its
        peer close; a waiting handshake fails with `error` (or moves to
        HTTP/1.1, when that is a NeedsHttp1)."""
        del self.websockets[sid]
        self.streams.pop(sid, None)
        if ws.is_open:
            end = http_layers.ResponseEndOfMessage(sid)
        else:
            if ws.relay_from is not None:
                ws.relay_from.step(ClientStep.UPSTREAM_FAILED)
            end = error if isinstance(error, NeedsHttp1) else response_error(sid, error)
        yield self.backlog.defer(end) if later else http_layers.ReceiveHttp(end)

    def close_connection(self, msg: str) -> layer.CommandGenerator[None]:
        self.closed = True
        for ws in self.websockets.values():
            if ws.phase is UpstreamPhase.WAITING and ws.relay_from is not None:
                ws.relay_from.step(ClientStep.UPSTREAM_FAILED)
        yield from self.backlog.due_now()
        yield from _close_open_websockets(self, http_layers.ResponseEndOfMessage)
        yield from super().close_connection(msg)


class WsHttp1Client(_http1.Http1Client):
    """mitmproxy's upstream HTTP/1.1 codec, which also sends an extended
    CONNECT's WebSocket as the HTTP/1.1 upgrade that asks the same (RFC 6455
    section 4.1) with a key of the proxy's own, and hands the stream the 2xx
    its client expects once the 101 answers that key. An answer that does not
    open the WebSocket yet reads as if it did (a 101 with a wrong accept, a
    2xx that ignored the upgrade) is the proxy's 502, and the connection
    closes; any other refusal reaches the client as it is."""

    ws_key: str | None = None  # the key of the upgrade this codec made for the request in flight
    ws_facts: StreamFacts | None = None  # that request's
    ws_refused = False  # the proxy refused that request's answer: the rest of it goes nowhere

    def send(self, event: http_layers.HttpEvent) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.RequestHeaders):
            self.ws_key = new_key() if is_extended_connect(event.request) else None
            if self.ws_key is not None:
                self.ws_facts = facts_for(event.request)
                self.ws_facts.key_sent = self.ws_key
                event = http_layers.RequestHeaders(event.stream_id, as_upgrade(event.request, self.ws_key), event.end_stream)
        yield from super().send(event)

    def read_headers(self, event: events.ConnectionEvent) -> layer.CommandGenerator[None]:
        if self.ws_key is None:
            return (yield from super().read_headers(event))
        for command in super().read_headers(event):
            if isinstance(command, http_layers.ReceiveHttp) and isinstance(command.event, http_layers.ResponseHeaders):
                yield from self._answer(command.event)
            elif not (self.ws_refused and isinstance(command, http_layers.ReceiveHttp)):
                yield command
        if self.ws_refused:
            self.state = self.done
            yield commands.CloseConnection(self.conn)

    def _answer(self, event: http_layers.ResponseHeaders) -> layer.CommandGenerator[None]:
        response, sid = event.response, event.stream_id
        facts = self.ws_facts
        facts.upstream_status = response.status_code
        problem = answer_problem(response.status_code, response.headers.fields, self.ws_key)
        if problem is not None:
            self.ws_refused = True
            facts.proxy_refused = problem
            yield commands.Log(f"ws_encode: {problem} ({printable(self.request.host)})", logging.WARNING)
            failed = http.Response.make(BAD_UPSTREAM_ANSWER, f"ws_encode: {problem}\n")
            body, failed.content = failed.content, None
            yield http_layers.ReceiveHttp(http_layers.ResponseHeaders(sid, failed, end_stream=False))
            yield http_layers.ReceiveHttp(http_layers.ResponseData(sid, body))
            yield http_layers.ReceiveHttp(http_layers.ResponseEndOfMessage(sid))
        elif response.status_code == 101:
            opened = http.Response(
                http_version=self.request.data.http_version, status_code=200, reason=b"",
                headers=http.Headers(success_fields(response.headers.fields)), content=None, trailers=None,
                timestamp_start=response.timestamp_start, timestamp_end=None,
            )
            yield http_layers.ReceiveHttp(http_layers.ResponseHeaders(sid, opened, event.end_stream))
        else:
            yield http_layers.ReceiveHttp(event)


def as_upgrade(request: http.Request, key: str) -> http.Request:
    """An extended CONNECT as the upgrade mitmproxy's HTTP/1.1 codec sends:
    it keeps the client's HTTP version, so the codec converts it to HTTP/1.1
    as any HTTP/2 or HTTP/3 request (Host from the authority, one Cookie
    line) and uses the connection for it alone."""
    upgrade = request.copy()
    upgrade.data.method = b"GET"
    upgrade.headers = http.Headers(upgrade_fields(request.headers.fields, key))
    return upgrade


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


# -- the stream: when a request goes upstream, and falling back to HTTP/1.1 --


def _stock(cls: type) -> type:
    """The class a (possibly already bridged) mitmproxy class stands in for,
    in case an earlier copy of this module did not get to uninstall."""
    while getattr(cls, "ws_encode_bridge", False):
        cls = cls.__bases__[0]
    return cls


class GetHttp1Connection(http_layers.GetHttpConnection):
    """Ask the HTTP layer for a connection that speaks HTTP/1.1 (new, or
    established and not HTTP/2)."""

    def connection_spec_matches(self, conn: connection.Connection) -> bool:
        return super().connection_spec_matches(conn) and conn.alpn not in (None, b"h2")

    def __hash__(self):
        return id(self)


class WebSocketAddress(tuple):
    """The (host, port) of a connection a WebSocket handshake asked for.

    Equal to the plain tuple, so mitmproxy matches connections as before; the
    type marks the connection as a WebSocket's for `_Throttle` and for
    `WsHttpStream._forget_finished_connections`.
    """

    __slots__ = ()
    # Checked by name, not by class: after a script reload, connections made
    # by the earlier copy of this module carry its classes.
    ws_encode_websocket = True


def is_websocket_address(address) -> bool:
    return getattr(address, "ws_encode_websocket", False)


class Http1OnlyAddress(WebSocketAddress):
    """The address of a WebSocket's fallback connection: it must offer only
    HTTP/1.1, or the upstream would pick HTTP/2 again (`offer_http1_only`).
    The mark travels with the connection, so several WebSockets of one
    client falling back at once need no shared bookkeeping."""

    __slots__ = ()
    ws_encode_http1_only = True


_UNTHROTTLED = contextlib.nullcontext()


class _Throttle(collections.defaultdict):
    """mitmproxy's per-server connection throttle, except for WebSockets.

    mitmproxy's ConnectionHandler.max_conns lets one client connection have
    5 connections at a time to a server, each slot held until its connection
    closes. Behind an HTTP/2 client, an HTTP/1.1 upstream connection carries
    a single request (HttpLayer.register_connection's "tricky multiplexing
    edge case" and Http1Client.mark_done), so the throttle is what bounds
    the fan-out of ordinary requests. A WebSocket keeps its connection for its
    whole life: the sixth would wait for one of the first five to close,
    forever, with no sign of it. A WebSocket's connection goes past the
    throttle; an HTTP/1.1 client opens one connection per WebSocket anyway,
    and the client's SETTINGS_MAX_CONCURRENT_STREAMS bounds the number.
    """

    ws_encode_throttle = True

    def __getitem__(self, address):
        if is_websocket_address(address):
            return _UNTHROTTLED
        return super().__getitem__(address)


def _unthrottle_websockets(client: connection.Client) -> None:
    """Give the client connection's handler the throttle above (once)."""
    # The handler is only reachable through the proxyserver addon; without
    # one (an addon test context) there is no throttle to change.
    master = getattr(ctx, "master", None)
    proxyserver = master.addons.get("proxyserver") if master else None
    handler = proxyserver.connections.get(client.id) if proxyserver else None
    if handler is None or type(handler.max_conns) is _Throttle:
        return
    # mitmproxy's own, or an earlier copy's (a script reload) whose checks
    # still hold that copy's classes.
    if type(handler.max_conns) is collections.defaultdict or getattr(handler.max_conns, "ws_encode_throttle", False):
        handler.max_conns = _Throttle(handler.max_conns.default_factory, handler.max_conns)


class WsHttpStream(_stock(http_layers.HttpStream)):
    """mitmproxy's HTTP stream, which also carries a WebSocket opened by an
    extended CONNECT: a request like any other until its status (RFC 8441
    section 4), not a tunnel to its authority, whose 2xx hands the stream to
    mitmproxy's WebSocket layer as a 101 does for an HTTP/1.1 upgrade. It
    also notes where a handshake is, retries a WebSocket over HTTP/1.1 when
    an HTTP/2 upstream cannot take it, and lets the HTTP layer drop the
    stream when its WebSocket is over."""

    ws_encode_bridge = True
    # (ws_ names: attributes of a subclass of mitmproxy's, kept off its names)
    ws_route = Route.FIRST  # its one table: ROUTE_TRANSITIONS
    ws_facts: StreamFacts | None = None  # a handshake's, once the stream has classified its request

    # -- an extended CONNECT, from its headers to its WebSocket --

    def handle_connect(self) -> layer.CommandGenerator[None]:
        if not is_extended_connect(self.flow.request):
            return (yield from super().handle_connect())
        # What mitmproxy's state_wait_for_request_headers does for any other
        # request after its CONNECT branch: the destination in transparent
        # and reverse modes, the Host of reverse mode, the requestheaders hook.
        request = self.flow.request
        if self.mode is http_layers.HTTPMode.transparent:
            request.data.host, request.data.port = self.context.server.address
            request.scheme = "https" if self.context.server.tls else "http"
        if isinstance(self.context.client.proxy_mode, ReverseMode) and not self.context.options.keep_host_header:
            request.host_header = url.hostport(
                "https" if self.context.server.tls else "http", *self.context.server.address
            )
        yield http_layers.HttpRequestHeadersHook(self.flow)
        if (yield from self.check_killed(True)):
            return
        # Its request ends at its headers (the codec keeps what follows for
        # after the status): the request hook, then upstream.
        self.client_state = self.state_consume_request_body
        self.server_state = self.state_wait_for_response_headers

    def check_invalid(self, request: bool) -> layer.CommandGenerator[bool]:
        if not (request and is_extended_connect(self.flow.request)):
            return (yield from super().check_invalid(request))
        # mitmproxy refuses a CONNECT outside regular and upstream modes,
        # where it could only be a misconfigured tunnel, and `:protocol` as a
        # header name; the rest of its checks apply as to any request.
        problem = http_layers.validate_request(
            http_layers.HTTPMode.regular, without_protocol(self.flow.request),
            self.context.options.validate_inbound_headers,
        )
        if problem is None:
            return False
        self.flow.error = flow.Error(problem)
        yield http_layers.HttpRequestHeadersHook(self.flow)
        yield http_layers.HttpErrorHook(self.flow)
        yield http_layers.SendHttp(request_error_response(self.stream_id, problem), self.context.client)
        self.flow.live = False
        self.client_state = self.server_state = self.state_errored
        return True

    def send_response(self, already_streamed: bool = False) -> layer.CommandGenerator[None]:
        if self._extended_connect_accepted() and self.context.options.websocket:
            # Before the response hook, as mitmproxy does for a 101: addons
            # tell a WebSocket from there on by flow.websocket.
            self.flow.websocket = WebSocketData()
        yield from super().send_response(already_streamed)

    def _extended_connect_accepted(self) -> bool:
        return is_extended_connect(self.flow.request) and 200 <= self.flow.response.status_code < 300

    def flow_done(self) -> layer.CommandGenerator[None]:
        if is_extended_connect(self.flow.request) and self.flow.websocket:
            if self._extended_connect_accepted():
                yield from self._start_websocket()
                return
            self.flow.websocket = None  # an addon failed it after the response hook began
        yield from super().flow_done()
        if self.ws_route is Route.ACCEPTED and not self._opened(self.flow.response.status_code):
            # The upstream accepted but the flow did not (an addon failed the
            # handshake): nothing will use that upstream stream.
            yield http_layers.SendHttp(request_error(self.stream_id, "handshake failed in the proxy"), self.context.server)

    def _opened(self, status: int) -> bool:
        """Whether `status` opens the WebSocket this stream's handshake asks
        for (the codecs hand an upgrade a 101, an extended CONNECT a 2xx)."""
        handshake = self.ws_facts.handshake if self.ws_facts is not None else None
        return handshake is not None and handshake.is_success(status)

    def _start_websocket(self) -> layer.CommandGenerator[None]:
        """What mitmproxy's flow_done does for a 101 (the WebSocket layer
        takes the stream, then the response's end goes out), for the 2xx
        that answers an extended CONNECT."""
        self.child_layer = websocket.WebsocketLayer(self.context, self.flow)
        self._handle_event = self.passthrough
        yield from self.child_layer.handle_event(events.Start())
        yield http_layers.SendHttp(http_layers.ResponseEndOfMessage(self.stream_id), self.context.client)

    def passthrough(self, event: events.Event) -> layer.CommandGenerator[None]:
        stream_commands = super().passthrough(event)
        if is_extended_connect(self.flow.request):
            stream_commands = self._on_the_upstream_stream(stream_commands)
        yield from stream_commands
        if self.flow.websocket is not None and not self.flow.live:
            # The WebSocket layer is done (it clears `live` after its end
            # hook). mitmproxy drops a stream only when its flow is done
            # without an upgrade, so on an HTTP/2 connection every finished
            # WebSocket, its messages included, would stay until the
            # connection closed.
            yield http_layers.DropStream(self.stream_id)

    def _on_the_upstream_stream(self, stream_commands: layer.CommandGenerator[None]) -> layer.CommandGenerator[None]:
        """mitmproxy's passthrough sends the upstream's bytes on the stream
        only after a 101: after a tunnel's CONNECT, the upstream is a
        connection of the tunnel's own. An extended CONNECT's WebSocket is
        the stream's (RFC 8441 section 5): its bytes and its close go there."""
        server = self.context.server
        for command in stream_commands:
            if isinstance(command, commands.SendData) and command.connection == server:
                yield http_layers.SendHttp(http_layers.RequestData(self.stream_id, command.data), server)
            elif isinstance(command, commands.CloseConnection) and command.connection == server:
                yield http_layers.SendHttp(passthrough_close(http_layers.RequestProtocolError, self.stream_id), server)
            else:
                yield command

    # -- where a handshake is upstream --

    def make_server_connection(self) -> layer.CommandGenerator[bool]:
        if facts_of(self.flow.request) is None:
            return (yield from super().make_server_connection())
        return (yield from self._connect(http_layers.GetHttpConnection, WebSocketAddress))

    def _connect(self, get: type[http_layers.GetHttpConnection], address: type[WebSocketAddress]) -> layer.CommandGenerator[bool]:
        """mitmproxy's make_server_connection for a handshake: its connection
        is marked as a WebSocket's, and its facts say where it waits."""
        facts = facts_for(self.flow.request)
        facts.waiting(CONNECTING)
        _unthrottle_websockets(self.context.client)
        self._forget_finished_connections()
        conn, err = yield get(
            address((self.flow.request.host, self.flow.request.port)),
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        if err:
            yield from self.handle_protocol_error(response_error(self.stream_id, err))
            return False
        self.context.server = self.flow.server_conn = conn
        # The request's headers are sent right after this (an HTTP/2 upstream
        # may hold or queue a CONNECT, and says so itself).
        facts.forwarded()
        return True

    def _forget_finished_connections(self) -> None:
        """mitmproxy's HTTP layer keeps every connection it made until the
        client's goes away; a WebSocket's connection to an HTTP/1.1 upstream
        serves nothing else once it is closed. It is dropped when mitmproxy
        has set its timestamp_end, which it does after the connection's last
        event (proxy/server.py, open_connection)."""
        layers = self.context.layers
        http_layer = layers[layers.index(self) - 1]
        finished = [
            conn for conn in http_layer.connections
            if isinstance(conn, connection.Server)
            and is_websocket_address(conn.address)
            and conn.timestamp_end is not None
        ]
        for conn in finished:
            del http_layer.connections[conn]

    def handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, (http_layers.RequestProtocolError, http_layers.ResponseProtocolError)):
            self._note_ended_by(event)
        return super().handle_event(event)

    def _note_ended_by(self, event: http_layers.RequestProtocolError | http_layers.ResponseProtocolError) -> None:
        """Whose side failed the stream, by where the error came from: the
        client's codec sends request errors, the upstream's response errors
        (their messages do not say, and differ by version). Noted as the
        event arrives, not when the stream handles it: behind a hook still
        running (an intercepted request, a slow addon) mitmproxy queues the
        event, and the error hook it then fires must know already."""
        facts = self.ws_facts
        if facts is None or facts.ended_by is not None or is_passthrough_close(event):
            return
        if isinstance(event, NeedsHttp1) and self.ws_route is Route.FIRST:
            return  # not an end: the stream retries over HTTP/1.1
        facts.ended_by = CLIENT if isinstance(event, http_layers.RequestProtocolError) else UPSTREAM

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, NeedsHttp1):
            if self.ws_step(RouteStep.NEEDS_HTTP1):
                yield from self._retry_over_http1()
                return
            # (an upstream proxy or another addon chose the ALPN of the fallback connection)
            event = response_error(event.stream_id, "the HTTP/1.1 fallback connection negotiated HTTP/2 again")
        if isinstance(event, http_layers.RequestHeaders):
            handshake = classify(event.request)
            if handshake is not None:  # a handshake this stream will note the forwarding of
                facts_for(event.request).handshake = handshake
            else:
                note_not_a_handshake(event.request)
            self.ws_facts = facts_of(event.request)  # (also the client codec's, for any extended CONNECT)
        if isinstance(event, http_layers.ResponseHeaders) and self._opened(event.response.status_code):
            self.ws_step(RouteStep.UPSTREAM_ACCEPTED)
        yield from super()._handle_event(event)

    def ws_step(self, step: RouteStep) -> bool:
        """Take `step` if ROUTE_TRANSITIONS has it from this route."""
        after = ROUTE_TRANSITIONS.get((self.ws_route, step))
        if after is not None:
            self.ws_route = after
        return after is not None

    def _retry_over_http1(self) -> layer.CommandGenerator[None]:
        yield commands.Log(f"{NEEDS_HTTP1} ({printable(self.flow.request.host)})", logging.INFO)
        if (yield from self._connect(GetHttp1Connection, Http1OnlyAddress)):
            yield http_layers.SendHttp(http_layers.RequestHeaders(self.stream_id, self.flow.request, True), self.context.server)
            yield http_layers.SendHttp(http_layers.RequestEndOfMessage(self.stream_id), self.context.server)


def without_protocol(request: http.Request) -> http.Request:
    """A copy of an extended CONNECT's request without its `:protocol` field,
    for checks written for HTTP/1.1's header names."""
    copy_ = request.copy()
    copy_.headers = http.Headers([(k, v) for k, v in request.headers.fields if k != PROTOCOL])
    return copy_


def request_error_response(sid: int, message: str) -> http_layers.ResponseProtocolError:
    """The error mitmproxy sends a client whose request failed its checks."""
    code = getattr(getattr(http_layers, "ErrorCode", None), "REQUEST_VALIDATION_FAILED", None)
    return http_layers.ResponseProtocolError(sid, message, code) if code is not None else http_layers.ResponseProtocolError(sid, message)


def offer_http1_only(server: connection.Server) -> None:
    """Called from the addon's tls_start_server hook, which runs just before
    mitmproxy's tlsconfig makes the TLS connection from `alpn_offers`: a
    fallback connection offers only HTTP/1.1. Not at server_connect, which
    in upstream-proxy mode sees the proxy's connection instead of the
    origin's, and after which another addon may choose the offers."""
    if getattr(server.address, "ws_encode_http1_only", False):
        server.alpn_offers = (b"http/1.1",)


# -- installing -------------------------------------------------------------

# What the bridge takes from mitmproxy's HTTP layer, probed before it is
# installed instead of trusting a version number: mitmproxy's HTTP/2 code
# changes little between releases, and a release where one of these moved or
# changed its parameters is one the bridge would break, whatever its number.
# (owner, name, the parameters it must take, or None for a name only)
USES = (
    (_http2, "Http2Server", None), (_http2, "Http2Client", None), (_http2, "Http2Connection", None),
    (_http2, "parse_h2_request_headers", None), (_http2, "StreamState", None),
    (_http2.Http2Server, "handle_h2_event", ("self", "event")),
    (_http2.Http2Server, "_handle_event", ("self", "event")),
    (_http2.Http2Client, "_handle_event", ("self", "event")),
    (_http2.Http2Client, "_handle_event2", ("self", "event")),
    (_http2.Http2Client, "handle_h2_event", ("self", "event")),
    (_http2.Http2Connection, "close_connection", ("self", "msg")),
    (http_layers, "HttpStream", None), (http_layers, "HttpLayer", None), (http_layers, "DropStream", None),
    (http_layers.HttpStream, "make_server_connection", ("self",)),
    (http_layers.HttpStream, "handle_connect", ("self",)),
    (http_layers.HttpStream, "check_invalid", ("self", "request")),
    (http_layers.HttpStream, "check_killed", ("self", "emit_error_hook")),
    (http_layers.HttpStream, "send_response", ("self", "already_streamed")),
    (http_layers.HttpStream, "state_consume_request_body", ("self", "event")),
    (http_layers.HttpStream, "state_wait_for_response_headers", ("self", "event")),
    (http_layers, "validate_request", ("mode", "request", "validate_inbound_headers")),
    (http_layers, "HTTPMode", None), (http_layers, "Http1Client", None),
    (_http1.Http1Client, "send", ("self", "event")),
    (_http1.Http1Client, "read_headers", ("self", "event")),
    (http_layers.HttpStream, "flow_done", ("self",)),
    (http_layers.HttpStream, "passthrough", ("self", "event")),
    (http_layers.HttpStream, "handle_protocol_error", ("self", "event")),
    (http_layers.HttpStream, "_handle_event", ("self", "event")),
    (http_layers.GetHttpConnection, "__init__", ("self", "address", "tls", "via", "transport_protocol")),
    (http_layers.GetHttpConnection, "connection_spec_matches", ("self", "connection")),
    (http_layers, "HttpClient", None), (http_layers, "ReceiveHttp", None), (http_layers, "SendHttp", None),
    (_http2, "parse_h2_response_headers", None),
    (_http2.StreamState, "HEADERS_RECEIVED", None), (_http2.StreamState, "EXPECTING_HEADERS", None),
    (_http2.Http2Connection, "is_open_for_us", ("self", "stream_id")),
    (_http2.Http2Connection, "is_closed", ("self", "stream_id")),
    (layer.Layer, "handle_event", ("self", "event")),
    (BufferedH2Connection, "__init__", None),
)
# Attributes the bridge reads that mitmproxy sets on its instances: each must
# be assigned in that class's __init__ (or, for `conn`, its base's).
INSTANCE_ATTRIBUTES = (
    (BufferedH2Connection, "stream_buffers"),
    (_http2.Http2Connection, "h2_conn"), (_http2.Http2Connection, "streams"),
    (_http2.Http2Connection.__mro__[1], "conn"),
    (_http2.Http2Client, "stream_queue"), (_http2.Http2Client, "their_stream_id"),
    (http_layers.HttpLayer, "connections"),
)
# The names the bridge replaces, and the classes of mitmproxy's that must look
# them up in the HTTP layer's module when they make a connection or a stream
# (a `from ... import` of their own would keep the stock class).
REPLACED = {
    "HttpStream": ("HttpLayer",), "Http2Server": ("HttpLayer",), "Http2Client": ("HttpLayer", "HttpClient"),
    "Http1Client": ("HttpLayer", "HttpClient"),
}


def _looks_up(cls: type, name: str) -> bool:
    functions = [inspect.unwrap(fn) for fn in vars(cls).values() if isinstance(fn, types.FunctionType)]  # (past @expect)
    return any(fn.__globals__ is vars(http_layers) and name in fn.__code__.co_names for fn in functions)


def incompatibility() -> str | None:
    """Why this mitmproxy cannot take the bridge, or None if it can."""
    for owner, name, parameters in USES:
        where = f"{getattr(owner, '__name__', owner)}.{name}"
        found = getattr(owner, name, None)
        if found is None:
            return f"{where} is missing"
        if parameters is not None:
            try:
                got = list(inspect.signature(found).parameters.values())
            except (TypeError, ValueError):
                return f"{where} has no signature to check"
            names = tuple(p.name for p in got)
            required_extra = [p for p in got[len(parameters):] if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
            if names[: len(parameters)] != parameters or required_extra:
                return f"{where} takes ({', '.join(names)}), not ({', '.join(parameters)})"
    for cls, name in INSTANCE_ATTRIBUTES:
        if name not in cls.__init__.__code__.co_names:
            return f"{cls.__name__} keeps no {name}"
    for name, users in REPLACED.items():
        for user in users:
            if not _looks_up(getattr(http_layers, user), name):
                return f"{user} does not look up {name} where the bridge replaces it"
    return None


def install(h2: bool) -> str | None:
    """Put the bridge's classes in place; None if that took, else what did
    not (and then mitmproxy's own classes are back)."""
    wanted = {"HttpStream": WsHttpStream,
              "Http2Server": WsHttp2Server if h2 else _http2.Http2Server,
              "Http2Client": WsHttp2Client if h2 else _http2.Http2Client,
              "Http1Client": WsHttp1Client}
    for name, cls in wanted.items():
        setattr(http_layers, name, cls)
    # What mitmproxy's HTTP layer will really construct: the names as its
    # functions look them up (their module's globals).
    seen = {name: inspect.unwrap(getattr(http_layers, REPLACED[name][0]).__init__).__globals__.get(name)
            for name in wanted}
    wrong = [name for name, cls in wanted.items() if seen[name] is not cls]
    if wrong:
        uninstall()
        return f"replacing {', '.join(wrong)} in mitmproxy's HTTP layer did not take effect"
    return None


def uninstall() -> None:
    http_layers.HttpStream = _stock(WsHttpStream)
    http_layers.Http2Server = _http2.Http2Server
    http_layers.Http2Client = _http2.Http2Client
    http_layers.Http1Client = _http1.Http1Client
