"""The one place ws-encode reaches into mitmproxy's internals: HTTP/2 WebSockets (RFC 8441).

Stock mitmproxy cannot carry a WebSocket over HTTP/2 (mitmproxy issue #4607):
its HTTP/2 server never advertises SETTINGS_ENABLE_CONNECT_PROTOCOL and
rejects `:protocol`. This module translates at the HTTP/2 codec boundary, so
mitmproxy's own HTTP stream and WebSocket layers run unchanged:

- client side (`WsHttp2Server`): an extended CONNECT with `:protocol:
  websocket` is handed to the stream as an HTTP/1.1-style `GET` upgrade (fresh
  `Sec-WebSocket-Key`), ended at the headers; DATA the client sends before the
  status is kept and delivered after it; the stream's `101` goes out as
  `:status 200` with the stream left open; resets and closes after the upgrade
  reach the WebSocket layer as the peer closing, and an orderly close ends the
  stream with END_STREAM.
- upstream over HTTP/2 (`WsHttp2Client`): a WebSocket upgrade waits for the
  server's first SETTINGS (RFC 8441 section 3) and goes out as an extended
  CONNECT if the server advertises 0x8; its 2xx comes back to the stream as a
  `101` with the matching accept hash.
- upstream over HTTP/1.1: mitmproxy's own HTTP/1 client sends the `GET`
  upgrade as it is; nothing to do here.
- an HTTP/2 upstream that does not advertise 0x8: the stream
  (`WsHttpStream`) opens a separate HTTP/1.1 connection for that WebSocket,
  as browsers do.

It is installed by replacing the class names that mitmproxy's HTTP layer
looks up when it creates a connection or a stream, and uninstalled by putting
the originals back; connections already open keep the classes they started
with. Known to fit mitmproxy 11.0 and 12.0-12.3; on another version, or if the
names it needs are missing, `install` logs one line and changes nothing.
"""

from __future__ import annotations

import base64
import copy
import enum
import logging
import os
import time
import weakref
from dataclasses import dataclass, field

import h2.errors
import h2.events
import h2.exceptions
import h2.utilities
from mitmproxy import connection, http
from mitmproxy import version as mitmproxy_version
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection
from wsproto.utilities import generate_accept_token

logger = logging.getLogger("ws_encode")

KNOWN_VERSIONS = ((11, 0), (12, 0), (12, 1), (12, 2), (12, 3))
PATCHED = ("Http2Server", "Http2Client", "HttpStream")

# Headers that belong to the HTTP/1.1 upgrade and must not appear on HTTP/2.
UPGRADE_ONLY = frozenset(
    {"connection", "upgrade", "keep-alive", "proxy-connection", "transfer-encoding",
     "sec-websocket-key", "sec-websocket-accept", "host"}
)

NEEDS_HTTP1 = (
    "ws-encode: the HTTP/2 upstream does not advertise RFC 8441 "
    "(SETTINGS_ENABLE_CONNECT_PROTOCOL), retrying over HTTP/1.1"
)
# What mitmproxy's HttpStream says when an upgraded stream's child layer closes
# a connection; both versions use this message (12 also has a distinct code).
PASSTHROUGH_CLOSE = "EOF"


@dataclass
class StreamFacts:
    """What the codec saw of a handshake that mitmproxy's flow cannot show."""

    upstream_status: int | None = None
    client_bytes_before_status: int = 0
    status_with_data: bool = False


NO_FACTS = StreamFacts()

# Keyed by the flow's request object, which the codecs and the flow share.
_facts: weakref.WeakKeyDictionary[http.Request, StreamFacts] = weakref.WeakKeyDictionary()


def facts_for(request: http.Request) -> StreamFacts:
    return _facts.setdefault(request, StreamFacts())


def response_error(sid: int, message: str) -> http_layers.ResponseProtocolError:
    # mitmproxy 12 wants an ErrorCode, 11 an int status; both keep a class default.
    return http_layers.ResponseProtocolError(sid, message, http_layers.ResponseProtocolError.code)


def is_websocket_upgrade(request: http.Request) -> bool:
    upgrade = [t.strip().lower() for t in request.headers.get("upgrade", "").split(",")]
    return request.method == "GET" and "websocket" in upgrade


class WsPhase(enum.Enum):
    WAITING = "waiting for the status"
    OPEN = "open"


@dataclass
class WebSocketStream:
    """An HTTP/2 stream carrying a WebSocket, on either side of the proxy."""

    request: http.Request
    phase: WsPhase = WsPhase.WAITING
    early: bytearray = field(default_factory=bytearray)  # client DATA before the status
    ended_early: bool = False  # client END_STREAM before the status
    # Where early client DATA goes once an HTTP/2 upstream has the CONNECT:
    # (upstream connection, stream id), see WsHttp2Client._send_connect.
    relay: tuple[connection.Connection, int] | None = None


# The client side of each translated WebSocket, by its flow's request, so that
# the upstream codec can find the client's early DATA.
_client_streams: weakref.WeakKeyDictionary[http.Request, WebSocketStream] = weakref.WeakKeyDictionary()


def malformed(headers: list[tuple[bytes, bytes]], trailers: bool) -> str | None:
    """What h2's own validation finds wrong with request headers, or None."""
    flags = h2.utilities.HeaderValidationFlags(
        is_client=False, is_trailer=trailers, is_response_header=False, is_push_promise=False
    )
    try:
        for _ in h2.utilities.validate_headers(headers, flags):
            pass
    except h2.exceptions.ProtocolError as e:
        return str(e)
    return None


def _protocol(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b":protocol":
            return value
        if not name.startswith(b":"):
            return None
    return None


class WsHttp2Server(_http2.Http2Server):
    """mitmproxy's client-facing HTTP/2 codec, plus RFC 8441 WebSockets."""

    def __init__(self, context):
        super().__init__(context)
        self.h2_conn.local_settings.enable_connect_protocol = 1
        # Applied at once and sent with the preface (h2 sends acknowledged values).
        self.h2_conn.local_settings.acknowledge()
        self.websockets: dict[int, WebSocketStream] = {}
        # h2 makes a malformed request a connection error, which would take
        # every other stream down with it; RFC 9113 section 8.1.1 makes it a
        # stream error. So this connection validates request headers itself.
        self.validate_requests = self.h2_conn.config.validate_inbound_headers
        self.h2_conn.config = copy.copy(self.h2_conn.config)
        self.h2_conn.config.validate_inbound_headers = False

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
        if ws.phase is WsPhase.WAITING:
            if isinstance(event, h2.events.DataReceived):
                facts_for(ws.request).client_bytes_before_status += len(event.data)
                self.h2_conn.acknowledge_received_data(event.flow_controlled_length, sid)
                if ws.relay:
                    # An HTTP/2 upstream has the CONNECT: pass the bytes on as
                    # they are, or a server that waits for them would never answer.
                    upstream, upstream_sid = ws.relay
                    yield http_layers.SendHttp(http_layers.RequestData(upstream_sid, event.data), upstream)
                else:
                    # Kept until the status is out; mitmproxy's stream cannot
                    # take data before the upgrade.
                    ws.early += event.data
                return False
            if isinstance(event, h2.events.StreamEnded):
                ws.ended_early = True
                return False
        elif isinstance(event, h2.events.StreamReset):
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

    def _extended_connect(self, event: h2.events.RequestReceived) -> layer.CommandGenerator[None]:
        sid = event.stream_id
        protocol = _protocol(event.headers) or b""
        if protocol.lower() != b"websocket":
            yield from self._refuse(sid, 501, f"extended CONNECT for {protocol[:32]!r}, only websocket is supported")
            return
        headers = [(k, v) for k, v in event.headers if k != b":protocol"]
        try:
            host, port, _, scheme, authority, path, fields = _http2.parse_h2_request_headers(headers)
        except ValueError as e:
            yield from self._refuse(sid, 400, f"malformed extended CONNECT: {e}")
            return
        if fields.get("sec-websocket-version", "").strip() != "13":
            yield from self._refuse(sid, 400, "extended CONNECT without sec-websocket-version: 13")
            return
        fields["upgrade"] = "websocket"
        fields["connection"] = "Upgrade"
        fields["sec-websocket-key"] = base64.b64encode(os.urandom(16)).decode()
        request = http.Request(
            host=host, port=port, method=b"GET", scheme=scheme, authority=authority,
            path=path, http_version=b"HTTP/2.0", headers=fields, content=None,
            trailers=None, timestamp_start=time.time(), timestamp_end=None,
        )
        _facts[request] = StreamFacts()
        self.websockets[sid] = _client_streams[request] = WebSocketStream(request)
        self.streams[sid] = _http2.StreamState.HEADERS_RECEIVED
        # A CONNECT stream never ends its request; the upgrade request does at its headers.
        yield http_layers.ReceiveHttp(http_layers.RequestHeaders(sid, request, end_stream=True))
        yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(sid))

    def _reset(self, sid: int, reason: str) -> layer.CommandGenerator[None]:
        yield commands.Log(f"ws_encode: reset HTTP/2 stream {sid}: {reason}", logging.WARNING)
        self.h2_conn.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
        self.websockets.pop(sid, None)
        if self.streams.pop(sid, None) is not None:
            yield http_layers.ReceiveHttp(
                http_layers.RequestProtocolError(sid, reason, http_layers.RequestProtocolError.code)
            )
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def _refuse(self, sid: int, status: int, reason: str) -> layer.CommandGenerator[None]:
        yield commands.Log(f"ws_encode: refused HTTP/2 stream {sid}: {reason}", logging.WARNING)
        self.h2_conn.send_headers(sid, [(b":status", b"%d" % status)], end_stream=True)
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        ws = self.websockets.get(event.stream_id) if isinstance(event, http_layers.HttpEvent) else None
        if ws is None:
            if isinstance(event, http_layers.ResponseHeaders) and event.response.status_code == 101:
                # HTTP/2 has no 101; stock mitmproxy crashes trying to send one.
                event = response_error(event.stream_id, "upstream switched protocols on a request that did not ask for a WebSocket")
            yield from super()._handle_event(event)
        elif ws.phase is WsPhase.WAITING and isinstance(event, http_layers.ResponseHeaders):
            if event.response.status_code == 101:
                yield from self._send_success(event)
            else:
                del self.websockets[event.stream_id]  # a refusal: an ordinary response
                yield from super()._handle_event(event)
        elif ws.phase is WsPhase.OPEN and isinstance(event, http_layers.ResponseEndOfMessage):
            # mitmproxy ends the 101 "message" once the WebSocket layer is set
            # up; on HTTP/2 that would close the stream. Instead, hand over
            # what the client sent before the status.
            if ws.early:
                data, ws.early = bytes(ws.early), bytearray()
                yield http_layers.ReceiveHttp(http_layers.RequestData(event.stream_id, data))
            if ws.ended_early:
                ws.ended_early = False
                yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(event.stream_id))
        elif ws.phase is WsPhase.OPEN and isinstance(event, http_layers.ResponseProtocolError) and event.message == PASSTHROUGH_CLOSE:
            # The WebSocket layer closed the client side: an orderly end of stream.
            if self.is_open_for_us(event.stream_id):
                self.h2_conn.end_stream(event.stream_id)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        else:
            yield from super()._handle_event(event)

    def _send_success(self, event: http_layers.ResponseHeaders) -> layer.CommandGenerator[None]:
        ws = self.websockets[event.stream_id]
        headers = [(b":status", b"200")] + [
            (k.lower(), v) for k, v in event.response.headers.fields
            if k.lower().decode("latin-1") not in UPGRADE_ONLY
        ]
        if self.is_open_for_us(event.stream_id):
            self.h2_conn.send_headers(event.stream_id, headers, end_stream=False)
            yield commands.SendData(self.conn, self.h2_conn.data_to_send())
        ws.phase = WsPhase.OPEN

    def close_connection(self, msg: str) -> layer.CommandGenerator[None]:
        yield from _close_open_websockets(self, http_layers.RequestEndOfMessage)
        # Say whose connection it was: the flows' errors otherwise read the
        # same as an upstream's ("peer closed connection").
        yield from super().close_connection(f"client connection closed: {msg}")


def _close_open_websockets(codec, end_of_message) -> layer.CommandGenerator[None]:
    """A connection going away ends its open WebSockets as their peer closing."""
    for sid, ws in list(codec.websockets.items()):
        if ws.phase is WsPhase.OPEN and codec.streams.pop(sid, None) is not None:
            yield http_layers.ReceiveHttp(end_of_message(sid))
    codec.websockets.clear()


def extended_connect_headers(request: http.Request) -> list[tuple[bytes, bytes]]:
    authority = request.authority or request.host_header or f"{request.host}:{request.port}"
    pseudo = [
        (b":method", b"CONNECT"),
        (b":protocol", b"websocket"),
        (b":scheme", request.scheme.encode() or b"https"),
        (b":path", request.data.path),
        (b":authority", authority.encode()),
    ]
    return pseudo + [
        (k.lower(), v) for k, v in request.headers.fields
        if k.lower().decode("latin-1") not in UPGRADE_ONLY
    ]


class BatchRecordingH2Connection(BufferedH2Connection):
    """Remembers the events of the last read, so a status can be seen to
    arrive together with data (mitmproxy runs the flow's hooks before the
    rest of a read is processed)."""

    last_batch: list[h2.events.Event] = []

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
        self.websockets: dict[int, WebSocketStream] = {}  # by our stream id
        self.refused: set[int] = set()  # their stream ids sent back for HTTP/1.1

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.HttpEvent) and self._must_hold(event):
            # Stream ids are only taken when headers are really sent, so a held
            # CONNECT does not make later requests' ids go backwards.
            self.held.append(event)
            return
        if (
            isinstance(event, http_layers.RequestHeaders)
            and self.settings_received
            and is_websocket_upgrade(event.request)
            and not self.h2_conn.remote_settings.enable_connect_protocol
        ):
            self.refused.add(event.stream_id)
            yield http_layers.ReceiveHttp(response_error(event.stream_id, NEEDS_HTTP1))
            return
        if isinstance(event, http_layers.HttpEvent) and event.stream_id in self.refused:
            return  # the rest of a request that went elsewhere
        yield from super()._handle_event(event)
        if self.held and (self.settings_received or self.closed):
            held, self.held = self.held, []
            for e in held:
                if self.closed:
                    if isinstance(e, http_layers.RequestHeaders):
                        yield http_layers.ReceiveHttp(
                            response_error(e.stream_id, "server closed connection before its SETTINGS")
                        )
                else:
                    yield from self._handle_event(e)

    def _must_hold(self, event: http_layers.HttpEvent) -> bool:
        if any(e.stream_id == event.stream_id for e in self.held):
            return True
        return (
            isinstance(event, http_layers.RequestHeaders)
            and not self.settings_received
            and not self.closed
            and is_websocket_upgrade(event.request)
        )

    def _handle_event2(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.RequestHeaders) and is_websocket_upgrade(event.request):
            yield from self._send_connect(event)
            return
        ws = self.websockets.get(event.stream_id) if isinstance(event, http_layers.HttpEvent) else None
        if ws is not None and isinstance(event, http_layers.RequestEndOfMessage):
            return  # the CONNECT stream stays open for the WebSocket
        if ws is not None and isinstance(event, http_layers.RequestProtocolError) and event.message == PASSTHROUGH_CLOSE:
            if self.is_open_for_us(event.stream_id):
                self.h2_conn.end_stream(event.stream_id)
                yield commands.SendData(self.conn, self.h2_conn.data_to_send())
            return
        yield from super()._handle_event2(event)

    def _send_connect(self, event: http_layers.RequestHeaders) -> layer.CommandGenerator[None]:
        sid = event.stream_id
        self.last_activity = time.time()
        self.h2_conn.send_headers(sid, extended_connect_headers(event.request), end_stream=False)
        self.streams[sid] = _http2.StreamState.EXPECTING_HEADERS
        self.websockets[sid] = WebSocketStream(event.request)
        client_side = _client_streams.get(event.request)
        if client_side is not None and client_side.phase is WsPhase.WAITING:
            # What an HTTP/2 client sent before the status goes upstream now,
            # and whatever follows goes straight here (see WsHttp2Server).
            if client_side.early:
                self.h2_conn.send_data(sid, bytes(client_side.early))
                client_side.early.clear()
            client_side.relay = (self.conn, self.their_stream_id[sid])
        yield commands.SendData(self.conn, self.h2_conn.data_to_send())

    def handle_h2_event(self, event: h2.events.Event) -> layer.CommandGenerator[bool]:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
        ws = self.websockets.get(getattr(event, "stream_id", 0))
        if ws is None:
            return (yield from super().handle_h2_event(event))
        sid = event.stream_id
        if isinstance(event, h2.events.ResponseReceived) and ws.phase is WsPhase.WAITING:
            try:
                status, fields = _http2.parse_h2_response_headers(event.headers)
            except ValueError:
                return (yield from super().handle_h2_event(event))  # mitmproxy reports it
            facts_for(ws.request).upstream_status = status
            if not 200 <= status < 300:
                del self.websockets[sid]  # a refusal: an ordinary response
                return (yield from super().handle_h2_event(event))
            ws.phase = WsPhase.OPEN
            # The status came in the same read as the first response data:
            # the fingerprint of an encoder that buffers the status.
            facts_for(ws.request).status_with_data = any(
                isinstance(e, h2.events.DataReceived) and e.stream_id == sid and e.data
                for e in self.h2_conn.last_batch
            )
            key = ws.request.headers.get("sec-websocket-key", "")
            fields["upgrade"] = "websocket"
            fields["connection"] = "Upgrade"
            fields["sec-websocket-accept"] = generate_accept_token(key.encode()).decode()
            response = http.Response(
                http_version=b"HTTP/2.0", status_code=101, reason=b"Switching Protocols",
                headers=fields, content=None, trailers=None,
                timestamp_start=time.time(), timestamp_end=None,
            )
            self.streams[sid] = _http2.StreamState.HEADERS_RECEIVED
            # The stream waits for the end of the 101 before it upgrades.
            yield http_layers.ReceiveHttp(http_layers.ResponseHeaders(sid, response, end_stream=False))
            yield http_layers.ReceiveHttp(http_layers.ResponseEndOfMessage(sid))
            return False
        if isinstance(event, h2.events.StreamReset):
            del self.websockets[sid]
            self.streams.pop(sid, None)
            if ws.phase is WsPhase.OPEN:
                yield http_layers.ReceiveHttp(http_layers.ResponseEndOfMessage(sid))
            else:
                name = _error_name(event.error_code)
                yield http_layers.ReceiveHttp(response_error(sid, f"stream reset by server ({name})"))
            return False
        done = yield from super().handle_h2_event(event)
        if self.is_closed(sid):
            self.websockets.pop(sid, None)
        return done

    def close_connection(self, msg: str) -> layer.CommandGenerator[None]:
        self.closed = True
        yield from _close_open_websockets(self, http_layers.ResponseEndOfMessage)
        yield from super().close_connection(msg)


def _error_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


# -- falling back to HTTP/1.1 ---------------------------------------------

# Upstream connections that must offer only HTTP/1.1, by (client, address).
_http1_only: set[tuple[int, tuple]] = set()


class GetHttp1Connection(http_layers.GetHttpConnection):
    """Ask the HTTP layer for a connection that is not HTTP/2."""

    def connection_spec_matches(self, conn: connection.Connection) -> bool:
        return super().connection_spec_matches(conn) and conn.alpn != b"h2"

    def __hash__(self):
        return id(self)


class WsHttpStream(http_layers.HttpStream):
    """mitmproxy's HTTP stream, which retries a WebSocket over HTTP/1.1 when
    an HTTP/2 upstream cannot take it."""

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        if isinstance(event, http_layers.ResponseProtocolError) and event.message == NEEDS_HTTP1:
            yield from self._retry_over_http1()
        else:
            yield from super()._handle_event(event)

    def _retry_over_http1(self) -> layer.CommandGenerator[None]:
        yield commands.Log(f"ws_encode: {NEEDS_HTTP1} for {self.flow.request.host}", logging.INFO)
        address = (self.flow.request.host, self.flow.request.port)
        _http1_only.add((id(self.context.client), address))
        conn, err = yield GetHttp1Connection(
            address,
            self.flow.request.scheme == "https",
            self.flow.server_conn.via,
            self.flow.server_conn.transport_protocol,
        )
        if err:
            yield from self.handle_protocol_error(response_error(self.stream_id, err))
            return
        self.context.server = self.flow.server_conn = conn
        yield http_layers.SendHttp(http_layers.RequestHeaders(self.stream_id, self.flow.request, True), conn)
        yield http_layers.SendHttp(http_layers.RequestEndOfMessage(self.stream_id), conn)


def offer_http1_only(server: connection.Server, client: connection.Client) -> None:
    """Called from the addon's server_connect hook: a fallback connection
    offers only HTTP/1.1, so the upstream cannot pick HTTP/2 again."""
    key = (id(client), server.address)
    if key in _http1_only and not server.alpn_offers:
        _http1_only.discard(key)
        server.alpn_offers = (b"http/1.1",)


# -- installing -------------------------------------------------------------


def incompatibility() -> str | None:
    """Why this mitmproxy cannot take the bridge, or None if it can."""
    major_minor = tuple(int(x) for x in mitmproxy_version.VERSION.split(".")[:2])
    if major_minor not in KNOWN_VERSIONS:
        return f"mitmproxy {mitmproxy_version.VERSION} is not a version ws_encode knows ({', '.join('%d.%d' % v for v in KNOWN_VERSIONS)})"
    for name in PATCHED:
        if not isinstance(getattr(http_layers, name, None), type):
            return f"mitmproxy.proxy.layers.http.{name} is missing"
    for cls, method in [
        (_http2.Http2Server, "handle_h2_event"), (_http2.Http2Client, "_handle_event2"),
        (_http2.Http2Connection, "close_connection"), (http_layers.HttpStream, "handle_protocol_error"),
    ]:
        if not callable(getattr(cls, method, None)):
            return f"{cls.__name__}.{method} is missing"
    if not callable(getattr(_http2, "parse_h2_request_headers", None)):
        return "parse_h2_request_headers is missing"
    return None


class Bridge:
    """Switches mitmproxy's HTTP layer to the classes above, and back."""

    def __init__(self) -> None:
        self.originals: dict[str, type] | None = None
        self.refused = False

    @property
    def installed(self) -> bool:
        return self.originals is not None

    def install(self) -> None:
        if self.installed:
            return
        problem = incompatibility()
        if problem:
            if not self.refused:
                logger.warning(
                    "ws_encode_h2: %s; HTTP/2 stays as stock mitmproxy has it (no HTTP/2 "
                    "WebSockets), HTTP/1.1 WebSocket diagnosis keeps working.", problem
                )
                self.refused = True
            return
        self.originals = {name: getattr(http_layers, name) for name in PATCHED}
        http_layers.Http2Server = WsHttp2Server
        http_layers.Http2Client = WsHttp2Client
        http_layers.HttpStream = WsHttpStream

    def uninstall(self) -> None:
        if self.originals is None:
            return
        for name, original in self.originals.items():
            setattr(http_layers, name, original)
        self.originals = None

    @staticmethod
    def facts(request: http.Request) -> StreamFacts:
        return _facts.get(request, NO_FACTS)
