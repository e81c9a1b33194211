"""What the bridge's codecs and its stream share: the signals between them
(errors, the passthrough close, `NeedsHttp1`), what a request is, and the
bounds on what a peer that does not read can make the proxy keep.

The bridge reaches into mitmproxy's HTTP layer (`internals` lists every name
it uses, and is the one place that swaps them); nothing else in the addon
does.
"""

from __future__ import annotations

import collections
import logging
import re
from dataclasses import dataclass

import h2.exceptions
import h2.utilities
import time

from mitmproxy import http
from mitmproxy.proxy.layers.http import _http2
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http._http_h2 import BufferedH2Connection

from ..core.extconnect import (
    PROTOCOL, WEBSOCKET, ClientSideStream, UpstreamStream, protocol_of, refusal, stream_fields, switching_fields,
)
from ..core.streamfacts import facts_for
from ..core.handshake import classify
from ..core.streamfacts import facts_of, not_a_handshake
from ..report import printable

logger = logging.getLogger("ws_encode")

NEEDS_HTTP1 = ("ws_encode: the upstream cannot take this WebSocket over HTTP/2 or HTTP/3 (no extended CONNECT), "
               "retrying over HTTP/1.1")
# mitmproxy 12 marks an upgraded stream's close by its WebSocket layer with a
# code; 11 has no codes, and only its message ("EOF") tells that close apart.
_PASSTHROUGH_CLOSE = getattr(getattr(http_layers, "ErrorCode", None), "PASSTHROUGH_CLOSE", None)
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
    return handshake is not None and handshake.is_websocket and not handshake.malformed


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
        return buffered is not None and over_bound(buffered.size)

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


def over_bound(waiting: int) -> bool:
    """Whether a stream with `waiting` bytes in its send buffer is past the bound.
    (The bound is read at each call, so a script may set another one: the tests
    that meet it lower it to send a few MiB, not twenty.)"""
    return waiting > MAX_BUFFERED_BYTES


def not_reading(peer: str) -> str:
    return f"the {peer} does not read: more than {MAX_BUFFERED_BYTES} bytes waited for its flow-control window"


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


def _stock(cls: type) -> type:
    """The class a (possibly already bridged) mitmproxy class stands in for,
    in case an earlier copy of this module did not get to uninstall."""
    while getattr(cls, "ws_encode_bridge", False):
        cls = cls.__bases__[0]
    return cls



def extended_connect(headers: list[tuple[bytes, bytes]], http_version: bytes,
                     websockets_on: bool) -> http.Request | tuple[int, str]:
    """An HTTP/2 or HTTP/3 request block with `:protocol`, as the flow keeps
    it (CONNECT, `:protocol` its first header field), with its facts and the
    client's side (`facts.waiting_client`); or the status and reason that
    refuse it on its own stream."""
    protocol = _protocol(headers)
    try:
        host, port, method, scheme, authority, path, fields = _http2.parse_h2_request_headers(
            [(k, v) for k, v in headers if k != PROTOCOL])
    except ValueError as e:
        return 400, f"malformed extended CONNECT: {without_values(str(e))}"
    refused = refusal(method, protocol, fields.get("sec-websocket-version", ""), authority, websockets_on)
    if refused is not None:
        return refused
    fields.insert(0, PROTOCOL.decode(), WEBSOCKET.decode())
    request = http.Request(
        host=host, port=port, method=b"CONNECT", scheme=scheme, authority=authority, path=path,
        http_version=http_version, headers=fields, content=None, trailers=None,
        timestamp_start=time.time(), timestamp_end=None,
    )
    facts = facts_for(request)
    facts.waiting_client = ClientSideStream(facts)
    return request


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


def upstream_success(ws: UpstreamStream, status: int, fields: http.Headers, http_version: bytes) -> http.Response:
    """What the stream gets for an upstream's 2xx to the extended CONNECT:
    that 2xx, or for an HTTP/1.1 client's upgrade the 101 that answers its key."""
    if ws.key is None:
        return http.Response(http_version=http_version, status_code=status, reason=b"", headers=fields,
                             content=None, trailers=None, timestamp_start=time.time(), timestamp_end=None)
    return http.Response(
        http_version=http_version, status_code=101, reason=b"Switching Protocols",
        headers=http.Headers(switching_fields(fields.fields, ws.key)), content=None, trailers=None,
        timestamp_start=time.time(), timestamp_end=None,
    )


def handed_over(ws: ClientSideStream, sid: int) -> layer.CommandGenerator[None]:
    """What a client sent before its status, for the WebSocket layer now set up."""
    data, ended = ws.hand_over()
    if data:
        yield http_layers.ReceiveHttp(http_layers.RequestData(sid, data))
    if ended:
        yield http_layers.ReceiveHttp(http_layers.RequestEndOfMessage(sid))
