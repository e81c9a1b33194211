"""Every internal of mitmproxy the bridge touches, in one list; the checks
that this mitmproxy behaves as the bridge needs; and the one place that
replaces mitmproxy's classes.

What the bridge touches for HTTP/2 and HTTP/1.1 (33; before the extended
CONNECT kept one form, it was about 45: the method and status swapped around
every hook, the translated request and response, the GET/101 the stream was
handed):

- replaced, where mitmproxy's HTTP layer looks them up when it makes a
  connection or a stream (`REPLACED`): `HttpStream`, `Http2Server`,
  `Http2Client`, `Http1Client` (4);
- `HttpStream`, subclassed (`stream.WsHttpStream`): `handle_event`,
  `_handle_event`, `handle_connect`, `check_invalid`, `check_killed`,
  `send_response`, `flow_done`, `passthrough`, `make_server_connection`
  overridden; `state_consume_request_body`, `state_wait_for_response_headers`,
  `state_errored`, `client_state`, `server_state`, `child_layer`, `mode` read
  or set as the stream does for a request and a 101 (16);
- `Http2Server` and `Http2Client` (`h2`): `handle_h2_event`, `_handle_event`,
  `_handle_event2`, `close_connection` overridden; `h2_conn`, `streams`,
  `stream_queue`, `their_stream_id`, `is_open_for_us`, `is_closed` used;
  `h2_conn`'s class (to see each read's events) and its `stream_buffers` (to
  count what waits for a peer's window) replaced (6 + the 2 replacements);
- `Http1Client` (`h1`): `send` and `read_headers` overridden, `state` set (3);
- `_http2.parse_h2_request_headers` and `parse_h2_response_headers`,
  `validate_request`, `HttpLayer.connections` (a WebSocket's finished
  HTTP/1.1 connection dropped), and the proxyserver's connection handlers'
  `max_conns` (a WebSocket's connection past the per-server throttle) (5).

And for HTTP/3 (18 more):

- replaced: `Http3Server`, `Http3Client` (2);
- `Http3Server` and `Http3Client` (`h3`): `parse_headers` and `_handle_event`
  overridden, `h3_conn` replaced, `our_stream_id` and `their_stream_id` used (5);
- `_http_h3.LayeredH3Connection`, subclassed (`h3.WsH3Connection`):
  `handle_stream_event` and `get_open_stream_ids` (a stream ended both ways
  is not open) overridden, and aioquic's `_get_local_settings` (not to
  advertise RFC 9220) and `_handle_request_or_push_frame` (a malformed
  request or response an error of its stream, not of the connection; an
  interim response skipped); `_closed_streams` and `_mock` (to stop reading a
  refused stream), aioquic's `_stream` (whether a stream has ended),
  `received_settings`, `has_sent_headers`, `close_stream`, `transmit` used (11).

The HTTP events, commands and hooks the layers exchange (`ReceiveHttp`,
`SendHttp`, `RequestHeaders`…, `GetHttpConnection`, `DropStream`, the hook
classes, `WebsocketLayer`, the QUIC stream events) are the layers' own
interface and not counted.

Names and parameters can stay while behaviour changes, so before anything is
replaced the bridge drives one extended CONNECT through its classes in memory
over HTTP/2 and one over HTTP/3 (`selftest`); a mitmproxy that carries
`:protocol` itself is left as it is (`carries_rfc8441`). Where only the
HTTP/3 part does not behave, HTTP/3 gets the codec that does not advertise
RFC 9220 and the rest is carried. Installed by replacing the names above,
uninstalled by putting the originals back; connections already open keep the
classes they started with.
"""

from __future__ import annotations

import inspect
import types

from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers.http import _http1, _http2, _http3

from . import selftest
from .common import _stock
from .h1 import WsHttp1Client
from .h2 import WsHttp2Client, WsHttp2Server
from .h3 import QuietHttp3Server, WsHttp3Client, WsHttp3Server
from .stream import WsHttpStream, offer_alpn

# What the Bridge calls.
__all__ = ["carries_rfc8441", "h3_incompatibility", "incompatibility", "install", "install_quiet_h3", "uninstall",
           "offer_alpn"]

# The names the bridge replaces, and the classes of mitmproxy's that must look
# them up in the HTTP layer's module when they make a connection or a stream
# (a `from ... import` of their own would keep the stock class).
REPLACED = {
    "HttpStream": ("HttpLayer",), "Http2Server": ("HttpLayer",), "Http2Client": ("HttpLayer", "HttpClient"),
    "Http3Server": ("HttpLayer",), "Http3Client": ("HttpLayer", "HttpClient"), "Http1Client": ("HttpLayer", "HttpClient"),
}


def _looks_up(cls: type, name: str) -> bool:
    functions = [inspect.unwrap(fn) for fn in vars(cls).values() if isinstance(fn, types.FunctionType)]  # (past @expect)
    return any(fn.__globals__ is vars(http_layers) and name in fn.__code__.co_names for fn in functions)


def incompatibility() -> str | None:
    """Why this mitmproxy cannot take the bridge, or None if it can."""
    for name, users in REPLACED.items():
        for user in users:
            if not _looks_up(getattr(http_layers, user), name):
                return f"{user} does not look up {name} where the bridge replaces it"
    return selftest.failure()


def h3_incompatibility() -> str | None:
    """Why this mitmproxy cannot carry WebSockets over HTTP/3, or None."""
    return selftest.h3_failure()


def carries_rfc8441() -> bool:
    """Whether this mitmproxy carries an extended CONNECT itself: its HTTP/2
    server advertises RFC 8441 and its parser keeps `:protocol`."""
    _, browser = selftest.greeted(_http2.Http2Server, selftest.context())
    if browser.remote_settings.enable_connect_protocol != 1:
        return False
    try:
        _http2.parse_h2_request_headers([(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                                         (b":path", b"/"), (b":authority", b"a.test")])
    except ValueError:
        return False
    return True


def install(h2: bool, h3: bool) -> str | None:
    """Put the bridge's classes in place; None if that took, else what did
    not (and then mitmproxy's own classes are back).

    `h2` and `h3` decide what new client connections are promised (the
    client codecs that advertise RFC 8441 and RFC 9220; over HTTP/3 the
    stock codec advertises it without carrying it, so off is a codec that
    does not); the stream and the upstream codecs stay while the bridge is
    installed, since a connection opened under that promise may open
    WebSockets on new upstream connections at any time, and they leave
    every other request as mitmproxy has it."""
    return _replace({
        "HttpStream": WsHttpStream,
        "Http2Server": WsHttp2Server if h2 else _http2.Http2Server, "Http2Client": WsHttp2Client,
        "Http3Server": WsHttp3Server if h3 else QuietHttp3Server, "Http3Client": WsHttp3Client,
        "Http1Client": WsHttp1Client,
    })


def install_quiet_h3() -> str | None:
    """Only what keeps an HTTP/3 client from being cut off: no RFC 9220
    advertised, an extended CONNECT refused on its own stream."""
    return _replace({"Http3Server": QuietHttp3Server})


def _replace(wanted: dict[str, type]) -> str | None:
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
    http_layers.Http2Server, http_layers.Http2Client = _http2.Http2Server, _http2.Http2Client
    http_layers.Http3Server, http_layers.Http3Client = _http3.Http3Server, _http3.Http3Client
    http_layers.Http1Client = _http1.Http1Client
