"""mitmproxy's HTTP stream, for WebSocket handshakes: an extended CONNECT
taken as a request and its 2xx as the upgrade, where a handshake waits, the
HTTP/1.1 fallback, and what a finished WebSocket leaves behind.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import uuid

from mitmproxy import connection, ctx, flow, http
from mitmproxy.net.http import url
from mitmproxy.proxy import commands, events, layer
from mitmproxy.proxy.layers import http as http_layers
from mitmproxy.proxy.layers import websocket
from mitmproxy.proxy.mode_specs import ReverseMode
from mitmproxy.websocket import WebSocketData

from ..core.extconnect import PROTOCOL, ROUTE_TRANSITIONS, Route, RouteStep
from ..core.handshake import classify
from ..core.streamfacts import CLIENT, CONNECTING, UPSTREAM, StreamFacts, facts_for, facts_of, note_not_a_handshake
from ..report import printable
from .common import (
    NEEDS_HTTP1, NeedsHttp1, _stock, is_extended_connect, is_passthrough_close, passthrough_close, request_error,
    response_error,
)

class GetWebSocketConnection(http_layers.GetHttpConnection):
    """Ask the HTTP layer for a WebSocket's upstream connection: one that
    can take another stream (HTTP/2, HTTP/3), or a new one. An HTTP/1.1
    connection carries one request at a time, and a WebSocket holds it for
    its whole life; mitmproxy keeps an HTTP/2 client's requests off such
    connections ("tricky multiplexing edge case" in HttpLayer), not an
    HTTP/3 client's, whose second WebSocket would be handed the first's."""

    def connection_spec_matches(self, conn: connection.Connection) -> bool:
        return super().connection_spec_matches(conn) and (conn.alpn == b"h2" or http_layers.is_h3_alpn(conn.alpn))

    def __hash__(self):
        return id(self)


class GetHttp1Connection(http_layers.GetHttpConnection):
    """Ask the HTTP layer for a new connection for a WebSocket that must go
    over HTTP/1.1 (its address offers only that, `Http1OnlyAddress`)."""

    def connection_spec_matches(self, conn: connection.Connection) -> bool:
        return False

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


class InjectionRoute(tuple):
    """The address of a flow's own server connection for injected messages
    (`WsHttpStream._route_injections_here`): shown as the real one, equal to
    no other, so mitmproxy never gives it to a request as a connection to
    reuse (`GetHttpConnection.connection_spec_matches`)."""

    __slots__ = ()

    def __eq__(self, other) -> bool:
        return self is other

    def __ne__(self, other) -> bool:
        return self is not other

    __hash__ = tuple.__hash__


class Http1OnlyAddress(WebSocketAddress):
    """The address of a WebSocket's fallback connection: it must offer only
    HTTP/1.1, or the upstream would pick HTTP/2 again (`offer_alpn`). The
    mark travels with the connection, so several WebSockets of one client
    falling back at once need no shared bookkeeping."""

    __slots__ = ()
    ws_encode_alpn = (b"http/1.1",)


class TcpAddress(WebSocketAddress):
    """The address of an HTTP/3 client's WebSocket sent to the upstream over
    TCP (`ws_encode_h3_upstream=tcp`): mitmproxy would offer that connection
    the client's ALPN (h3), which TCP cannot speak."""

    __slots__ = ()
    ws_encode_alpn = (b"h2", b"http/1.1")


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


_STOCK_STREAM = _stock(http_layers.HttpStream)


class WsHttpStream(_STOCK_STREAM):
    """mitmproxy's HTTP stream, which also carries a WebSocket opened by an
    extended CONNECT: a request like any other until its status (RFC 8441
    section 4), not a tunnel to its authority, whose 2xx hands the stream to
    mitmproxy's WebSocket layer as a 101 does for an HTTP/1.1 upgrade. It
    also notes where a handshake is, retries a WebSocket over HTTP/1.1 when
    an HTTP/2 upstream cannot take it, and lets the HTTP layer drop the
    stream when its WebSocket is over.

    Where it has nothing of that to do, it becomes mitmproxy's own stream
    (`_become_stock`): every later event and call goes to HttpStream's
    methods, with no check of the bridge's in between. That is every
    request that opens neither a WebSocket nor an event stream, once its
    headers are classified, and an
    HTTP/1.1 client's WebSocket on an HTTP/1.1 upstream connection, once its
    101 has gone out (what stock mitmproxy carries itself)."""

    ws_encode_bridge = True
    # (ws_ names: attributes of a subclass of mitmproxy's, kept off its names)
    ws_route = Route.FIRST  # its one table: ROUTE_TRANSITIONS
    ws_facts: StreamFacts | None = None  # a handshake's, once the stream has classified its request
    ws_route_alias: connection.Server | None = None  # its flow's server connection, for injected messages

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
                self._route_injections_here()
                yield from self._start_websocket()
                return
            self.flow.websocket = None  # an addon failed it after the response hook began
        if self.flow.websocket and self.flow.response.status_code == 101:
            if self._on_http1_both_ways():
                self._become_stock()
                return (yield from _STOCK_STREAM.flow_done(self))
            self._route_injections_here()
        yield from super().flow_done()
        if self.ws_route is Route.ACCEPTED and not self._opened(self.flow.response.status_code):
            # The upstream accepted but the flow did not (an addon failed the
            # handshake): nothing will use that upstream stream.
            yield http_layers.SendHttp(request_error(self.stream_id, "handshake failed in the proxy"), self.context.server)

    def check_killed(self, emit_error_hook: bool) -> layer.CommandGenerator[bool]:
        killed = yield from super().check_killed(emit_error_hook)
        if killed and self.ws_route is Route.ACCEPTED:
            # The upstream accepted, and the flow was killed in a hook after
            # (an addon, the user, or the client resetting meanwhile):
            # mitmproxy returns before flow_done, so the upstream is told here.
            yield http_layers.SendHttp(request_error(self.stream_id, "handshake killed in the proxy"), self.context.server)
        return killed

    def _opened(self, status: int) -> bool:
        """Whether `status` opens the WebSocket this stream's handshake asks
        for (the codecs hand an upgrade a 101, an extended CONNECT a 2xx)."""
        handshake = self.ws_facts.handshake if self.ws_facts is not None else None
        return handshake is not None and handshake.is_success(status)

    def _route_injections_here(self) -> None:
        """mitmproxy's HTTP layer routes an injected WebSocket message
        (`inject.websocket`) by the flow's server connection, to that
        connection's codec, which it asserts is HTTP/1.1's: for a WebSocket
        on a stream of an HTTP/2 or HTTP/3 upstream connection it would crash.
        Such a flow gets a server connection of its own (a copy of the real
        one that no request can be given), which the HTTP layer maps to this
        stream."""
        server = self.context.server
        if server.alpn != b"h2" and not http_layers.is_h3_alpn(server.alpn):
            return
        alias = copy.copy(server)
        alias.id = str(uuid.uuid4())
        alias.state = connection.ConnectionState.CLOSED  # (mitmproxy fixes an open connection's address)
        alias.address = InjectionRoute(server.address)
        alias.state = server.state
        self.flow.server_conn = self.ws_route_alias = alias
        self._http_layer().connections[alias] = self

    def _on_http1_both_ways(self) -> bool:
        """Whether the client and the upstream connection both speak
        HTTP/1.1: a WebSocket there is mitmproxy's own from its 101 on."""
        client, server = self.context.client, self.context.server
        return (client.transport_protocol == "tcp" and client.alpn != b"h2"
                and server.alpn != b"h2" and not http_layers.is_h3_alpn(server.alpn))

    def _become_stock(self) -> None:
        """mitmproxy's HttpStream from here on: the class is swapped, so the
        HTTP layer's next event, and every call the stream makes of its own
        methods, finds mitmproxy's (a call already running goes on)."""
        self.__class__ = _STOCK_STREAM

    def _http_layer(self) -> http_layers.HttpLayer:
        layers = self.context.layers
        return layers[layers.index(self) - 1]

    def _start_websocket(self) -> layer.CommandGenerator[None]:
        """What mitmproxy's flow_done does for a 101 (the WebSocket layer
        takes the stream, then the response's end goes out), for the 2xx
        that answers an extended CONNECT."""
        self.child_layer = websocket.WebsocketLayer(self.context, self.flow)
        self._handle_event = self.passthrough
        yield from self.child_layer.handle_event(events.Start())
        yield http_layers.SendHttp(http_layers.ResponseEndOfMessage(self.stream_id), self.context.client)

    def passthrough(self, event: events.Event) -> layer.CommandGenerator[None]:
        if self.flow.websocket is not None and isinstance(event, http_layers.RequestProtocolError):
            # mitmproxy's WebSocket layer understands a peer going away, not
            # an error (in its `done` state it would crash): a client's
            # stream or connection that failed is the client gone.
            event = http_layers.RequestEndOfMessage(self.stream_id)
        elif self.flow.websocket is not None and isinstance(event, http_layers.ResponseProtocolError):
            event = http_layers.ResponseEndOfMessage(self.stream_id)
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
            if self.ws_route_alias is not None:
                self._http_layer().connections.pop(self.ws_route_alias, None)
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
        facts = facts_of(self.flow.request)
        if facts is None or (facts.handshake is not None and not facts.handshake.is_websocket):  # (an event stream: a request)
            return (yield from super().make_server_connection())
        # (an HTTP/1.1 client's own connection is for its one WebSocket: mitmproxy's choice stands)
        get = GetWebSocketConnection if self.context.client.alpn == b"h2" or self._h3_client() else http_layers.GetHttpConnection
        if self._h3_client() and self.context.options.ws_encode_h3_upstream == "tcp":
            return (yield from self._connect(get, TcpAddress, "tcp"))
        return (yield from self._connect(get, WebSocketAddress))

    def _h3_client(self) -> bool:
        return self.context.client.transport_protocol == "udp"

    def _connect(self, get: type[http_layers.GetHttpConnection], address: type[WebSocketAddress],
                 transport: str | None = None) -> layer.CommandGenerator[bool]:
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
            transport or self.flow.server_conn.transport_protocol,
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
        http_layer = self._http_layer()
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
        if facts is None and getattr(self, "flow", None) is not None:
            # An event stream: the addon's hooks made its facts, after the
            # stream classified its request (it is no WebSocket).
            facts = facts_of(self.flow.request)
        if facts is None or facts.ended_by is not None or is_passthrough_close(event):
            return
        if isinstance(event, NeedsHttp1) and self.ws_route is Route.FIRST:
            return  # not an end: the stream retries over HTTP/1.1
        facts.ended_by = CLIENT if isinstance(event, http_layers.RequestProtocolError) else UPSTREAM

    def _handle_event(self, event: events.Event) -> layer.CommandGenerator[None]:
        # Three kinds of event are the bridge's to look at; every one goes on
        # to mitmproxy's generator as it is, with no generator of the
        # bridge's around it (this is called for every event of the stream).
        if isinstance(event, NeedsHttp1):
            return self._over_http1(event)
        if isinstance(event, http_layers.RequestHeaders):
            if not self._classify(event.request):  # nothing for the bridge on this stream
                self._become_stock()
        elif isinstance(event, http_layers.ResponseHeaders) and self.ws_facts is not None:
            self._note_answer(event.response.status_code)
        return _STOCK_STREAM._handle_event(self, event)

    def _classify(self, request: http.Request) -> bool:
        """Note what `request` opens; False if neither a WebSocket nor an
        event stream (whose facts the addon's hooks make, if they follow it,
        and whose errors `_note_ended_by` notes)."""
        handshake = classify(request, event_streams=True)  # (one pass over its fields either way)
        if handshake is not None and handshake.is_websocket:  # a handshake this stream will note the forwarding of
            facts_for(request).handshake = handshake
        else:
            note_not_a_handshake(request)
        self.ws_facts = facts_of(request)  # (also the client codec's, for any extended CONNECT)
        return handshake is not None

    def _over_http1(self, event: NeedsHttp1) -> layer.CommandGenerator[None]:
        if self.ws_step(RouteStep.NEEDS_HTTP1):
            yield from self._retry_over_http1()
        else:  # an upstream proxy or another addon chose the ALPN of the fallback connection
            yield from _STOCK_STREAM._handle_event(
                self, response_error(event.stream_id, "the HTTP/1.1 fallback connection negotiated HTTP/2 again"))

    def _note_answer(self, status: int) -> None:
        """What the upstream's side hands the stream is the answer the
        response hooks start from; the upstream's own status, unless its
        codec noted a translated one (a 101 behind an extended CONNECT)."""
        facts = self.ws_facts
        facts.answer_status = status
        if facts.upstream_status is None:
            facts.upstream_status = status
        if self._opened(status):
            self.ws_step(RouteStep.UPSTREAM_ACCEPTED)

    def ws_step(self, step: RouteStep) -> bool:
        """Take `step` if ROUTE_TRANSITIONS has it from this route."""
        after = ROUTE_TRANSITIONS.get((self.ws_route, step))
        if after is not None:
            self.ws_route = after
        return after is not None

    def _retry_over_http1(self) -> layer.CommandGenerator[None]:
        yield commands.Log(f"{NEEDS_HTTP1} ({printable(self.flow.request.host)})", logging.INFO)
        # (over TCP, also when the upstream that could not take it spoke HTTP/3)
        if (yield from self._connect(GetHttp1Connection, Http1OnlyAddress, "tcp")):
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


def offer_alpn(server: connection.Server) -> None:
    """Called from the addon's tls_start_server hook, which runs just before
    mitmproxy's tlsconfig makes the TLS connection from `alpn_offers`: a
    WebSocket's own TCP connection offers what its address says. Not at server_connect, which
    in upstream-proxy mode sees the proxy's connection instead of the
    origin's, and after which another addon may choose the offers."""
    offers = getattr(server.address, "ws_encode_alpn", None)
    if offers is not None:
        server.alpn_offers = offers

