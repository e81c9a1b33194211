"""The HTTP/1.1 upstream codec's translation of an extended CONNECT, driven sans-I/O.

`WsHttp1Client` is mitmproxy's `Http1Client` plus one thing: a WebSocket
that an HTTP/2 (or HTTP/3) client opened with an extended CONNECT goes to an
HTTP/1.1 upstream as the upgrade that asks the same, with a key of the
proxy's own, and the stream gets the 2xx its client expects once the 101
answers that key. Here the codec is fed by hand (the stream's HttpEvents, the
upstream's bytes) and what it writes is parsed by h11, as a server would.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

import h11
import pytest
from conftest import extended_connect_request
from mitmproxy import connection, http, options
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.proxy import commands, events
from mitmproxy.proxy.context import Context
from mitmproxy.proxy.layers import http as http_layers

from wsencode.bridge.h1 import WsHttp1Client
from wsencode.core.extconnect import accept_for
from wsencode.core.streamfacts import facts_of

SID = 1


@dataclass
class Out:
    http: list[http_layers.HttpEvent] = field(default_factory=list)  # handed to the stream
    sent: bytes = b""  # written to the upstream
    closed: bool = False

    def kinds(self) -> list[str]:
        return [type(e).__name__ for e in self.http]


class Upstream:
    """The codec, and an HTTP/1.1 server (h11) reading what it writes."""

    def __init__(self) -> None:
        opts = options.Options()
        Proxyserver().load(opts)
        client = connection.Client(
            peername=("127.0.0.1", 50000), sockname=("127.0.0.1", 8080),
            state=connection.ConnectionState.OPEN, tls=True, alpn=b"h2",
        )
        ctx = Context(client, opts)
        ctx.server = connection.Server(address=("chat.test", 80), peername=("127.0.0.1", 80), alpn=b"http/1.1")
        ctx.server.state = connection.ConnectionState.OPEN
        self.conn = ctx.server
        self.codec = WsHttp1Client(ctx)
        self.server = h11.Connection(h11.SERVER)
        self(events.Start())

    def __call__(self, *evs: events.Event) -> Out:
        out = Out()
        for cmd in (cmd for event in evs for cmd in self.codec.handle_event(event)):
            if isinstance(cmd, commands.SendData):
                out.sent += cmd.data
            elif isinstance(cmd, http_layers.ReceiveHttp):
                out.http.append(cmd.event)
            elif isinstance(cmd, commands.CloseConnection):
                out.closed = True
            elif not isinstance(cmd, commands.Log):
                raise AssertionError(f"unexpected command {cmd!r}")
        return out

    def request(self, request: http.Request) -> h11.Request:
        """The stream hands the codec a request; what the server read of it."""
        out = self(http_layers.RequestHeaders(SID, request, end_stream=True), http_layers.RequestEndOfMessage(SID))
        self.server.receive_data(out.sent)
        head = self.server.next_event()
        assert isinstance(head, h11.Request), head
        return head

    def answer(self, raw: bytes) -> Out:
        return self(events.DataReceived(self.conn, raw))


def sent_headers(head: h11.Request) -> dict[bytes, bytes]:
    return {k: v for k, v in head.headers}


def switching(key: bytes, *extra: bytes, accept: bytes | None = None) -> bytes:
    accept = accept if accept is not None else accept_for(key.decode()).encode()
    lines = [b"HTTP/1.1 101 Switching Protocols", b"Upgrade: websocket", b"Connection: Upgrade",
             b"Sec-WebSocket-Accept: " + accept, *extra]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_an_extended_connect_goes_to_an_http1_upstream_as_the_upgrade_that_asks_the_same():
    """RFC 6455 section 4.1: GET with Upgrade, Connection and a fresh 16-byte
    key; Host from the CONNECT's authority; the client's other fields kept,
    cookies on one line (RFC 6265 section 5.4); nothing of HTTP/2's."""
    side = Upstream()
    request = extended_connect_request(sec_websocket_protocol="chat")
    request.headers.add("cookie", "a=1")
    request.headers.add("cookie", "b=2")
    head = side.request(request)
    headers = sent_headers(head)
    assert (head.method, head.target, head.http_version) == (b"GET", b"/chat", b"1.1")
    assert headers[b"host"] == b"chat.test:8443"
    assert (headers[b"upgrade"], headers[b"connection"]) == (b"websocket", b"Upgrade")
    assert len(base64.b64decode(headers[b"sec-websocket-key"])) == 16
    assert headers[b"sec-websocket-version"] == b"13" and headers[b"sec-websocket-protocol"] == b"chat"
    assert headers[b"cookie"] == b"a=1; b=2"
    assert not any(name.startswith(b":") for name, _ in head.headers)
    # The flow keeps what the client sent; the key is noted for the record.
    assert request.method == "CONNECT" and request.headers.fields[0] == (b":protocol", b"websocket")
    assert facts_of(request).key_sent == headers[b"sec-websocket-key"].decode()


def test_a_101_that_answers_the_key_reaches_the_stream_as_the_2xx_its_client_expects():
    side = Upstream()
    request = extended_connect_request()
    key = sent_headers(side.request(request))[b"sec-websocket-key"]
    out = side.answer(switching(key, b"Sec-WebSocket-Protocol: chat") + b"\x81\x02hi")
    assert out.kinds() == ["ResponseHeaders", "ResponseEndOfMessage", "ResponseData"]
    response = out.http[0].response
    assert (response.status_code, response.reason, response.http_version) == (200, "", "HTTP/2.0")
    assert response.headers.fields == ((b"sec-websocket-protocol", b"chat"),)
    assert out.http[2].data == b"\x81\x02hi" and not out.closed
    assert facts_of(request).upstream_status == 101 and facts_of(request).proxy_refused is None
    # From here the connection is the WebSocket's, both ways.
    assert side(http_layers.RequestData(SID, b"\x81\x82abcd")).sent == b"\x81\x82abcd"


@pytest.mark.parametrize("answer,problem", [
    (lambda key: switching(key, accept=b"d3Jvbmc="), "a wrong Sec-WebSocket-Accept"),
    (lambda key: switching(key).replace(b"Upgrade: websocket", b"Upgrade: h2c"), "something other than websocket"),
    (lambda key: b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", "with 200 instead of switching protocols"),
], ids=["wrong accept", "another protocol", "a 200 that ignored the upgrade"])
def test_an_answer_that_cannot_open_the_websocket_is_the_proxys_502_and_the_connection_closes(answer, problem):
    """To a client that sent an extended CONNECT any 2xx means open (RFC 8441
    section 5): an upstream answer that does not open the WebSocket, yet
    would read as if it did, must not reach it. The proxy answers 502 and
    says why; nothing more of that upstream goes anywhere."""
    side = Upstream()
    request = extended_connect_request()
    key = sent_headers(side.request(request))[b"sec-websocket-key"]
    out = side.answer(answer(key))
    assert out.kinds() == ["ResponseHeaders", "ResponseData", "ResponseEndOfMessage"] and out.closed
    assert out.http[0].response.status_code == 502
    assert problem in out.http[1].data.decode() and problem in facts_of(request).proxy_refused
    assert side.answer(b"\x81\x02hi").http == []


def test_a_refusal_reaches_the_stream_as_it_is_and_the_connection_serves_nothing_else():
    """A 403 (with its body) is the upstream's answer to the client. As for
    any request an HTTP/2 client sends over HTTP/1.1, mitmproxy uses the
    connection for it alone."""
    side = Upstream()
    request = extended_connect_request()
    side.request(request)
    out = side.answer(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
    assert out.kinds() == ["ResponseHeaders", "ResponseData", "ResponseEndOfMessage"] and out.closed
    assert out.http[0].response.status_code == 403 and out.http[1].data == b"nope"
    assert facts_of(request).upstream_status == 403 and facts_of(request).proxy_refused is None


def test_an_ordinary_request_is_mitmproxys_own():
    side = Upstream()
    request = extended_connect_request()
    request.method = "GET"
    request.headers.pop(":protocol")
    head = side.request(request)
    assert head.method == b"GET" and b"sec-websocket-key" not in sent_headers(head)
    out = side.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert out.kinds() == ["ResponseHeaders", "ResponseData", "ResponseEndOfMessage"]
    assert out.http[0].response.status_code == 200 and facts_of(request) is None
