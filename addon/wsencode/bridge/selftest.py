"""One extended CONNECT driven through the bridge's classes in memory, before
they replace mitmproxy's: whether this mitmproxy behaves as the bridge needs.

Names and parameters can stay while behaviour changes; so instead of trusting
them, the bridge runs what a WebSocket over HTTP/2 does, as mitmproxy's own
Playbook tests drive its layers: a browser's extended CONNECT into the
client's codec, the request through the stream (its hooks answered, an
upstream connection handed over), out of each upstream codec (HTTP/2 as an
extended CONNECT, HTTP/1.1 as an upgrade), their answers back, and a message
on the open WebSocket. Each step says what it expected; the first one that
does not hold is the reason the bridge is not installed. No socket, no event
loop: a few milliseconds.
"""

from __future__ import annotations

import base64

import h2.config
import h2.connection
import h2.events
from mitmproxy import connection, http, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import websocket
from wsproto.frame_protocol import FrameProtocol

from mitmproxy.proxy.layers.http import _http_h3
from mitmproxy.proxy.layers.quic import QuicStreamDataReceived, SendQuicStreamData

from ..core.extconnect import accept_for
from .h1 import WsHttp1Client
from .h2 import WsHttp2Client, WsHttp2Server
from .h3 import WsHttp3Client, WsHttp3Server
from .stream import WsHttpStream

SID = 1


class Misbehaved(Exception):
    """A step did not do what the bridge needs; says which."""


def expect(condition: bool, step: str) -> None:
    if not condition:
        raise Misbehaved(step)


def run(target: layer.Layer, *given: events.Event) -> list[commands.Command]:
    """Hand `target` the events; every hook and connection it asks for is
    answered at once (an upstream connection: an open one to the address)."""
    out: list[commands.Command] = []
    queue = list(given)
    while queue:
        for command in target.handle_event(queue.pop(0)):
            out.append(command)
            if isinstance(command, commands.StartHook):
                queue.append(events.HookCompleted(command))
            elif isinstance(command, http_layers.GetHttpConnection):
                server = connection.Server(address=command.address, tls=command.tls, alpn=b"h2")
                server.state = connection.ConnectionState.OPEN
                queue.append(http_layers.GetHttpConnectionCompleted(command, (server, None)))
    return out


def received(out: list[commands.Command]) -> list[http_layers.HttpEvent]:
    return [c.event for c in out if isinstance(c, http_layers.ReceiveHttp)]


def sent(out: list[commands.Command], conn: connection.Connection) -> list[http_layers.HttpEvent]:
    return [c.event for c in out if isinstance(c, http_layers.SendHttp) and c.connection == conn]


def wire(out: list[commands.Command]) -> bytes:
    return b"".join(c.data for c in out if isinstance(c, commands.SendData))


def context() -> Context:
    opts = options.Options()
    Proxyserver().load(opts)
    client = connection.Client(peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080),
                               state=connection.ConnectionState.OPEN, tls=True, alpn=b"h2")
    ctx = Context(client, opts)
    ctx.server = connection.Server(address=("upstream.test", 443), tls=True, alpn=b"h2")
    ctx.server.state = connection.ConnectionState.OPEN
    return ctx


def greeted(codec_class: type[layer.Layer], ctx: Context) -> tuple[layer.Layer, h2.connection.H2Connection]:
    """A client's codec started, and a browser that has read its preface."""
    browser = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    browser.initiate_connection()
    codec = codec_class(ctx.fork())
    browser.receive_data(wire(run(codec, events.Start())))
    return codec, browser


def browser_connect(ctx: Context) -> http_layers.RequestHeaders:
    codec, browser = greeted(WsHttp2Server, ctx)
    expect(browser.remote_settings.enable_connect_protocol == 1, "the client's codec advertises RFC 8441")
    browser.send_headers(SID, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                               (b":path", b"/selftest"), (b":authority", b"upstream.test"),
                               (b"sec-websocket-version", b"13")])
    handed = received(run(codec, events.DataReceived(ctx.client, browser.data_to_send())))
    expect(len(handed) == 2 and isinstance(handed[0], http_layers.RequestHeaders)
           and handed[0].request.method == "CONNECT"
           and handed[0].request.headers.fields[0] == (b":protocol", b"websocket"),
           "the client's codec hands the stream the extended CONNECT as the client sent it")
    return handed[0]


def through_the_stream(ctx: Context, headers: http_layers.RequestHeaders) -> None:
    sid = headers.stream_id
    http_layer = http_layers.HttpLayer(ctx, http_layers.HTTPMode.regular)
    stream = WsHttpStream(ctx.fork(), sid)
    http_layer.connections[ctx.client] = None
    out = run(stream, events.Start(), headers, http_layers.RequestEndOfMessage(sid))
    hooks = [c.name for c in out if isinstance(c, commands.StartHook)]
    expect(hooks == ["requestheaders", "request"], "the stream takes an extended CONNECT as a request, not a tunnel")
    upstream = [c for c in out if isinstance(c, http_layers.SendHttp) and isinstance(c.event, http_layers.RequestHeaders)]
    expect(len(upstream) == 1 and upstream[0].event.request is headers.request,
           "the stream sends the extended CONNECT upstream after the request hook")
    server = upstream[0].connection
    answer = http_layers.ResponseHeaders(sid, _response(200), end_stream=False)
    out = run(stream, answer, http_layers.ResponseEndOfMessage(sid))
    expect(isinstance(stream.child_layer, websocket.WebsocketLayer) and stream.flow.websocket is not None,
           "the stream hands an extended CONNECT's 2xx to mitmproxy's WebSocket layer")
    expect([type(e) for e in sent(out, ctx.client)][:1] == [http_layers.ResponseHeaders],
           "the stream sends the 2xx to the client")
    frame = bytes(FrameProtocol(client=True, extensions=[]).send_data("selftest", fin=True))
    out = run(stream, http_layers.RequestData(sid, frame))
    expect([type(e) for e in sent(out, server)] == [http_layers.RequestData],
           "the WebSocket's messages go upstream on the stream")


def _response(status: int) -> http.Response:
    return http.Response(http_version=b"HTTP/2.0", status_code=status, reason=b"", headers=http.Headers(),
                         content=None, trailers=None, timestamp_start=0, timestamp_end=None)


def to_http2_upstream(ctx: Context, headers: http_layers.RequestHeaders) -> None:
    upstream = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
    upstream.local_settings.enable_connect_protocol = 1
    upstream.local_settings.acknowledge()
    codec = WsHttp2Client(ctx.fork())
    upstream.receive_data(wire(run(codec, events.Start())))
    upstream.initiate_connection()
    run(codec, events.DataReceived(ctx.server, upstream.data_to_send()))
    got = upstream.receive_data(wire(run(codec, headers, http_layers.RequestEndOfMessage(headers.stream_id))))
    connects = [e for e in got if isinstance(e, h2.events.RequestReceived)]
    expect(len(connects) == 1 and (b":protocol", b"websocket") in connects[0].headers,
           "the HTTP/2 upstream codec sends an extended CONNECT once the upstream's SETTINGS allow it")
    upstream.send_headers(connects[0].stream_id, [(b":status", b"200")])
    handed = received(run(codec, events.DataReceived(ctx.server, upstream.data_to_send())))
    expect(bool(handed) and isinstance(handed[0], http_layers.ResponseHeaders) and handed[0].response.status_code == 200,
           "the HTTP/2 upstream codec hands the stream the upstream's 2xx")


def to_http1_upstream(ctx: Context, headers: http_layers.RequestHeaders) -> None:
    ctx = ctx.fork()
    ctx.server = connection.Server(address=("upstream.test", 80), alpn=b"http/1.1")
    ctx.server.state = connection.ConnectionState.OPEN
    codec = WsHttp1Client(ctx)
    run(codec, events.Start())
    head = wire(run(codec, headers, http_layers.RequestEndOfMessage(headers.stream_id)))
    key = next((line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                if line.lower().startswith(b"sec-websocket-key:")), b"")
    expect(head.startswith(b"GET /selftest HTTP/1.1\r\n") and len(base64.b64decode(key or b"x")) == 16,
           "the HTTP/1.1 upstream codec sends an upgrade with the proxy's key")
    answer = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Accept: " + accept_for(key.decode()).encode() + b"\r\n\r\n")
    handed = received(run(codec, events.DataReceived(ctx.server, answer)))
    expect(bool(handed) and isinstance(handed[0], http_layers.ResponseHeaders) and handed[0].response.status_code == 200,
           "the HTTP/1.1 upstream codec hands the stream a 200 for the 101 that answers its key")


def quic_wire(out: list[commands.Command], to: connection.Connection) -> list[QuicStreamDataReceived]:
    """What a codec sent on its QUIC streams, as the peer's QUIC layer hands it on."""
    return [QuicStreamDataReceived(to, c.stream_id, c.data, c.end_stream) for c in out if isinstance(c, SendQuicStreamData)]


def h3_peer(conn: connection.Connection, is_client: bool) -> _http_h3.LayeredH3Connection:
    """The other end of an HTTP/3 codec: mitmproxy's own HTTP/3 connection, with aioquic's SETTINGS."""
    return _http_h3.LayeredH3Connection(conn, is_client=is_client)


def h3_events(peer: _http_h3.LayeredH3Connection, received: list[QuicStreamDataReceived]) -> list:
    return [e for event in received for e in peer.handle_stream_event(event)]


def h3_sent(peer: _http_h3.LayeredH3Connection, to: connection.Connection) -> list[QuicStreamDataReceived]:
    return quic_wire(list(peer.transmit()), to)


def h3_browser_connect(ctx: Context) -> http_layers.RequestHeaders:
    ctx = ctx.fork()
    ctx.client.alpn = b"h3"
    codec = WsHttp3Server(ctx)
    browser = h3_peer(ctx.client, is_client=True)
    h3_events(browser, quic_wire(run(codec, events.Start()), ctx.client))
    expect((browser.received_settings or {}).get(0x8) == 1, "the HTTP/3 client's codec advertises RFC 9220")
    browser.send_headers(0, [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
                             (b":path", b"/selftest"), (b":authority", b"upstream.test"),
                             (b"sec-websocket-version", b"13")])
    handed = received([c for event in h3_sent(browser, ctx.client) for c in run(codec, event)])
    expect(len(handed) == 2 and isinstance(handed[0], http_layers.RequestHeaders)
           and handed[0].request.method == "CONNECT"
           and handed[0].request.headers.fields[0] == (b":protocol", b"websocket"),
           "the HTTP/3 client's codec hands the stream the extended CONNECT as the client sent it")
    return handed[0]


def to_http3_upstream(ctx: Context, headers: http_layers.RequestHeaders) -> None:
    ctx = ctx.fork()
    ctx.server = connection.Server(address=("upstream.test", 443), tls=True, alpn=b"h3", transport_protocol="udp")
    ctx.server.state = connection.ConnectionState.OPEN
    codec = WsHttp3Client(ctx)
    upstream = h3_peer(ctx.server, is_client=False)
    h3_events(upstream, quic_wire(run(codec, events.Start()), ctx.server))
    for event in h3_sent(upstream, ctx.server):  # its SETTINGS
        run(codec, event)
    out = run(codec, headers, http_layers.RequestEndOfMessage(headers.stream_id))
    got = h3_events(upstream, quic_wire(out, ctx.server))
    connects = [e for e in got if type(e).__name__ == "HeadersReceived"]
    expect(len(connects) == 1 and (b":protocol", b"websocket") in connects[0].headers,
           "the HTTP/3 upstream codec sends an extended CONNECT once the upstream's SETTINGS allow it")
    upstream.send_headers(connects[0].stream_id, [(b":status", b"200")])
    handed = received([c for event in h3_sent(upstream, ctx.server) for c in run(codec, event)])
    expect(bool(handed) and isinstance(handed[0], http_layers.ResponseHeaders) and handed[0].response.status_code == 200,
           "the HTTP/3 upstream codec hands the stream the upstream's 2xx")


def failure() -> str | None:
    """What of one extended CONNECT over HTTP/2 did not behave, or None if it all did."""
    try:
        ctx = context()
        through_the_stream(ctx, browser_connect(ctx))
        to_http2_upstream(ctx, browser_connect(ctx))
        to_http1_upstream(ctx, browser_connect(ctx))
    except Misbehaved as e:
        return f"in memory, {e}: not so on this mitmproxy"
    return None


def h3_failure() -> str | None:
    """What of one extended CONNECT over HTTP/3 did not behave, or None if it all did."""
    try:
        ctx = context()
        request = h3_browser_connect(ctx)
        through_the_stream(ctx, request)
        to_http3_upstream(ctx, h3_browser_connect(ctx))
        to_http1_upstream(ctx, h3_browser_connect(ctx))
    except Misbehaved as e:
        return f"in memory, {e}: not so on this mitmproxy"
    return None
