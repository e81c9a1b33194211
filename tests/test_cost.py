"""What makes the addon cheap (issue 21) keeps what it promises: a shortcut
says what the long way says, and a stream handed back to mitmproxy does what
mitmproxy's own does."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mitmproxy import http
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.test import tutils
from streamplay import (
    SID, StreamPlay, client_request, from_client, open_server, status_from_upstream, steps,
)
from test_stream import KEY, close_frame, text_frame, websocket_open

from wsencode.bridge.common import _stock
from wsencode.core.extconnect import accept_for
from wsencode.mitm import flowview


# Authorities from the pieces that matter to mitmproxy's parse: hosts it
# takes and refuses (empty labels, characters a host may not have, IPv6
# brackets, non-ASCII), ports that are a scheme's default, have leading
# zeros, are too large or empty, and anything those pieces make together.
HOST_PIECES = ["a", "Z", "0", "9", ".", "-", "_", "[", "]", "::1", "@", " ", "\u00e9", "xn--", "*"]
PORTS = ["80", "443", "080", "0443", "8443", "1", "0", "65535", "65536", "99999", "123456", ""]
hosts = st.lists(st.sampled_from(HOST_PIECES), max_size=5).map("".join)
authorities = st.one_of(
    hosts,
    st.tuples(hosts, st.sampled_from(PORTS)).map(":".join),
    st.lists(st.sampled_from(HOST_PIECES + [":"] + PORTS), max_size=6).map("".join),
)
PATHS = ["/", "/chat?token=t", "*", "", "chat", "//x", "/a:b"]


@settings(max_examples=300)
@given(st.sampled_from(["http", "https", "ws", ""]), authorities, st.sampled_from(PATHS),
       st.sampled_from([b"HTTP/1.1", b"HTTP/2.0", b"HTTP/3"]))
@example("http", "a:80", "/", b"HTTP/1.1")  # a valid host drops its scheme's port, a refused one keeps it
@example("http", "a..b:80", "/", b"HTTP/1.1")
@example("https", "a:080", "/", b"HTTP/1.1")  # written with a leading zero, said without
@example("http", "[::1]:8080", "/", b"HTTP/1.1")
@example("http", "a:8080", "*", b"HTTP/2.0")  # mitmproxy 11 and 12 say the asterisk form differently
def test_a_handshakes_url_is_mitmproxys_pretty_url(scheme, authority, path, version):
    # url_of takes a shortcut for a plain authority; whatever it answers,
    # mitmproxy's pretty_url would have too.
    headers = http.Headers(host=authority) if authority else http.Headers()
    request = tutils.treq(method=b"GET", scheme=scheme.encode(), path=path.encode(), http_version=version,
                          authority=authority.encode("utf-8", "surrogateescape") if version != b"HTTP/1.1" else b"",
                          headers=headers)
    assert flowview.url_of(request) == request.pretty_url


# -- a stream with nothing for the bridge to do is mitmproxy's own ----------------------------------


STOCK_STREAM = _stock(http_layers.HttpStream)


def stock_play(**kwargs) -> StreamPlay:
    """A StreamPlay around mitmproxy's own HttpStream, to compare with."""
    play = StreamPlay(**kwargs)
    play.stream = STOCK_STREAM(play.context.fork(), SID)
    return play


def exchange(play: StreamPlay, request: http.Request, *response: http_layers.HttpEvent) -> list[str]:
    """The steps of a request and its response through `play`'s stream, on
    an upstream connection that speaks what the client does."""
    out = play(*from_client(request))
    out += play.connect(open_server(play.waiting.address, play.alpn))
    return steps(out + play(*response))


EVENT_STREAM_HEAD = [(b"content-type", b"text/event-stream")]
# (client ALPN, method, fields, version, status, response fields, body)
ORDINARY = {
    "HTTP/2 GET": (b"h2", b"GET", [(b"accept", b"*/*")], b"HTTP/2.0", 200, [], b"hello\n"),
    "HTTP/1.1 POST": (b"http/1.1", b"POST", [(b"host", b"chat.test")], b"HTTP/1.1", 404, [], b""),
    # an upgrade to something else is no WebSocket handshake
    "HTTP/1.1 h2c upgrade": (b"http/1.1", b"GET", [(b"host", b"chat.test"), (b"upgrade", b"h2c"),
                                                   (b"connection", b"Upgrade")], b"HTTP/1.1", 200, [], b"ok"),
}
EVENT_STREAMS = {
    "HTTP/2": (b"h2", b"GET", [(b"accept", b"text/event-stream")], b"HTTP/2.0", 200, EVENT_STREAM_HEAD,
               b"data: e\n\n"),
    "HTTP/1.1": (b"http/1.1", b"GET", [(b"host", b"chat.test"), (b"accept", b"text/html, text/event-stream")],
                 b"HTTP/1.1", 200, EVENT_STREAM_HEAD, b"data: e\n\n"),
}


def both_ways(case: tuple) -> tuple[StreamPlay, list[list[str]]]:
    """The bridge's play of `case`, and the steps of it and of mitmproxy's own stream."""
    alpn, method, fields, version, status, head, body = case
    bridged, stock = StreamPlay(alpn=alpn), stock_play(alpn=alpn)
    seen = [exchange(play, client_request(method, fields, version), *status_from_upstream(status, *head, body=body))
            for play in (bridged, stock)]
    assert [h.name for h in bridged.hooks] == [h.name for h in stock.hooks]
    return bridged, seen


@pytest.mark.parametrize("case", ORDINARY)
def test_a_request_that_opens_no_websocket_goes_on_as_mitmproxys_own_stream(case):
    # Once its headers are classified, the stream is mitmproxy's HttpStream
    # (no check of the bridge's on any later event), and what it does is what
    # mitmproxy's own stream does with the same events.
    bridged, seen = both_ways(ORDINARY[case])
    assert type(bridged.stream) is STOCK_STREAM
    assert seen[0] == seen[1] and "ResponseEndOfMessage to client" in seen[0]


@pytest.mark.parametrize("case", EVENT_STREAMS)
def test_an_event_stream_keeps_the_bridges_stream(case):
    # (which notes whose side an error came from, for the addon's record)
    bridged, seen = both_ways(EVENT_STREAMS[case])
    assert type(bridged.stream) is not STOCK_STREAM
    assert seen[0] == seen[1] and "ResponseEndOfMessage to client" in seen[0]


def http1_upgrade(play: StreamPlay) -> list[str]:
    """An HTTP/1.1 client's WebSocket on an HTTP/1.1 upstream connection:
    101, a message each way, the client's close."""
    request = client_request(b"GET", [
        (b"host", b"chat.test"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-key", KEY.encode()), (b"sec-websocket-version", b"13"),
    ], version=b"HTTP/1.1")
    out = exchange(play, request, *status_from_upstream(
        101, (b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
        (b"sec-websocket-accept", accept_for(KEY).encode())))
    out += steps(play(http_layers.RequestData(SID, text_frame("hello"))))
    out += steps(play(http_layers.ResponseData(SID, text_frame("hi", client=False))))
    return out + steps(play(http_layers.RequestData(SID, close_frame())))


def test_an_http1_websocket_on_an_http1_upstream_is_mitmproxys_own_from_its_101():
    bridged, stock = StreamPlay(alpn=b"http/1.1"), stock_play(alpn=b"http/1.1")
    http1_upgrade(bridged)
    assert type(bridged.stream) is STOCK_STREAM
    bridged, stock = StreamPlay(alpn=b"http/1.1"), stock_play(alpn=b"http/1.1")
    assert http1_upgrade(bridged) == http1_upgrade(stock)
    assert [h.name for h in bridged.hooks] == [h.name for h in stock.hooks]
    assert "hook websocket_end" in [f"hook {h.name}" for h in bridged.hooks]


def test_a_websocket_on_an_http2_stream_stays_the_bridges():
    # (what mitmproxy's stream cannot carry: an extended CONNECT)
    play = websocket_open()
    assert type(play.stream) is not STOCK_STREAM and play.stream.flow.websocket is not None
