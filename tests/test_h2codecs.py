"""The RFC 8441 bridge's HTTP/2 codecs, driven sans-I/O.

`WsHttp2Server` and `WsHttp2Client` are mitmproxy layers: events go in
(`Start`, `DataReceived`, `ConnectionClosed`, the stream's HttpEvents) and
commands come out (`SendData`, `ReceiveHttp`, `Log`...). Here each codec is
fed by hand, with no socket and no mitmdump, and the other end of its
connection is an `h2` connection of its own (the browser, or the upstream
server) that reads what the codec sends and writes what the codec reads. The
stream between the two codecs (mitmproxy's HttpStream) is played by the test:
it reads what the codec hands it and answers with the events it would send.
"""

from __future__ import annotations

import base64
import os
import types
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import connection, http, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from rawh2 import extended_connect
from wsproto.frame_protocol import FrameProtocol

from wsencode.bridge import common
from wsencode.bridge.h2 import WsHttp2Client, WsHttp2Server
from wsencode.bridge.stream import WsHttpStream
from wsencode.core import extconnect
from wsencode.core.extconnect import MAX_EARLY_BYTES, accept_for
from wsencode.core.streamfacts import CONNECTING, FORWARDED, QUEUED, SETTINGS, StreamFacts, facts_for, facts_of

ENABLE_CONNECT_PROTOCOL = h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL
SID = 1  # the stream id of the first request, on either connection


# -- the driver ---------------------------------------------------------------


def make_context(**option_values) -> Context:
    """A client and a server connection, both open and speaking h2, and
    mitmproxy's options (with the proxyserver's, which the codecs read)."""
    opts = options.Options()
    Proxyserver().load(opts)
    opts.update(http2_ping_keepalive=0, **option_values)
    client = connection.Client(
        peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080),
        state=connection.ConnectionState.OPEN, tls=True, alpn=b"h2",
    )
    ctx = Context(client, opts)
    ctx.server = connection.Server(address=("upstream.test", 443), peername=("127.0.0.1", 443), tls=True, alpn=b"h2")
    ctx.server.state = connection.ConnectionState.OPEN  # (its address is fixed once it is open)
    return ctx


@dataclass
class Out:
    """What the events of one call made the codec do."""

    http: list[http_layers.HttpEvent] = field(default_factory=list)  # handed to its stream
    peer: list[h2.events.Event] = field(default_factory=list)  # what the peer read of what it sent
    relayed: list[http_layers.SendHttp] = field(default_factory=list)  # sent to the other codec
    logs: list[str] = field(default_factory=list)
    wakeups: list[commands.RequestWakeup] = field(default_factory=list)
    closed: bool = False

    def of(self, kind: type, sid: int | None = None) -> list:
        return [e for e in self.peer if isinstance(e, kind) and (sid is None or e.stream_id == sid)]


class Driven:
    """One codec and the h2 peer at the other end of its connection."""

    def __init__(self, codec: type, ctx: Context, conn: connection.Connection, peer_is_client: bool) -> None:
        self.conn = conn
        self.codec = codec(ctx)
        # The peer sends exactly what a test makes, however malformed, and
        # validates what it receives (h2's default), so whatever the codec
        # sends must be valid HTTP/2.
        self.peer = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=peer_is_client, header_encoding=None,
                validate_outbound_headers=False, normalize_outbound_headers=False,
            )
        )

    def __call__(self, *evs: events.Event) -> Out:
        """Hand the codec these events, one after the other."""
        out = Out()
        for cmd in (cmd for event in evs for cmd in self.codec.handle_event(event)):
            # Neither codec asks for anything it must wait for.
            assert cmd.blocking is not True, cmd
            if isinstance(cmd, commands.SendData):
                assert cmd.connection is self.conn
                out.peer += self.peer.receive_data(cmd.data)
            elif isinstance(cmd, http_layers.ReceiveHttp):
                out.http.append(cmd.event)
            elif isinstance(cmd, http_layers.SendHttp):
                out.relayed.append(cmd)
            elif isinstance(cmd, commands.Log):
                out.logs.append(cmd.message)
            elif isinstance(cmd, commands.RequestWakeup):
                out.wakeups.append(cmd)
            elif isinstance(cmd, commands.CloseConnection):
                assert cmd.connection is self.conn
                out.closed = True
            else:
                raise AssertionError(f"unexpected command {cmd!r}")
        return out

    def start(self) -> Out:
        """The codec's preface, read by the peer; a browser has made its own
        (not sent yet), an upstream server makes it when a test says."""
        if self.peer.config.client_side:
            self.peer.initiate_connection()
        return self(events.Start())

    def from_peer(self) -> Out:
        """Everything the peer has to send, as one read."""
        return self(events.DataReceived(self.conn, self.peer.data_to_send()))


def client_side(ctx: Context | None = None, **option_values) -> Driven:
    """WsHttp2Server with a browser connected, both prefaces exchanged."""
    ctx = ctx or make_context(**option_values)
    side = Driven(WsHttp2Server, ctx, ctx.client, peer_is_client=True)
    side.start()
    side.from_peer()
    return side


def upstream_side(ctx: Context | None = None) -> Driven:
    """WsHttp2Client started; the upstream server has not answered yet."""
    ctx = ctx or make_context()
    side = Driven(WsHttp2Client, ctx, ctx.server, peer_is_client=False)
    side.start()
    return side


def upstream_settings(side: Driven, connect_protocol: bool = True) -> Out:
    """The upstream's first SETTINGS, with or without RFC 8441."""
    if connect_protocol:
        side.peer.local_settings.enable_connect_protocol = 1
        side.peer.local_settings.acknowledge()
    side.peer.initiate_connection()
    return side.from_peer()


def masked_text(text: str) -> bytes:
    """One WebSocket text frame as a browser sends it (masked with a fresh key)."""
    return bytes(FrameProtocol(client=True, extensions=[]).send_data(text, fin=True))


def websocket_request() -> http.Request:
    """The HTTP/1.1 upgrade a stream sends its upstream codec (from an HTTP/1.1 client)."""
    headers = http.Headers(
        host="upstream.test", upgrade="websocket", connection="Upgrade",
        sec_websocket_key=base64.b64encode(os.urandom(16)).decode(),
        sec_websocket_version="13", content_length="0", origin="https://upstream.test",
    )
    return http.Request(
        host="upstream.test", port=443, method=b"GET", scheme=b"https", authority=b"",
        path=b"/chat", http_version=b"HTTP/1.1", headers=headers, content=b"", trailers=None,
        timestamp_start=0, timestamp_end=None,
    )


def switching(request: http.Request) -> http.Response:
    """The 101 an HTTP/1.1 upstream answers `request` with, spelled as such
    servers do (HTTP/2 forbids uppercase names and these hop-by-hop headers)."""
    return http.Response(
        http_version=b"HTTP/1.1", status_code=101, reason=b"Switching Protocols",
        headers=http.Headers([
            (b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"),
            (b"Sec-WebSocket-Accept", accept_for(request.headers["sec-websocket-key"]).encode()),
            (b"Sec-WebSocket-Protocol", b"chat"), (b"Server", b"upstream/1.0"),
        ]),
        content=None, trailers=None, timestamp_start=0, timestamp_end=None,
    )


def passthrough_close(cls: type, sid: int) -> http_layers.HttpEvent:
    """What mitmproxy's stream sends a codec when its WebSocket layer closes
    that side: 12 marks it with a code, 11 only says "EOF"."""
    code = getattr(getattr(http_layers, "ErrorCode", None), "PASSTHROUGH_CLOSE", None)
    return cls(sid, "EOF", code) if code is not None else cls(sid, "EOF")


def status_of(event: h2.events.ResponseReceived) -> int:
    return int(dict(event.headers)[b":status"])


# -- the client side: WsHttp2Server -----------------------------------------


def open_extended_connect(side: Driven, sid: int = SID, path: bytes = b"/chat") -> Out:
    side.peer.send_headers(sid, extended_connect(path, b"chat.test:8443"), end_stream=False)
    return side.from_peer()


def opened(*fields: tuple[bytes, bytes], status: int = 200) -> http.Response:
    """The 2xx that opens an extended CONNECT's WebSocket, as the stream hands it on."""
    return http.Response(
        http_version=b"HTTP/2.0", status_code=status, reason=b"", headers=http.Headers(list(fields)),
        content=None, trailers=None, timestamp_start=0, timestamp_end=None,
    )


def upgraded_client(side: Driven, sid: int = SID) -> http.Request:
    """An extended CONNECT that the stream has answered with its 200."""
    request = open_extended_connect(side, sid).http[0].request
    side(http_layers.ResponseHeaders(sid, opened(), end_stream=True), http_layers.ResponseEndOfMessage(sid))
    return request


def test_server_codec_advertises_connect_protocol_in_its_first_settings():
    """RFC 8441 section 3: a client may only send an extended CONNECT once the
    server's SETTINGS say ENABLE_CONNECT_PROTOCOL=1; stock mitmproxy never does."""
    ctx = make_context()
    out = Driven(WsHttp2Server, ctx, ctx.client, peer_is_client=True).start()
    (settings,) = out.of(h2.events.RemoteSettingsChanged)
    assert settings.changed_settings[ENABLE_CONNECT_PROTOCOL].new_value == 1


def test_an_extended_connect_reaches_the_stream_as_the_client_sent_it():
    """The flow is what the client sent: CONNECT, with :protocol as its first
    header field (mitmproxy has no field for it), for the same path and
    authority; nothing of an HTTP/1.1 upgrade. Its request ends at its
    headers: what the client sends on the stream is the WebSocket's."""
    side = client_side()
    out = open_extended_connect(side, path=b"/chat?room=1")
    headers, end = out.http
    assert isinstance(headers, http_layers.RequestHeaders) and headers.stream_id == SID
    assert headers.end_stream
    assert isinstance(end, http_layers.RequestEndOfMessage) and end.stream_id == SID
    request = headers.request
    assert (request.method, request.path, request.http_version) == ("CONNECT", "/chat?room=1", "HTTP/2.0")
    assert request.authority == "chat.test:8443" and (request.host, request.port) == ("chat.test", 8443)
    assert request.headers.fields == ((b":protocol", b"websocket"), (b"sec-websocket-version", b"13"))
    assert common.opens_websocket(request) and common.is_extended_connect(request)
    assert not out.peer  # nothing answered yet: the stream decides


def test_the_streams_2xx_goes_out_with_the_stream_left_open():
    """The success of an extended CONNECT is a 2xx, sent without what HTTP/2
    forbids; and the stream must stay open both ways, since it now carries
    the WebSocket, whatever end the stream's message says."""
    side = client_side()
    open_extended_connect(side)
    out = side(http_layers.ResponseHeaders(SID, opened((b"Sec-WebSocket-Protocol", b"chat"), (b"connection", b"x")), end_stream=True))
    (response,) = out.of(h2.events.ResponseReceived, SID)  # (the browser validates it)
    assert response.headers == [(b":status", b"200"), (b"sec-websocket-protocol", b"chat")]
    assert response.stream_ended is None and not out.of(h2.events.StreamEnded)
    # The end of the 2xx "message" leaves it open too; then WebSocket data
    # flows both ways.
    out = side(http_layers.ResponseEndOfMessage(SID))
    assert not out.peer and not out.http
    out = side(http_layers.ResponseData(SID, b"\x81\x02hi"))
    assert [e.data for e in out.of(h2.events.DataReceived, SID)] == [b"\x81\x02hi"]
    message = masked_text("yo")
    side.peer.send_data(SID, message)
    out = side.from_peer()
    assert [(type(e), e.data) for e in out.http] == [(http_layers.RequestData, message)]


def _dropped(name: bytes):
    return [(k, v) for k, v in extended_connect(b"/chat", b"chat.test") if k != name]


def _replaced(name: bytes, value: bytes):
    return [(k, value if k == name else v) for k, v in extended_connect(b"/chat", b"chat.test")]


MALFORMED = {
    "no :path": _dropped(b":path"),
    "no :scheme": _dropped(b":scheme"),
    ":protocol on a GET": _replaced(b":method", b"GET"),
}


@pytest.mark.parametrize("headers", MALFORMED.values(), ids=MALFORMED.keys())
def test_a_malformed_extended_connect_resets_only_its_stream(headers):
    """RFC 9113 section 8.1.1: a malformed request is a stream error. h2 would
    make it a connection error and take every other stream down with it."""
    side = client_side()
    side.peer.send_headers(SID, headers, end_stream=False)
    out = side.from_peer()
    assert [(e.stream_id, e.error_code) for e in out.of(h2.events.StreamReset)] == [(SID, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
    assert not out.http  # the stream never hears of it
    assert not out.of(h2.events.ConnectionTerminated) and not out.closed
    # The connection goes on: the next WebSocket on it is translated.
    out = open_extended_connect(side, sid=3)
    assert [type(e) for e in out.http] == [http_layers.RequestHeaders, http_layers.RequestEndOfMessage]


@pytest.mark.parametrize("headers", MALFORMED.values(), ids=MALFORMED.keys())
def test_without_header_validation_a_malformed_extended_connect_gets_400_on_its_stream(headers):
    """With mitmproxy's validate_inbound_headers off, the bridge's own parsing
    still refuses what it cannot translate, with a status on that stream."""
    side = client_side(validate_inbound_headers=False)
    side.peer.send_headers(SID, headers, end_stream=False)
    out = side.from_peer()
    (response,) = out.of(h2.events.ResponseReceived, SID)
    assert status_of(response) == 400 and out.of(h2.events.StreamEnded, SID)
    assert not out.http and not out.closed
    assert [type(e) for e in open_extended_connect(side, sid=3).http] == [http_layers.RequestHeaders, http_layers.RequestEndOfMessage]


@pytest.mark.parametrize(
    "headers, option_values, status",
    [
        (_replaced(b":protocol", b"connect-udp"), {}, 501),
        (_dropped(b"sec-websocket-version"), {}, 400),
        (_replaced(b"sec-websocket-version", b"8"), {}, 400),
        (extended_connect(b"/chat", b"chat.test"), {"websocket": False}, 501),
    ],
    ids=["another protocol", "no version", "version 8", "websocket option off"],
)
def test_an_extended_connect_the_bridge_cannot_serve_is_refused_with_a_status(headers, option_values, status):
    """Well-formed, but not a WebSocket mitmproxy can carry (another protocol,
    not RFC 6455's version 13, or mitmproxy's `websocket` option off): the client
    gets a final status on that stream, and the stream is never created."""
    side = client_side(**option_values)
    side.peer.send_headers(SID, headers, end_stream=False)
    out = side.from_peer()
    (response,) = out.of(h2.events.ResponseReceived, SID)
    assert status_of(response) == status and out.of(h2.events.StreamEnded, SID)
    assert not out.http and not out.of(h2.events.StreamReset)


def test_client_data_before_the_status_is_handed_over_after_the_2xx():
    """A client may send its first messages right after the CONNECT, before
    any status (nothing in RFC 8441 makes it wait, and some do not). mitmproxy's stream
    cannot take request data for a request it has ended, so the data waits,
    and reaches the WebSocket layer only once it is there: after the end of
    the 2xx, in the order it came."""
    side = client_side()
    request = open_extended_connect(side).http[0].request
    first, second = masked_text("early one"), masked_text("early two")
    side.peer.send_data(SID, first)
    assert not side.from_peer().http
    side.peer.send_data(SID, second)
    assert not side.from_peer().http
    assert facts_of(request).client_bytes_before_status == len(first + second)
    out = side(http_layers.ResponseHeaders(SID, opened(), end_stream=False))
    assert not out.http
    out = side(http_layers.ResponseEndOfMessage(SID))
    assert [(type(e), e.stream_id, e.data) for e in out.http] == [(http_layers.RequestData, SID, first + second)]
    # Handed over once: later data goes straight to the stream.
    later = masked_text("later")
    side.peer.send_data(SID, later)
    assert [e.data for e in side.from_peer().http] == [later]


def test_early_data_beyond_the_cap_resets_only_that_stream():
    """A client that sends without waiting for the status could make the
    proxy keep any amount: up to MAX_EARLY_BYTES are kept, one more resets
    that stream (and the rest of the same read is dropped with it), while a
    WebSocket beside it carries on."""
    side = client_side()
    open_extended_connect(side)
    open_extended_connect(side, sid=3)
    chunk = side.peer.max_outbound_frame_size
    for start in range(0, MAX_EARLY_BYTES, chunk):
        side.peer.send_data(SID, b"\0" * min(chunk, MAX_EARLY_BYTES - start))
    out = side.from_peer()
    assert not out.peer and not out.http  # at the cap: kept
    side.peer.send_data(SID, b"\0")
    side.peer.send_data(SID, b"\0" * 100)  # in the same read, after the one too many
    out = side.from_peer()
    assert [(e.stream_id, e.error_code) for e in out.of(h2.events.StreamReset)] == [(SID, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
    (error,) = out.http
    assert isinstance(error, http_layers.RequestProtocolError) and error.stream_id == SID
    assert not out.closed and not out.of(h2.events.ConnectionTerminated)
    # The other WebSocket still opens and carries data.
    side(http_layers.ResponseHeaders(3, opened(), end_stream=False), http_layers.ResponseEndOfMessage(3))
    message = masked_text("still here")
    side.peer.send_data(3, message)
    assert [e.data for e in side.from_peer().http] == [message]


def test_client_end_stream_before_the_status_reaches_the_stream_after_its_data():
    """A client may half-close right after its early data. Before the status
    the stream has no WebSocket to tell, and an end of request now would end
    the handshake's request twice; after the 2xx it is the client closing its
    side, after the data it sent first. The client still gets its 200, on a
    stream that stays open for the proxy's sending."""
    side = client_side()
    open_extended_connect(side)
    early = masked_text("then bye")
    side.peer.send_data(SID, early, end_stream=True)
    assert not side.from_peer().http
    out = side(http_layers.ResponseHeaders(SID, opened(), end_stream=False))
    (response,) = out.of(h2.events.ResponseReceived, SID)
    assert status_of(response) == 200 and not out.of(h2.events.StreamEnded)
    out = side(http_layers.ResponseEndOfMessage(SID))
    assert [(type(e), getattr(e, "data", None)) for e in out.http] == [
        (http_layers.RequestData, early),
        (http_layers.RequestEndOfMessage, None),
    ]
    out = side(http_layers.ResponseData(SID, b"\x88\x00"))  # the proxy's side may still send
    assert [e.data for e in out.of(h2.events.DataReceived, SID)] == [b"\x88\x00"]


def test_client_trailers_on_a_websocket_stream_reset_it_as_the_peer_going_away():
    """RFC 9113 section 8.5: only DATA may follow a CONNECT's headers. Trailers
    reset that stream; the WebSocket layer, which understands only a peer
    that leaves, sees the client's end of message rather than an error."""
    side = client_side()
    upgraded_client(side)
    side.peer.send_headers(SID, [(b"x-trailer", b"1")], end_stream=True)
    out = side.from_peer()
    assert [(e.stream_id, e.error_code) for e in out.of(h2.events.StreamReset)] == [(SID, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
    assert [(type(e), e.stream_id) for e in out.http] == [(http_layers.RequestEndOfMessage, SID)]
    assert any("trailers on a WebSocket stream" in line for line in out.logs)


@pytest.mark.parametrize("code", [h2.errors.ErrorCodes.CANCEL, h2.errors.ErrorCodes.INTERNAL_ERROR])
def test_a_client_reset_after_the_upgrade_is_the_client_going_away(code):
    """Browsers close a WebSocket stream with RST_STREAM; handed on as an
    error it would crash mitmproxy's WebSocket layer."""
    side = client_side()
    upgraded_client(side)
    side.peer.reset_stream(SID, code)
    out = side.from_peer()
    assert [(type(e), e.stream_id) for e in out.http] == [(http_layers.RequestEndOfMessage, SID)]


def test_a_client_reset_while_waiting_fails_the_handshake():
    """Before the status there is no WebSocket: a reset is the request failing."""
    side = client_side()
    open_extended_connect(side)
    side.peer.reset_stream(SID, h2.errors.ErrorCodes.CANCEL)
    (error,) = side.from_peer().http
    assert isinstance(error, http_layers.RequestProtocolError) and error.stream_id == SID


def test_the_websocket_layer_closing_the_client_side_ends_the_stream_with_end_stream():
    """mitmproxy's stream reports its WebSocket layer closing a side as a
    protocol error, which stock HTTP/2 turns into RST_STREAM(CANCEL); an
    orderly WebSocket close must end the stream with END_STREAM instead."""
    side = client_side()
    upgraded_client(side)
    out = side(passthrough_close(http_layers.ResponseProtocolError, SID))
    assert out.of(h2.events.StreamEnded, SID) and not out.of(h2.events.StreamReset)


def test_the_client_connection_closing_ends_its_websockets_as_the_peer_leaving():
    """The WebSocket layer understands the client leaving, not an error:
    every open WebSocket hears its end of message; a waiting handshake fails."""
    side = client_side()
    upgraded_client(side)
    open_extended_connect(side, sid=3)
    out = side(events.ConnectionClosed(side.conn))
    assert out.closed
    ends = {e.stream_id: type(e) for e in out.http}
    assert ends == {SID: http_layers.RequestEndOfMessage, 3: http_layers.RequestProtocolError}


def test_a_101_for_an_ordinary_request_is_not_sent_to_the_client():
    """HTTP/2 has no 101 (RFC 9113 section 8.6): stock mitmproxy crashes trying
    to send one for a plain request; the client gets a 502 instead."""
    side = client_side()
    side.peer.send_headers(SID, [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"chat.test")], end_stream=True)
    headers = side.from_peer().http[0]
    assert not common.opens_websocket(headers.request)
    out = side(http_layers.ResponseHeaders(SID, switching(websocket_request()), end_stream=False))
    (response,) = out.of(h2.events.ResponseReceived, SID)
    assert status_of(response) == 502 and out.of(h2.events.StreamEnded, SID)


def test_an_ordinary_request_reaches_the_stream_untranslated():
    """Without :protocol a request is mitmproxy's own business: it reaches the
    stream as stock parsing makes it, headers and body, and the codec keeps
    nothing of it."""
    side = client_side()
    side.peer.send_headers(SID, [
        (b":method", b"POST"), (b":scheme", b"https"), (b":path", b"/form"), (b":authority", b"chat.test"),
        (b"content-type", b"text/plain"),
    ])
    side.peer.send_data(SID, b"a=1", end_stream=True)
    headers, data, end = side.from_peer().http
    assert isinstance(headers, http_layers.RequestHeaders) and not headers.end_stream
    request = headers.request
    assert (request.method, request.path, request.authority) == ("POST", "/form", "chat.test")
    assert request.headers.fields == ((b"content-type", b"text/plain"),)
    assert isinstance(data, http_layers.RequestData) and data.data == b"a=1"
    assert isinstance(end, http_layers.RequestEndOfMessage) and end.stream_id == SID
    assert SID not in side.codec.websockets


def test_a_refusal_before_the_status_reaches_the_client_as_that_status_and_drops_its_early_data():
    """An HTTP/1.1 upstream (or an addon) may turn the upgrade down with an
    ordinary response: the client gets that status and body on its stream,
    which ends there; what it sent early is dropped with the WebSocket that
    never opened, and the codec keeps nothing of it."""
    side = client_side()
    open_extended_connect(side)
    side.peer.send_data(SID, masked_text("early"))
    side.from_peer()
    refusal = http.Response.make(403, b"forbidden", {"content-type": "text/plain"})
    out = side(
        http_layers.ResponseHeaders(SID, refusal, end_stream=False),
        http_layers.ResponseData(SID, b"forbidden"),
        http_layers.ResponseEndOfMessage(SID),
    )
    (response,) = out.of(h2.events.ResponseReceived, SID)
    assert status_of(response) == 403 and dict(response.headers)[b"content-type"] == b"text/plain"
    assert b"".join(e.data for e in out.of(h2.events.DataReceived, SID)) == b"forbidden"
    assert out.of(h2.events.StreamEnded, SID)
    assert not out.http  # the early data is not handed over
    assert SID not in side.codec.websockets


# -- the upstream side: WsHttp2Client -----------------------------------------

THEIRS = 5  # the stream's id on the client's connection; upstream streams count from 1


def hand_upgrade(side: Driven, request: http.Request, theirs: int = THEIRS) -> Out:
    """The stream sends its upgrade request: headers, then end of message."""
    return side(http_layers.RequestHeaders(theirs, request, end_stream=True), http_layers.RequestEndOfMessage(theirs))


def connect_sent(side: Driven) -> tuple[http.Request, h2.events.RequestReceived]:
    """An upgrade held, then sent as an extended CONNECT after the upstream's SETTINGS."""
    request = websocket_request()
    hand_upgrade(side, request)
    (connect,) = upstream_settings(side).of(h2.events.RequestReceived)
    return request, connect


def accepted(side: Driven, *extra: tuple[bytes, bytes]) -> tuple[http.Request, Out]:
    request, connect = connect_sent(side)
    side.peer.send_headers(connect.stream_id, [(b":status", b"200"), *extra])
    return request, side.from_peer()


def test_a_websocket_waits_for_the_upstreams_first_settings_and_goes_out_as_extended_connect():
    """RFC 8441 section 3: a client must not send an extended CONNECT before
    the server's SETTINGS say it may. Other requests need not wait; and the
    held CONNECT takes its stream id when it goes, so ids still only grow."""
    side = upstream_side()
    request = websocket_request()
    out = hand_upgrade(side, request)
    assert not out.peer and not out.http
    assert facts_of(request).stage == SETTINGS
    plain = http.Request.make("GET", "https://upstream.test/plain", headers={"host": "upstream.test"})
    out = side(http_layers.RequestHeaders(7, plain, end_stream=True))
    (sent_plain,) = out.of(h2.events.RequestReceived)
    assert dict(sent_plain.headers)[b":path"] == b"/plain" and sent_plain.stream_id == 1

    out = upstream_settings(side, connect_protocol=True)
    (connect,) = out.of(h2.events.RequestReceived)
    assert connect.stream_id == 3
    assert connect.stream_ended is None and not out.of(h2.events.StreamEnded, 3)  # the tunnel stays open
    fields = dict(connect.headers)
    assert [k for k, _ in connect.headers if k.startswith(b":")] == [b":method", b":protocol", b":scheme", b":path", b":authority"]
    assert fields[b":method"] == b"CONNECT" and fields[b":protocol"] == b"websocket"
    assert fields[b":scheme"] == b"https" and fields[b":path"] == b"/chat"
    assert fields[b":authority"] == b"upstream.test"
    assert fields[b"sec-websocket-version"] == b"13" and fields[b"origin"] == b"https://upstream.test"
    for name in (b"connection", b"upgrade", b"sec-websocket-key", b"content-length", b"host"):
        assert name not in fields, name
    assert facts_of(request).forwarded_at is not None
    assert not out.http


def test_an_upstream_without_connect_protocol_sends_the_websocket_to_http1():
    """An HTTP/2 server that does not advertise ENABLE_CONNECT_PROTOCOL cannot
    take a WebSocket: the stream is told (NeedsHttp1, on its own id) so that
    it can retry over HTTP/1.1, as browsers do, and nothing of it goes upstream."""
    side = upstream_side()
    hand_upgrade(side, websocket_request())
    out = upstream_settings(side, connect_protocol=False)
    assert [(type(e), e.stream_id) for e in out.http] == [(common.NeedsHttp1, THEIRS)]
    assert not out.of(h2.events.RequestReceived)
    # The rest of that request goes elsewhere too, and a later upgrade is
    # sent back at once.
    out = side(http_layers.RequestData(THEIRS, b"late"), http_layers.RequestEndOfMessage(THEIRS))
    assert not out.peer and not out.http
    out = hand_upgrade(side, websocket_request(), theirs=9)
    assert [(type(e), e.stream_id) for e in out.http] == [(common.NeedsHttp1, 9)]
    assert not out.peer


def test_a_refusal_from_the_upstream_reaches_the_stream_as_that_status():
    """A non-2xx answer to an extended CONNECT is a refusal, an ordinary HTTP
    response: the client must see that status and its body, not a 101; and
    the CONNECT's request side is ended, since no tunnel follows."""
    side = upstream_side()
    _, connect = connect_sent(side)
    side.peer.send_headers(connect.stream_id, [(b":status", b"403"), (b"content-type", b"text/plain")])
    side.peer.send_data(connect.stream_id, b"forbidden", end_stream=True)
    out = side.from_peer()
    headers, data, end = out.http
    assert isinstance(headers, http_layers.ResponseHeaders) and headers.stream_id == THEIRS
    assert headers.response.status_code == 403 and headers.response.headers["content-type"] == "text/plain"
    assert "sec-websocket-accept" not in headers.response.headers
    assert isinstance(data, http_layers.ResponseData) and data.data == b"forbidden"
    assert isinstance(end, http_layers.ResponseEndOfMessage) and end.stream_id == THEIRS
    assert out.of(h2.events.StreamEnded, connect.stream_id)


def test_a_2xx_reaches_an_http1_clients_upgrade_as_a_101_with_the_accept_for_its_key():
    """An HTTP/1.1 client's upgrade carried to an HTTP/2 upstream: that
    client gets the 101 whose Sec-WebSocket-Accept answers its key (RFC 6455
    section 4.1); HTTP/2 has neither, so the codec makes both, keeping the
    server's other headers, and ends the 101 "message" so that the stream
    sets up its WebSocket layer."""
    side = upstream_side()
    request, out = accepted(side, (b"sec-websocket-protocol", b"chat"))
    headers, end = out.http
    assert isinstance(headers, http_layers.ResponseHeaders) and headers.stream_id == THEIRS
    response = headers.response
    assert response.status_code == 101 and not headers.end_stream
    assert response.headers["sec-websocket-accept"] == accept_for(request.headers["sec-websocket-key"])
    assert response.headers["upgrade"] == "websocket" and response.headers["connection"] == "Upgrade"
    assert response.headers["sec-websocket-protocol"] == "chat"
    assert isinstance(end, http_layers.ResponseEndOfMessage) and end.stream_id == THEIRS
    assert facts_of(request).upstream_status == 200


def test_a_status_read_together_with_the_first_data_is_noted():
    """An upstream behind a buffering encoder sends its status only with the
    first response data; the codec notes whether they came in one read (the
    addon's diagnosis of a stall reads it)."""
    side = upstream_side()
    alone, _ = accepted(side)
    assert facts_of(alone).status_with_data is False
    side = upstream_side()
    together, connect = connect_sent(side)
    side.peer.send_headers(connect.stream_id, [(b":status", b"200")])
    side.peer.send_data(connect.stream_id, b"\x81\x02hi")
    assert [type(e) for e in side.from_peer().http] == [http_layers.ResponseHeaders, http_layers.ResponseEndOfMessage, http_layers.ResponseData]
    assert facts_of(together).status_with_data is True


def test_after_the_101_websocket_data_flows_both_ways_on_the_open_connect_stream():
    """The CONNECT stream is the tunnel: the stream's end of request (sent
    right after the upgrade's headers) must not half-close it, and data goes
    both ways; the WebSocket layer's orderly close ends it with END_STREAM."""
    side = upstream_side()
    accepted(side)
    side.peer.send_data(1, b"\x81\x05hello")
    assert [(type(e), e.stream_id, e.data) for e in side.from_peer().http] == [(http_layers.ResponseData, THEIRS, b"\x81\x05hello")]
    message = masked_text("hi")
    out = side(http_layers.RequestData(THEIRS, message))
    assert [e.data for e in out.of(h2.events.DataReceived, 1)] == [message]
    assert not out.of(h2.events.StreamEnded)
    out = side(passthrough_close(http_layers.RequestProtocolError, THEIRS))
    assert out.of(h2.events.StreamEnded, 1) and not out.of(h2.events.StreamReset)


def test_http_1_1_required_while_waiting_moves_the_websocket_to_http1():
    """RFC 9113 section 8.7: HTTP_1_1_REQUIRED asks the client to retry over
    HTTP/1.1; for a waiting handshake that is the NeedsHttp1 retry."""
    side = upstream_side()
    _, connect = connect_sent(side)
    side.peer.reset_stream(connect.stream_id, h2.errors.ErrorCodes.HTTP_1_1_REQUIRED)
    out = side.from_peer()
    assert [(type(e), e.stream_id) for e in out.http] == [(common.NeedsHttp1, THEIRS)]


@pytest.mark.parametrize("code, named", [(h2.errors.ErrorCodes.REFUSED_STREAM, "(REFUSED_STREAM)"), (0x99, "(153)")], ids=["known code", "unknown code"])
def test_another_reset_while_waiting_fails_the_handshake_without_a_retry(code, named):
    """Only HTTP_1_1_REQUIRED means "try HTTP/1.1"; any other reset is the
    upstream failing the handshake, reported as such, with the code's name
    (or, for a code RFC 9113 does not define, its number: unknown codes are
    allowed, section 7)."""
    side = upstream_side()
    _, connect = connect_sent(side)
    side.peer.reset_stream(connect.stream_id, code)
    (error,) = side.from_peer().http
    assert type(error) is http_layers.ResponseProtocolError and error.stream_id == THEIRS
    assert named in error.message


@pytest.mark.parametrize("code", [h2.errors.ErrorCodes.HTTP_1_1_REQUIRED, h2.errors.ErrorCodes.CANCEL])
def test_a_reset_after_the_upgrade_is_the_upstream_going_away(code):
    """Once the WebSocket is up, a reset is the server leaving, whatever its
    code: the stream sees its peer close, not a retry nor an error."""
    side = upstream_side()
    accepted(side)
    side.peer.reset_stream(1, code)
    out = side.from_peer()
    assert [(type(e), e.stream_id) for e in out.http] == [(http_layers.ResponseEndOfMessage, THEIRS)]


def test_upstream_trailers_on_a_websocket_stream_reset_it_as_the_upstream_going_away():
    """RFC 9113 section 8.5: only DATA may follow on a CONNECT stream. The
    codec resets the upstream stream and the WebSocket sees its server close."""
    side = upstream_side()
    accepted(side)
    side.peer.send_headers(1, [(b"x-trailer", b"1")], end_stream=True)
    out = side.from_peer()
    assert [(e.stream_id, e.error_code) for e in out.of(h2.events.StreamReset)] == [(1, h2.errors.ErrorCodes.PROTOCOL_ERROR)]
    assert [(type(e), e.stream_id) for e in out.http] == [(http_layers.ResponseEndOfMessage, THEIRS)]


def test_an_upstream_closing_before_its_settings_fails_the_held_handshake():
    """A held CONNECT never went out: when the connection closes first, the
    stream hears why, as an error (no retry: the server is gone)."""
    side = upstream_side()
    hand_upgrade(side, websocket_request())
    out = side(events.ConnectionClosed(side.conn))
    assert out.closed
    (error,) = out.http
    assert type(error) is http_layers.ResponseProtocolError and error.stream_id == THEIRS
    assert "before its SETTINGS" in error.message


def test_the_upstream_connection_closing_after_the_upgrade_is_the_upstream_going_away():
    """As with a reset: an open WebSocket hears its server close, not an error."""
    side = upstream_side()
    accepted(side)
    out = side(events.ConnectionClosed(side.conn))
    assert [(type(e), e.stream_id) for e in out.http] == [(http_layers.ResponseEndOfMessage, THEIRS)]


def test_a_handshake_behind_max_concurrent_streams_is_queued_and_goes_out_when_a_stream_frees():
    """An upstream that allows one stream at a time: a WebSocket behind an
    open request waits in mitmproxy's queue, noted as queued (not forwarded:
    no stall clock runs for it yet), and goes out as the extended CONNECT when
    that request is done. A plain request queued behind it gets no facts:
    the bridge notes only handshakes."""
    side = upstream_side()
    side.peer.local_settings.max_concurrent_streams = 1
    upstream_settings(side)
    plain = http.Request.make("GET", "https://upstream.test/plain", headers={"host": "upstream.test"})
    (first,) = side(http_layers.RequestHeaders(7, plain, end_stream=True)).of(h2.events.RequestReceived)
    request = websocket_request()
    facts_for(request).waiting(CONNECTING)  # as the stream notes it, asking for this connection
    behind = http.Request.make("GET", "https://upstream.test/behind", headers={"host": "upstream.test"})
    out = hand_upgrade(side, request)
    assert not out.peer and not side(http_layers.RequestHeaders(9, behind, end_stream=True)).peer
    assert facts_of(request).stage == QUEUED and facts_of(request).forwarded_at is None
    assert facts_of(behind) is None
    side.peer.send_headers(first.stream_id, [(b":status", b"204")], end_stream=True)
    out = side.from_peer()
    (connect,) = out.of(h2.events.RequestReceived)
    assert connect.stream_id == 3 and dict(connect.headers)[b":method"] == b"CONNECT"
    assert facts_of(request).stage == FORWARDED and facts_of(request).forwarded_at is not None


def test_a_connect_answered_with_a_malformed_status_fails_as_mitmproxy_fails_any_such_response():
    """A status that is no number is neither a 101 nor a refusal: the codec
    leaves it to mitmproxy, which fails the upstream connection with
    PROTOCOL_ERROR (as for any response); the stream hears its handshake
    fail, and the codec keeps nothing of it."""
    side = upstream_side()
    _, connect = connect_sent(side)
    side.peer.send_headers(connect.stream_id, [(b":status", b"2OO")])
    out = side.from_peer()
    (error,) = out.http
    assert type(error) is http_layers.ResponseProtocolError and error.stream_id == THEIRS
    assert "Invalid HTTP/2 response headers" in error.message
    assert [e.error_code for e in out.of(h2.events.ConnectionTerminated)] == [h2.errors.ErrorCodes.PROTOCOL_ERROR]
    assert out.closed and not side.codec.websockets


def test_a_refusal_read_together_with_goaway_still_reaches_the_stream_whole():
    """A server that turns the CONNECT down and closes its connection in one
    write: h2 has read the GOAWAY by the time the codec handles the status, so
    the CONNECT's end of request must not be sent (h2 would raise); the stream
    gets the refusal, status and end, and then the connection closes."""
    side = upstream_side()
    _, connect = connect_sent(side)
    side.peer.send_headers(connect.stream_id, [(b":status", b"503")], end_stream=True)
    side.peer.close_connection()
    out = side.from_peer()
    headers, end = out.http
    assert type(headers) is http_layers.ResponseHeaders and headers.stream_id == THEIRS
    assert headers.response.status_code == 503
    assert type(end) is http_layers.ResponseEndOfMessage and end.stream_id == THEIRS
    assert out.closed and not side.codec.websockets


# -- both codecs: early client data while an HTTP/2 upstream has the CONNECT --


def held_for_settings() -> tuple[Driven, Driven, http.Request]:
    """A browser's extended CONNECT, translated by the client codec and handed
    to the upstream codec (for the stream's id, as mitmproxy's HTTP layer
    passes it), which holds it: the upstream has sent no SETTINGS yet."""
    ctx = make_context()
    client, upstream = client_side(ctx), upstream_side(ctx)
    request = open_extended_connect(client).http[0].request
    hand_upgrade(upstream, request, theirs=SID)
    return client, upstream, request


def bridged() -> tuple[Driven, Driven, http.Request, int]:
    """The same CONNECT sent on by the upstream codec: the two codecs, the
    request and the upstream stream id."""
    client, upstream, request = held_for_settings()
    (connect,) = upstream_settings(upstream).of(h2.events.RequestReceived)
    return client, upstream, request, connect.stream_id


def relay(upstream: Driven, out: Out) -> Out:
    """What the HTTP layer does with the client codec's SendHttp commands."""
    assert all(cmd.connection is upstream.conn for cmd in out.relayed)
    return upstream(*(cmd.event for cmd in out.relayed))


def answered(upstream: Driven, up_sid: int) -> Out:
    """The upstream's 200 for the CONNECT, and its end, for the stream."""
    upstream.peer.send_headers(up_sid, [(b":status", b"200")])
    return upstream.from_peer()


def test_a_websocket_through_both_codecs_is_the_same_extended_connect_and_200():
    """Browser to HTTP/2 upstream, nothing is translated: the upstream gets
    the browser's CONNECT (path, authority, its own headers), and the
    browser the upstream's 200."""
    ctx = make_context()
    client, upstream = client_side(ctx), upstream_side(ctx)
    client.peer.send_headers(SID, extended_connect(b"/chat?room=1", b"chat.test:8443", (b"origin", b"https://chat.test")))
    request = client.from_peer().http[0].request
    hand_upgrade(upstream, request, theirs=SID)
    (connect,) = upstream_settings(upstream).of(h2.events.RequestReceived)
    assert connect.headers == [
        (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
        (b":path", b"/chat?room=1"), (b":authority", b"chat.test:8443"),
        (b"sec-websocket-version", b"13"), (b"origin", b"https://chat.test"),
    ]
    upstream.peer.send_headers(connect.stream_id, [(b":status", b"200"), (b"sec-websocket-extensions", b"permessage-deflate")])
    headers, end = upstream.from_peer().http
    assert (headers.response.status_code, headers.response.headers.fields) == (200, ((b"sec-websocket-extensions", b"permessage-deflate"),))
    out = client(headers, end)
    (response,) = out.of(h2.events.ResponseReceived, SID)
    assert response.headers == [(b":status", b"200"), (b"sec-websocket-extensions", b"permessage-deflate")]


def test_early_client_data_goes_upstream_in_whole_messages_once_the_connect_is_out():
    """Some servers answer a WebSocket CONNECT only after its first message:
    kept back until the status, that message would stall the handshake. So
    once the upstream has the CONNECT, early data goes straight there, but
    only in whole frames (mitmproxy's WebSocket layer must start at a frame
    boundary), and what went that way is not handed over again after the 2xx."""
    client, upstream, request, up_sid = bridged()
    first, second = masked_text("hello"), masked_text("second")
    client.peer.send_data(SID, first[:4])
    out = client.from_peer()
    assert not out.relayed and not out.http  # half a frame: kept
    client.peer.send_data(SID, first[4:] + second[:3])
    out = client.from_peer()
    assert [(type(cmd.event), cmd.event.stream_id, cmd.event.data) for cmd in out.relayed] == [(http_layers.RequestData, SID, first)]
    assert [e.data for e in relay(upstream, out).of(h2.events.DataReceived, up_sid)] == [first]

    headers, end = answered(upstream, up_sid).http
    assert [(opcode, payload) for opcode, payload, _ in facts_of(request).early_messages] == [(1, b"hello")]
    out = client(headers, end)
    assert status_of(out.of(h2.events.ResponseReceived, SID)[0]) == 200
    # Only the part that never went upstream is handed to the WebSocket layer.
    assert [(type(e), e.data) for e in out.http] == [(http_layers.RequestData, second[:3])]


def test_early_data_sent_before_the_upstreams_settings_follows_the_held_connect():
    """The client's first message may come while the upstream codec still
    holds the CONNECT for the server's SETTINGS: it is kept, and its whole
    messages go out right behind the CONNECT when that is sent (a server that
    waits for them is not kept waiting); an unfinished frame stays for the
    WebSocket layer."""
    client, upstream, request = held_for_settings()
    message, rest = masked_text("first"), masked_text("rest")
    client.peer.send_data(SID, message + rest[:3])
    out = client.from_peer()
    assert not out.relayed and not out.http
    out = upstream_settings(upstream)
    (connect,) = out.of(h2.events.RequestReceived)
    assert [e.data for e in out.of(h2.events.DataReceived, connect.stream_id)] == [message]
    out = client(*answered(upstream, connect.stream_id).http)
    assert [(type(e), e.data) for e in out.http] == [(http_layers.RequestData, rest[:3])]
    assert [(opcode, payload) for opcode, payload, _ in facts_of(request).early_messages] == [(1, b"first")]


def early_record(*frames: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Frames a browser sends before the status, through both codecs to an
    HTTP/2 upstream that then answers 200: what the upstream got, and the
    messages the flow's record says went that way."""
    client, upstream, request, up_sid = bridged()
    client.peer.send_data(SID, b"".join(frames))
    got = b"".join(e.data for e in relay(upstream, client.from_peer()).of(h2.events.DataReceived, up_sid))
    answered(upstream, up_sid)
    return got, [(opcode, payload) for opcode, payload, _ in facts_of(request).early_messages]


def test_an_early_message_in_fragments_is_recorded_whole_without_the_control_frames_between():
    """RFC 6455 section 5.4: a message may come in fragments, with control
    frames between them; the record has each message once, whole."""
    frames = FrameProtocol(client=True, extensions=[])
    sent = [bytes(f) for f in (
        frames.send_data("hello ", fin=False), frames.ping(b"?"),
        frames.send_data("world", fin=True), frames.send_data(b"\x01\x02", fin=True),
    )]
    got, record = early_record(*sent)
    assert got == b"".join(sent)
    assert record == [(1, b"hello world"), (2, b"\x01\x02")]


def test_early_frames_the_record_cannot_parse_still_go_upstream_as_they_were():
    """The record parses what went upstream, but the bytes are the client's:
    an unmasked frame (RFC 6455 section 5.1: the server must fail that
    WebSocket, which is the upstream's call) goes as it came, and only the
    record stops at it."""
    first = masked_text("first")
    unmasked = bytes(FrameProtocol(client=False, extensions=[]).send_data("unmasked", fin=True))
    got, record = early_record(first, unmasked)
    assert got == first + unmasked
    assert record == [(1, b"first")]


def http1_required_after_early_data() -> tuple[Driven, Driven, http.Request, bytes]:
    """A bridged CONNECT that got one early message, then HTTP_1_1_REQUIRED:
    the stream is about to retry over HTTP/1.1."""
    client, upstream, request, up_sid = bridged()
    first = masked_text("one")
    client.peer.send_data(SID, first)
    relay(upstream, client.from_peer())
    upstream.peer.reset_stream(up_sid, h2.errors.ErrorCodes.HTTP_1_1_REQUIRED)
    assert [type(e) for e in upstream.from_peer().http] == [common.NeedsHttp1]
    return client, upstream, request, first


def test_early_data_relayed_to_a_connect_reset_with_http_1_1_required_is_kept_for_http1():
    """When the HTTP/2 upstream turns the CONNECT down with HTTP_1_1_REQUIRED,
    the WebSocket moves to an HTTP/1.1 connection, and the messages that had
    gone to the HTTP/2 stream must reach that one too, first and in order."""
    client, _, request, first = http1_required_after_early_data()
    second = masked_text("two")
    client.peer.send_data(SID, second)
    out = client.from_peer()
    assert not out.relayed and not out.http  # no HTTP/2 stream to go to now: kept
    # The stream's retry over HTTP/1.1 comes back as a 200 (its codec's translation).
    out = client(http_layers.ResponseHeaders(SID, opened(), end_stream=False), http_layers.ResponseEndOfMessage(SID))
    assert [(type(e), e.data) for e in out.http] == [(http_layers.RequestData, first + second)]


def refused_with_502(client: Driven, error: http_layers.ResponseProtocolError) -> None:
    """The stream passes an upstream failure on to the client codec before the
    status: the client gets a 502 on that stream alone, none of its early data
    goes anywhere, and the connection carries the next WebSocket."""
    out = client(error)
    (response,) = out.of(h2.events.ResponseReceived, SID)
    assert status_of(response) == 502 and out.of(h2.events.StreamEnded, SID)
    assert not out.http and not out.relayed
    assert SID not in client.codec.websockets
    assert [type(e) for e in open_extended_connect(client, sid=3).http] == [http_layers.RequestHeaders, http_layers.RequestEndOfMessage]


def test_a_fallback_connection_that_cannot_be_made_fails_the_handshake_with_502():
    """After HTTP_1_1_REQUIRED the stream asks for an HTTP/1.1 connection;
    when that cannot be made, the stream fails the request
    (WsHttpStream._connect) and the waiting client hears it as a status."""
    client, _, _, _ = http1_required_after_early_data()
    refused_with_502(client, common.response_error(SID, "Connect call failed ('127.0.0.1', 443)"))


def test_the_upstream_closing_under_a_connect_with_early_data_keeps_later_data_off_it():
    """The upstream connection goes away while the CONNECT waits for its
    status, after early data went to it: the stream hears the handshake fail;
    what the client sends next is kept, not relayed to a connection that is
    gone, and nothing is recorded as having reached the upstream."""
    client, upstream, request, up_sid = bridged()
    client.peer.send_data(SID, masked_text("one"))
    relay(upstream, client.from_peer())
    failed = upstream(events.ConnectionClosed(upstream.conn)).http
    assert [(type(e), e.stream_id) for e in failed] == [(http_layers.ResponseProtocolError, SID)]
    client.peer.send_data(SID, masked_text("two"))
    out = client.from_peer()
    assert not out.relayed and not out.http
    assert not facts_of(request).early_messages
    refused_with_502(client, *failed)


# -- what a finished WebSocket leaves in a codec --------------------------------

def test_a_websocket_the_client_half_closes_first_leaves_nothing_in_the_client_codec():
    """A long-lived HTTP/2 connection carries WebSocket after WebSocket; what
    the codec keeps of each must go when both sides have ended, whichever
    ended first."""
    side = client_side()
    upgraded_client(side)
    side.peer.end_stream(SID)  # the client's orderly close comes first
    assert http_layers.RequestEndOfMessage in [type(e) for e in side.from_peer().http]
    out = side(passthrough_close(http_layers.ResponseProtocolError, SID))
    assert out.of(h2.events.StreamEnded, SID)  # the stream is now closed both ways
    assert SID not in side.codec.websockets


def test_a_websocket_the_upstream_half_closes_first_leaves_nothing_in_the_upstream_codec():
    """The same on the upstream connection, which many clients' WebSockets share."""
    side = upstream_side()
    accepted(side)
    side.peer.end_stream(1)  # the server's orderly close comes first
    assert http_layers.ResponseEndOfMessage in [type(e) for e in side.from_peer().http]
    out = side(passthrough_close(http_layers.RequestProtocolError, THEIRS))
    assert out.of(h2.events.StreamEnded, 1)
    assert 1 not in side.codec.websockets


def test_a_websocket_the_proxy_half_closes_first_leaves_nothing_in_either_codec():
    """The other order, for contrast: the peer's END_STREAM comes last and
    releases the stream (as stock mitmproxy releases an ordinary request)."""
    client = client_side()
    upgraded_client(client)
    client(passthrough_close(http_layers.ResponseProtocolError, SID))
    client.peer.end_stream(SID)
    assert http_layers.RequestEndOfMessage in [type(e) for e in client.from_peer().http]
    assert SID not in client.codec.websockets
    assert not client(events.ConnectionClosed(client.conn)).http
    upstream = upstream_side()
    accepted(upstream)
    upstream(passthrough_close(http_layers.RequestProtocolError, THEIRS))
    upstream.peer.end_stream(1)
    assert http_layers.ResponseEndOfMessage in [type(e) for e in upstream.from_peer().http]
    assert 1 not in upstream.codec.websockets
    assert not upstream(events.ConnectionClosed(upstream.conn)).http


# -- a peer that does not read: the send-buffer cap (common.Backlog) -------


@dataclass
class OpenWebSocket:
    """A codec with one WebSocket up, seen from its stream."""

    side: Driven
    request: http.Request
    sid: int  # the stream's id, as the stream and the codec's events name it
    peer_sid: int  # the same stream on the wire
    send: type  # what the stream sends the codec: data for the peer
    peer_leaving: type  # what the stream hears when that peer goes away

    def window(self) -> int:
        """How much the peer's flow-control windows let the codec send now."""
        return self.side.codec.h2_conn.local_flow_control_window(self.peer_sid)

    def sent(self, data: bytes) -> Out:
        return self.side(self.send(self.sid, data))

    def peer_reads(self, out: Out) -> Out:
        """The peer takes in the data it got, and says so (WINDOW_UPDATE)."""
        for event in out.of(h2.events.DataReceived, self.peer_sid):
            self.side.peer.acknowledge_received_data(event.flow_controlled_length, self.peer_sid)
        return self.side.from_peer()


def open_client_websocket() -> OpenWebSocket:
    side = client_side()
    return OpenWebSocket(side, upgraded_client(side), SID, SID, http_layers.ResponseData, http_layers.RequestEndOfMessage)


def open_upstream_websocket() -> OpenWebSocket:
    side = upstream_side()
    request, _ = accepted(side)
    return OpenWebSocket(side, request, THEIRS, 1, http_layers.RequestData, http_layers.ResponseEndOfMessage)


EITHER_SIDE = pytest.mark.parametrize("open_websocket", [open_client_websocket, open_upstream_websocket], ids=["client", "upstream"])


def data_length(out: Out, sid: int) -> int:
    return sum(len(e.data) for e in out.of(h2.events.DataReceived, sid))


def at_the_cap(ws: OpenWebSocket) -> Out:
    """As much as the peer's window takes, and MAX_BUFFERED_BYTES more, which wait."""
    window = ws.window()
    out = ws.sent(bytes(window + common.MAX_BUFFERED_BYTES))
    assert data_length(out, ws.peer_sid) == window
    assert not out.of(h2.events.StreamReset) and not out.wakeups  # at the cap: kept
    return out


@EITHER_SIDE
def test_a_peer_that_does_not_read_gets_its_websocket_stream_reset_past_the_send_buffer_cap(open_websocket):
    """mitmproxy buffers whatever the peer's window does not take, without
    bound, and acknowledges the other side's DATA as it comes: toward a peer
    that does not read, nothing holds the sender back. Up to
    MAX_BUFFERED_BYTES may wait; one byte more resets that stream with CANCEL,
    and what waited is dropped. The stream hears its peer leave only on the
    next turn of the event loop (a Wakeup), since it is sending when this
    happens and mitmproxy's WebSocket layer is not re-entrant."""
    ws = open_websocket()
    at_the_cap(ws)
    out = ws.sent(b"\0")
    assert [(e.stream_id, e.error_code) for e in out.of(h2.events.StreamReset)] == [(ws.peer_sid, h2.errors.ErrorCodes.CANCEL)]
    assert not out.http and not out.closed
    (wakeup,) = out.wakeups
    assert wakeup.delay == 0
    assert "does not read" in facts_of(ws.request).ended_by_proxy
    out = ws.side(events.Wakeup(wakeup))
    assert [(type(e), e.stream_id) for e in out.http] == [(ws.peer_leaving, ws.sid)]
    assert not ws.sent(b"late").peer  # what the stream still sends goes nowhere
    assert not ws.side.codec.backlog.buffers.get(ws.peer_sid)


@EITHER_SIDE
def test_what_a_reading_peer_takes_no_longer_counts_toward_the_send_buffer_cap(open_websocket):
    """The cap is on bytes waiting, not bytes sent: when the peer reads, its
    WINDOW_UPDATEs let buffered bytes go, and as many again may wait."""
    ws = open_websocket()
    freed = data_length(ws.peer_reads(at_the_cap(ws)), ws.peer_sid)  # what the new window took from the buffer
    assert freed > 0
    assert not ws.sent(bytes(freed)).of(h2.events.StreamReset)  # back at the cap
    assert ws.sent(b"\0").of(h2.events.StreamReset)


@EITHER_SIDE
def test_a_peer_closing_before_the_stream_hears_of_its_reset_still_ends_the_websocket(open_websocket):
    """The deferred end must not be lost when the peer's connection goes
    away on the same turn of the event loop (a closed codec takes no
    Wakeup): the other side's WebSocket would stay open, its messages going
    nowhere, until that side leaves."""
    ws = open_websocket()
    at_the_cap(ws)
    (wakeup,) = ws.sent(b"\0").wakeups
    heard = ws.side(events.ConnectionClosed(ws.side.conn)).http + ws.side(events.Wakeup(wakeup)).http
    assert [(type(e), e.stream_id) for e in heard] == [(ws.peer_leaving, ws.sid)]


# -- the client side's phases (extconnect.CLIENT_TRANSITIONS) -----------------


@given(st.lists(st.sampled_from(list(extconnect.RouteStep)), max_size=6))
def test_a_handshakes_route_upstream_moves_only_as_its_table_says(steps):
    """One retry over HTTP/1.1, and only before the upstream switched protocols."""
    stream = types.SimpleNamespace(ws_route=extconnect.Route.FIRST)
    retries = 0
    for step in steps:
        before = stream.ws_route
        took = WsHttpStream.ws_step(stream, step)
        assert stream.ws_route is extconnect.ROUTE_TRANSITIONS.get((before, step), before)
        assert took is ((before, step) in extconnect.ROUTE_TRANSITIONS)
        retries += took and step is extconnect.RouteStep.NEEDS_HTTP1
    assert retries <= 1


@given(st.lists(st.sampled_from(list(extconnect.ClientStep)), max_size=12))
def test_the_client_side_moves_only_as_its_table_says(steps):
    ws = extconnect.ClientSideStream(StreamFacts())
    ws.facts.waiting_client = ws
    for step in steps:
        before = ws.phase
        if step is extconnect.ClientStep.UPSTREAM_HAS_CONNECT:
            took = ws.relay_to(object(), 1) is not None  # as the upstream codec takes that step
        else:
            took = ws.step(step)
        assert ws.phase is extconnect.CLIENT_TRANSITIONS.get((before, step), before)
        assert took is ((before, step) in extconnect.CLIENT_TRANSITIONS)
        # A relay target only while relaying, and the upstream finds the client side until the status.
        assert (ws.relay is not None) is (ws.phase is extconnect.ClientPhase.RELAYING)
        assert (ws.facts.waiting_client is ws) is ws.phase.before_status


def test_what_was_relayed_goes_back_when_the_upstream_fails_and_is_recorded_when_it_answers():
    ws = extconnect.ClientSideStream(StreamFacts())
    first, second = masked_text("first"), masked_text("second")
    assert ws.relay_to(object(), 1) == b""
    assert ws.take(first) == first  # relayed whole
    assert ws.take(second[:3]) == b""  # kept until whole
    ws.early += second[3:]
    assert ws.step(extconnect.ClientStep.UPSTREAM_FAILED)
    assert ws.phase is extconnect.ClientPhase.WAITING and bytes(ws.early) == first + second and not ws.relayed
    assert ws.relay_to(object(), 3) == first + second
    assert ws.step(extconnect.ClientStep.UPSTREAM_ANSWERED)
    assert [(opcode, payload) for opcode, payload, _ in ws.facts.early_messages] == [(1, b"first"), (1, b"second")]
    assert not ws.relayed and ws.relay is None
    assert not ws.step(extconnect.ClientStep.UPSTREAM_ANSWERED)  # a second answer changes nothing
    assert ws.step(extconnect.ClientStep.STATUS_SENT) and ws.is_open


def test_a_handshake_the_client_side_fails_while_waiting_leaves_nothing_in_the_upstream_codec():
    """The client resets its stream, or sends trailers on it, before the
    status: the stream sends the upstream codec an error, which resets the
    CONNECT; no h2 event comes for that stream afterwards, so the codec kept
    it until its connection closed."""
    side = upstream_side()
    connect_sent(side)
    out = side(http_layers.RequestProtocolError(THEIRS, "trailers on a WebSocket stream", http_layers.RequestProtocolError.code))
    assert out.of(h2.events.StreamReset, 1)
    assert 1 not in side.codec.websockets
