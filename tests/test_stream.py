"""The bridge's HTTP stream (`WsHttpStream`) driven through mitmproxy's real
`HttpStream` code, event by event, with no socket (`streamplay`).

The test plays the codecs on either side of the stream: the client's hands
it what the bridge's HTTP/2 codec makes of an extended CONNECT (RFC 8441
section 4: CONNECT with `:protocol`, ended at its headers), the upstream's a
status, WebSocket bytes and ends, as the bridge's upstream codecs do. What
the stream sends them, and which hooks it runs with which form of the flow,
is what these tests check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import connection, http
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import websocket
from streamplay import (
    SID, StreamPlay, client_request, extended_connect, from_client, open_server, side, status_from_upstream, steps,
)
from wsproto.frame_protocol import FrameProtocol, Opcode

from wsencode.bridge.common import NEEDS_HTTP1, NeedsHttp1, is_passthrough_close, request_error, response_error
from wsencode.bridge.stream import WebSocketAddress, is_websocket_address
from wsencode.core.extconnect import accept_for
from wsencode.core.streamfacts import CLIENT, CONNECTING, FORWARDED, UPSTREAM, facts_of

PROTOCOL_FIELD = (b":protocol", b"websocket")
KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 section 1.3's
# What the stream yields when a status opens the WebSocket: mitmproxy's
# send_response (the response hook, then the headers) and flow_done (the
# WebSocket layer starts before the response's end goes out).
OPENING = ["hook responseheaders", "hook response", "ResponseHeaders to client", "hook websocket_start",
           "ResponseEndOfMessage to client"]


# -- WebSocket frames (RFC 6455 section 5) ---------------------------------------


def text_frame(text: str, client: bool = True) -> bytes:
    """A text message in one frame, as the client (masked) or the server sends it."""
    return bytes(FrameProtocol(client=client, extensions=[]).send_data(text, fin=True))


def close_frame(code: int = 1000, client: bool = True) -> bytes:
    return bytes(FrameProtocol(client=client, extensions=[]).close(code, "bye"))


def read_as_server(data: bytes) -> list[tuple[Opcode, object]]:
    """The frames a server reads in `data` (what the proxy sent it as the client)."""
    frames = FrameProtocol(client=False, extensions=[])
    frames.receive_bytes(data)
    return [(frame.opcode, frame.payload) for frame in frames.received_frames()]


# -- a handshake, step by step ---------------------------------------------------


def forwarded(play: StreamPlay | None = None) -> StreamPlay:
    """A browser's extended CONNECT through its request hook and on its way
    upstream: the stream waits for the status."""
    play = play or StreamPlay()
    play(*from_client(extended_connect()))
    play.connect()
    return play


def websocket_open() -> StreamPlay:
    """The same, answered 200 upstream: mitmproxy's WebSocket layer has the stream."""
    play = forwarded()
    assert steps(play(*status_from_upstream(200))) == OPENING
    return play


def the_one(kind: type, sent: list[http_layers.HttpEvent]):
    (event,) = [e for e in sent if isinstance(e, kind)]
    return event


# -- one form from the first hook to the last ----------------------------------------


def test_every_hook_of_an_extended_connect_sees_the_connect_and_then_its_2xx():
    """RFC 8441 section 4: a request, not a tunnel; no http_connect or
    http_connected hook, and no GET or 101 made up for mitmproxy's sake."""
    play = websocket_open()
    play(http_layers.RequestData(SID, text_frame("hello")))
    play(http_layers.RequestData(SID, close_frame()))
    assert [(h.name, h.method, h.first_field, h.status) for h in play.hooks] == [
        ("requestheaders", "CONNECT", PROTOCOL_FIELD, None),
        ("request", "CONNECT", PROTOCOL_FIELD, None),
        ("responseheaders", "CONNECT", PROTOCOL_FIELD, 200),
        ("response", "CONNECT", PROTOCOL_FIELD, 200),
        ("websocket_start", "CONNECT", PROTOCOL_FIELD, 200),
        ("websocket_message", "CONNECT", PROTOCOL_FIELD, 200),
        ("websocket_end", "CONNECT", PROTOCOL_FIELD, 200),
    ]
    assert play.stream.flow.request.path == "/chat"


def test_an_extended_connect_goes_upstream_after_its_request_hook_on_a_connection_marked_as_a_websockets():
    play = StreamPlay()
    request = extended_connect()
    assert steps(play(*from_client(request))) == ["hook requestheaders", "hook request", "GetWebSocketConnection"]
    asked = play.waiting
    assert asked.address == ("chat.test", 443) and asked.tls
    assert is_websocket_address(asked.address)  # past mitmproxy's per-server throttle
    # An HTTP/1.1 connection another request holds is never reused for it; a multiplexed one may be.
    held = open_server(("chat.test", 443), alpn=b"http/1.1")
    assert not asked.connection_spec_matches(held) and asked.connection_spec_matches(open_server(("chat.test", 443)))
    assert facts_of(request).stage == CONNECTING and facts_of(request).forwarded_at is None

    upstream = open_server(("chat.test", 443))
    out = play.connect(upstream)
    assert steps(out) == ["RequestHeaders to server", "RequestEndOfMessage to server"]
    assert out[0].event.request is request and out[0].connection is upstream
    assert play.stream.flow.server_conn is upstream
    assert facts_of(request).stage == FORWARDED and facts_of(request).forwarded_at is not None


def finished(server: connection.Server) -> connection.Server:
    server.timestamp_end = time.time()  # as mitmproxy sets it after a connection's last event
    return server


def test_asking_for_a_connection_forgets_the_websockets_connections_that_are_closed():
    """mitmproxy's HTTP layer keeps every connection it made until the
    client's goes away; a WebSocket's serves nothing else once it is closed."""
    play = StreamPlay()
    closed = finished(open_server(WebSocketAddress(("old.test", 443)), alpn=b"http/1.1"))
    in_use = open_server(WebSocketAddress(("live.test", 443)), alpn=b"http/1.1")
    ordinary = finished(open_server(("plain.test", 443)))
    play.http_layer.connections.update({closed: None, in_use: None, ordinary: None})
    play(*from_client(extended_connect()))
    assert list(play.http_layer.connections) == [play.context.client, in_use, ordinary]


# -- a 2xx opens the WebSocket ------------------------------------------------------------


def test_a_2xx_hands_the_stream_to_mitmproxys_websocket_layer_before_the_response_hook():
    """mitmproxy sets flow.websocket just before the response hook for a
    101; addons tell a WebSocket by it, so a 2xx that opens one does the same."""
    play = forwarded()
    out = play(*status_from_upstream(200, (b"sec-websocket-protocol", b"chat")))
    assert steps(out) == OPENING
    assert [(h.name, h.websocket) for h in play.hooks[2:]] == [
        ("responseheaders", False), ("response", True), ("websocket_start", True)]
    assert isinstance(play.stream.child_layer, websocket.WebsocketLayer)
    headers = the_one(http_layers.ResponseHeaders, play.sent(out, "client"))
    assert headers.response.status_code == 200


def test_websocket_messages_travel_on_the_stream_both_ways():
    """RFC 8441 section 5: the WebSocket's bytes are the CONNECT stream's
    DATA; mitmproxy's passthrough would send the server's side as raw
    connection data after a CONNECT (a tunnel's own connection)."""
    play = websocket_open()
    out = play(http_layers.RequestData(SID, text_frame("hello")))
    assert steps(out) == ["hook websocket_message", "RequestData to server"]
    assert read_as_server(out[1].event.data) == [(Opcode.TEXT, "hello")]
    out = play(http_layers.ResponseData(SID, text_frame("hi", client=False)))
    assert steps(out) == ["hook websocket_message", "ResponseData to client"]
    assert [(m.from_client, m.content) for m in play.stream.flow.websocket.messages] == [(True, b"hello"), (False, b"hi")]
    assert not any(isinstance(c, commands.SendData) for c in out)


ENDS = {
    "the client's close": http_layers.RequestData(SID, close_frame()),
    "the client's end of stream": http_layers.RequestEndOfMessage(SID),
    "the server's close": http_layers.ResponseData(SID, close_frame(1001, client=False)),
    "the server's end of stream": http_layers.ResponseEndOfMessage(SID),
}


@pytest.mark.parametrize("end", ENDS.values(), ids=ENDS.keys())
def test_however_the_websocket_ends_both_sides_get_the_passthrough_close_and_the_stream_is_dropped(end):
    """When mitmproxy's WebSocket layer closes the server's side it goes on
    the stream, as the close of a 101's upgraded stream does; once the
    WebSocket is over the HTTP layer may forget the stream (mitmproxy drops
    a stream only when its flow ends without an upgrade)."""
    play = websocket_open()
    out = play(end)
    closes = [e for e in play.sent(out, "server") + play.sent(out, "client") if is_passthrough_close(e)]
    assert [type(e) for e in closes] == [http_layers.RequestProtocolError, http_layers.ResponseProtocolError]
    assert steps(out)[-2:] == ["hook websocket_end", "DropStream"]
    assert not any(isinstance(c, (commands.SendData, commands.CloseConnection)) for c in out)
    assert not play.stream.flow.live


def test_the_close_the_client_sent_reaches_the_server_before_its_side_is_closed():
    play = websocket_open()
    out = play(http_layers.RequestData(SID, close_frame(1000)))
    close, end = play.sent(out, "server")
    assert read_as_server(close.data) == [(Opcode.CLOSE, (1000, "bye"))]
    assert is_passthrough_close(end)


# -- a status that does not open it ------------------------------------------------------------


def test_a_refusal_reaches_the_client_as_an_ordinary_response_and_the_stream_is_dropped():
    play = forwarded()
    out = play(*status_from_upstream(403, (b"content-type", b"text/plain"), body=b"no\n"))
    assert steps(out) == ["hook responseheaders", "hook response", "ResponseHeaders to client",
                          "ResponseData to client", "DropStream", "ResponseEndOfMessage to client"]
    assert [(h.name, h.status, h.websocket) for h in play.hooks[2:]] == [("responseheaders", 403, False), ("response", 403, False)]
    assert play.stream.child_layer is None and play.stream.flow.websocket is None and not play.stream.flow.live
    assert not play.sent(out, "server")  # the upstream's codec ended the CONNECT with its refusal


class AddonAt:
    """An addon that does one thing to the flow in one hook."""

    def __init__(self, hook: str, act: Callable[[http.HTTPFlow], None]) -> None:
        setattr(self, hook, act)


def forbid(flow: http.HTTPFlow) -> None:
    flow.response.status_code = 403


def kill(flow: http.HTTPFlow) -> None:
    flow.kill()


@pytest.mark.parametrize("hook", ["responseheaders", "response"])
def test_an_addon_failing_the_2xx_gets_its_status_to_the_client_and_the_upstream_stream_an_error(hook):
    """The upstream has a WebSocket open on its stream that nothing will
    use: it must hear that the handshake failed, or the stream stays open
    until its connection closes."""
    play = forwarded(StreamPlay(addon=AddonAt(hook, forbid)))
    out = play(*status_from_upstream(200))
    assert "hook websocket_start" not in steps(out) and play.stream.flow.websocket is None
    assert the_one(http_layers.ResponseHeaders, play.sent(out, "client")).response.status_code == 403
    error = the_one(http_layers.RequestProtocolError, play.sent(out, "server"))
    assert not is_passthrough_close(error)
    assert steps(out)[-3:] == ["DropStream", "ResponseEndOfMessage to client", "RequestProtocolError to server"]


def killed_in(hook: str, how: str) -> tuple[StreamPlay, list[commands.Command]]:
    """An accepted 2xx whose flow dies in `hook`: an addon kills it, or the
    client resets its stream while the hook runs (mitmproxy's check_killed
    finds the reset queued behind the hook)."""
    if how == "an addon kills the flow":
        play = forwarded(StreamPlay(addon=AddonAt(hook, kill)))
        return play, play(*status_from_upstream(200))
    play = forwarded(StreamPlay(hold=frozenset({hook})))
    play(*status_from_upstream(200))
    play(request_error(SID, "stream reset by client (CANCEL)"))
    return play, play.answer()


@pytest.mark.parametrize("how", ["an addon kills the flow", "the client resets while the hook runs"])
@pytest.mark.parametrize("hook", ["responseheaders", "response"])
def test_a_2xx_that_dies_in_a_hook_ends_the_upstream_stream(hook, how):
    play, out = killed_in(hook, how)
    assert the_one(http_layers.ResponseProtocolError, play.sent(out, "client")).message == "killed"
    assert play.stream.child_layer is None
    assert [type(e) for e in play.sent(out, "server")] == [http_layers.RequestProtocolError]


# -- which side ended it ---------------------------------------------------------------------------


def test_a_client_reset_while_waiting_is_passed_upstream_and_noted_as_the_clients():
    play = forwarded()
    out = play(request_error(SID, "stream reset by client (CANCEL)"))
    assert steps(out) == ["RequestProtocolError to server", "hook error", "DropStream"]
    assert facts_of(play.stream.flow.request).ended_by == CLIENT


def test_an_upstream_reset_while_waiting_reaches_the_client_and_is_noted_as_the_upstreams():
    play = forwarded()
    out = play(response_error(SID, "stream reset by server (REFUSED_STREAM)"))
    assert steps(out) == ["hook error", "ResponseProtocolError to client", "DropStream"]
    assert facts_of(play.stream.flow.request).ended_by == UPSTREAM


# -- an HTTP/2 upstream without RFC 8441 --------------------------------------------------------


def test_needs_http1_moves_the_same_request_to_an_http1_only_connection():
    """Browsers retry a WebSocket over HTTP/1.1 when an HTTP/2 server does
    not offer it (RFC 8441 section 3) or answers HTTP_1_1_REQUIRED (RFC 9113
    section 7); the upstream's codec asks for it, the stream does it."""
    play = forwarded()
    request = play.stream.flow.request
    out = play(NeedsHttp1.on(SID))
    assert steps(out) == ["GetHttp1Connection"]
    assert getattr(play.waiting.address, "ws_encode_alpn", None) == (b"http/1.1",) and play.waiting.address == ("chat.test", 443)
    assert facts_of(request).stage == CONNECTING and facts_of(request).ended_by is None  # not an end
    assert (logging.INFO, NEEDS_HTTP1 + " (chat.test)") in play.logs

    http1 = open_server(("chat.test", 443), alpn=b"http/1.1")
    out = play.connect(http1)
    assert steps(out) == ["RequestHeaders to server", "RequestEndOfMessage to server"]
    assert out[0].event.request is request and out[0].connection is http1
    assert facts_of(request).stage == FORWARDED
    assert steps(play(*status_from_upstream(200))) == OPENING  # (the HTTP/1.1 codec's 101, as the 2xx)


def test_a_fallback_that_negotiates_http2_again_fails_the_handshake_instead_of_retrying_forever():
    play = forwarded()
    play(NeedsHttp1.on(SID))
    play.connect(open_server(("chat.test", 443), alpn=b"http/1.1"))
    out = play(NeedsHttp1.on(SID))
    assert steps(out) == ["hook error", "ResponseProtocolError to client", "DropStream"]
    assert "negotiated HTTP/2 again" in out[1].event.message


# -- transparent and reverse modes ------------------------------------------------------------------


@pytest.mark.parametrize("proxy_mode", ["transparent", "reverse:https://upstream.test:8443"])
def test_in_transparent_and_reverse_modes_an_extended_connect_goes_to_the_server_address(proxy_mode):
    """mitmproxy refuses a CONNECT outside regular and upstream modes
    (validate_request: a misconfigured client's tunnel); an extended CONNECT
    is a request, and goes where any request goes in those modes."""
    play = StreamPlay(proxy_mode=proxy_mode)
    out = play(*from_client(extended_connect()))
    assert steps(out) == ["hook requestheaders", "hook request", "GetWebSocketConnection"]
    assert play.waiting.address == play.context.server.address
    assert (play.stream.flow.request.host, play.stream.flow.request.port) == play.context.server.address


@pytest.mark.parametrize("proxy_mode", ["regular", "transparent", "reverse:https://upstream.test:8443"])
def test_an_invalid_header_name_is_still_refused(proxy_mode):
    """The rest of mitmproxy's request checks still apply (its
    validate_headers, against request smuggling); only `:protocol` is let
    through as a header name."""
    play = StreamPlay(proxy_mode=proxy_mode)
    out = play(*from_client(extended_connect((b"bad name", b"x"))))
    assert steps(out) == ["hook requestheaders", "hook error", "ResponseProtocolError to client"]
    assert "invalid header name" in out[-1].event.message


# -- HTTP/1.1 upgrades are mitmproxy's -----------------------------------------------------------


def upgrade() -> StreamPlay:
    """An HTTP/1.1 client's WebSocket upgrade (RFC 6455 section 4.1), on its way upstream."""
    play = StreamPlay(alpn=b"http/1.1")
    play(*from_client(client_request(b"GET", [
        (b"host", b"chat.test"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-key", KEY.encode()), (b"sec-websocket-version", b"13"),
    ], version=b"HTTP/1.1")))
    play.connect()
    return play


def test_an_http1_upgrade_answered_101_is_mitmproxys_own_websocket():
    play = upgrade()
    out = play(*status_from_upstream(101, (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
                                     (b"sec-websocket-accept", accept_for(KEY).encode())))
    assert steps(out) == OPENING
    assert [(h.name, h.method, h.status) for h in play.hooks[-3:]] == [
        ("responseheaders", "GET", 101), ("response", "GET", 101), ("websocket_start", "GET", 101)]
    out = play(http_layers.RequestData(SID, text_frame("hello")))
    assert steps(out) == ["hook websocket_message", "RequestData to server"]
    out = play(http_layers.RequestData(SID, close_frame()))
    assert steps(out)[-2:] == ["hook websocket_end", "DropStream"]


def test_an_http1_upgrade_answered_200_is_an_ordinary_response():
    """Only an extended CONNECT opens a WebSocket with a 2xx."""
    play = upgrade()
    out = play(*status_from_upstream(200, body=b"hello\n"))
    assert "hook websocket_start" not in steps(out) and play.stream.flow.websocket is None
    assert "DropStream" in steps(out)


# -- any order of events around the status ---------------------------------------------------------


class Peers:
    """What the codecs on either side of the stream may hand it next, given
    what the stream has sent them (the bridge's codecs: the client's keeps
    its DATA until the 2xx has gone out, an upstream's status comes whole, a
    reset after the status reaches the stream as the peer going away, and a
    stream a codec got an error for is reset: nothing more comes from it)."""

    # Where a move leaves its side: (side, "open" or "gone").
    AFTER = {"client resets": ("client", "gone"), "client ends": ("client", "gone"),
             "upstream 200": ("server", "open"), "upstream 403": ("server", "gone"),
             "upstream resets": ("server", "gone"), "server ends": ("server", "gone")}

    def __init__(self) -> None:
        self.sides = {"client": "waiting", "server": "waiting"}  # for the status, "open", or "gone"
        self.retried = self.dropped = False

    def moves(self, play: StreamPlay) -> dict[str, tuple[events.Event, ...]]:
        if self.dropped:
            return {}  # the HTTP layer hands a dropped stream nothing more
        client, upstream = self.sides["client"], self.sides["server"]
        moves: dict[str, tuple[events.Event, ...]] = {}
        if play.waiting is not None:
            moves["answer"] = ()
        if isinstance(play.waiting, http_layers.GetHttpConnection):
            moves["no connection"] = ()
        if client == "waiting":
            moves["client resets"] = (request_error(SID, "stream reset by client"),)
        if client == "open":
            moves["client data"] = (http_layers.RequestData(SID, text_frame("c")),)
            moves["client close"] = (http_layers.RequestData(SID, close_frame()),)
            moves["client ends"] = (http_layers.RequestEndOfMessage(SID),)
        if upstream == "waiting" and not isinstance(play.waiting, http_layers.GetHttpConnection):
            moves["upstream 200"] = tuple(status_from_upstream(200))
            moves["upstream 403"] = tuple(status_from_upstream(403, body=b"no"))
            moves["upstream resets"] = (response_error(SID, "stream reset by server"),)
            if not self.retried:
                moves["needs HTTP/1.1"] = (NeedsHttp1.on(SID),)
        if upstream == "open":
            moves["server data"] = (http_layers.ResponseData(SID, text_frame("s", client=False)),)
            moves["server ends"] = (http_layers.ResponseEndOfMessage(SID),)
        return moves

    def took(self, move: str) -> None:
        if move in self.AFTER:
            who, state = self.AFTER[move]
            self.sides[who] = state
        self.retried |= move == "needs HTTP/1.1"

    def heard(self, play: StreamPlay, out: list[commands.Command]) -> None:
        for command in out:
            self.dropped |= isinstance(command, http_layers.DropStream)
            if isinstance(command, http_layers.SendHttp):
                self._sent(play, command.event, side(command.connection))

    def _sent(self, play: StreamPlay, event: http_layers.HttpEvent, to: str) -> None:
        failed = isinstance(event, (http_layers.RequestProtocolError, http_layers.ResponseProtocolError))
        if failed and not is_passthrough_close(event):
            self.sides[to] = "gone"
        elif to == "client" and isinstance(event, http_layers.ResponseEndOfMessage):
            # The end of the status: the client's codec hands on its DATA from now on, or ends the stream.
            self.sides[to] = "open" if play.stream.child_layer is not None else "gone"


def where(play: StreamPlay, peers: Peers) -> str:
    """The stream's state, by what it is doing, not by how it got there."""
    stream = play.stream
    if peers.dropped:
        return "dropped"
    if stream.child_layer is not None:
        return "websocket" if stream.flow.live else "finished websocket"
    if play.waiting is not None:
        return f"waiting for {type(play.waiting).__name__}"
    if stream.server_state == stream.state_wait_for_response_headers:
        return "waiting for the status"
    return repr(stream)


KNOWN = {"dropped", "websocket", "waiting for the status", "waiting for GetHttp1Connection",
         "waiting for HttpResponseHook"}


def check(play: StreamPlay, peers: Peers, out: list[commands.Command]) -> None:
    """What holds after every move: a state with a name, nothing written to
    a connection past its codec, every hook on the one form, and a WebSocket
    only after a 2xx."""
    state = where(play, peers)
    assert state in KNOWN
    assert not any(isinstance(c, (commands.SendData, commands.CloseConnection)) for c in out)
    assert all((h.method, h.first_field) == ("CONNECT", PROTOCOL_FIELD) for h in play.hooks)
    if state == "websocket":
        assert 200 <= play.stream.flow.response.status_code < 300 and play.stream.flow.websocket is not None


@given(st.data(), st.booleans())
def test_any_order_of_events_around_the_status_keeps_the_stream_in_a_known_state(data, hold_response):
    """Client resets and data, upstream statuses, resets and HTTP/1.1
    retries (whose connection may fail), in any order the codecs could hand them (and with the response
    hook held, so that they can also arrive while it runs): the stream never
    raises, and `check` holds after each; a finished WebSocket is dropped."""
    play = forwarded(StreamPlay(hold=frozenset({"response"}) if hold_response else frozenset()))
    peers = Peers()
    for _ in range(12):
        moves = peers.moves(play)
        if not moves:
            break
        move = data.draw(st.sampled_from(sorted(moves)))
        if move == "answer":
            out = play.connect() if isinstance(play.waiting, http_layers.GetHttpConnection) else play.answer()
        elif move == "no connection":
            out = play.answer((None, "Connect call failed"))
        else:
            peers.took(move)
            out = play(*moves[move])
        peers.heard(play, out)
        check(play, peers, out)
