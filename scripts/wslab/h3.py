"""The lab's HTTP/3 side: the same ASGI application, behind the same encoder,
over QUIC on UDP 127.0.0.1, with WebSockets by extended CONNECT (RFC 9220).

hypercorn's own HTTP/3 server (0.17 and 0.18, on aioquic) cannot carry the
lab: it routes every CONNECT to its WebSocket stream whatever ``:protocol``
says (an unknown one is answered 200), never tells the application that a
client reset its stream, and one CONNECT without ``:path`` ends its whole
QUIC listener (H3Protocol._create_stream leaves ``raw_path`` unbound, which
ends UDPServer.run). So this drives the ASGI application from the QUIC and
HTTP/3 plumbing of wspeers.h3ws, mapping each request stream to an ASGI
``http`` or ``websocket`` scope with ``http_version`` "3".

A request aioquic's own header checks refuse still closes the whole
connection (see wspeers.h3ws.H3WebSocketServer).

What goes out is written as the application (through the encoder) sends it;
HEADERS and DATA sent in one step leave in one flight (H3Peer.transmit_soon),
so a status the encoder held goes out with the first message it releases it
for, as over HTTP/2.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.parse
from typing import Any, Optional

from aioquic.h3.events import DataReceived, HeadersReceived
from wsproto.connection import ConnectionType
from wsproto.events import CloseConnection, Ping
from wspeers.h3ws import (
    ConnectionClosed,
    ErrorCode,
    H3Peer,
    HeldWindowQuic,
    PeerEvent,
    QuicListener,
    StreamAborted,
    classify_request,
    server_configuration,
)
from wspeers.messages import CLOSE_UNSENT, MessageConnection
from wspeers.streams import split_pseudo

log = logging.getLogger("wslab.h3")

Message = dict[str, Any]
ABNORMAL_CLOSURE = 1006  # RFC 6455 §7.1.5: the stream ended without a Close frame


def bind_udp(port: int) -> socket.socket:
    """A UDP socket on 127.0.0.1:`port`, the TCP listener's number where it
    is free (Alt-Svc then names the same port), else any."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.bind(("127.0.0.1", 0))
    return sock


def request_scope(kind: str, pseudo: dict[str, str], headers: list[tuple[bytes, bytes]],
                  client, server_port: int) -> Message:
    """The ASGI scope of an HTTP/3 request ("http") or extended CONNECT ("websocket")."""
    raw_path, _, query = pseudo.get(":path", "/").encode().partition(b"?")
    scope: Message = {
        "type": kind,
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "3",
        "scheme": "https" if kind == "http" else "wss",
        "path": urllib.parse.unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": query,
        "root_path": "",
        "headers": headers,
        "client": client,
        "server": ("127.0.0.1", server_port),
    }
    if kind == "http":
        scope["method"] = pseudo.get(":method", "GET")
    else:
        scope["subprotocols"] = []
        scope["extensions"] = {"websocket.http.response": {}}
    return scope


class _Exchange:
    """One request stream and the application task answering it.

    The application's messages come in through `receive()` (a queue the
    connection fills) and go out through `send()`. A WebSocket's frames are
    read from the moment the CONNECT arrives, since an encoder may sit on the
    application's accept while the client already speaks.
    """

    def __init__(self, peer: H3Peer, stream_id: int, kind: str) -> None:
        self.peer = peer
        self.stream_id = stream_id
        self.kind = kind
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.websocket = MessageConnection(ConnectionType.SERVER) if kind == "websocket" else None
        self.responded = False  # a status went out
        self.finished = False  # the response (or the WebSocket) is over, for the client
        self.task: Optional[asyncio.Task] = None
        if kind == "websocket":
            self.inbox.put_nowait({"type": "websocket.connect"})

    async def receive(self) -> Message:
        return await self.inbox.get()

    # -- from the client ------------------------------------------------------

    def on_data(self, data: bytes, ended: bool) -> None:
        if self.websocket is None:
            self.inbox.put_nowait({"type": "http.request", "body": data, "more_body": not ended})
            return
        for event in self.websocket.messages(data):
            if isinstance(event, str):
                self.inbox.put_nowait({"type": "websocket.receive", "text": event})
            elif isinstance(event, bytes):
                self.inbox.put_nowait({"type": "websocket.receive", "bytes": event})
            elif isinstance(event, Ping):
                self.peer.send_data(self.stream_id, self.websocket.answer(event))
            elif isinstance(event, CloseConnection):  # the client's, or bytes that are not frames
                self.peer.send_data(self.stream_id, self.websocket.answer(event), end_stream=True)
                self.disconnect(event.code)
        if ended:
            self.disconnect(ABNORMAL_CLOSURE)

    def disconnect(self, code: int = ABNORMAL_CLOSURE) -> None:
        """The client is gone (its Close, FIN or reset, or the connection):
        the application hears it once, and what it still sends is dropped."""
        if self.finished:
            return
        self.finished = True
        if self.websocket is not None:
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": code})
        else:
            self.inbox.put_nowait({"type": "http.disconnect"})

    # -- from the application -------------------------------------------------

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind in ("http.response.start", "websocket.http.response.start"):
            self._status(message["status"], message.get("headers", []), end=False)
        elif kind in ("http.response.body", "websocket.http.response.body"):
            more = bool(message.get("more_body", False))
            self.peer.send_data(self.stream_id, bytes(message.get("body", b"")), end_stream=not more)
            self.finished = self.finished or not more
        elif kind == "websocket.accept":
            headers = list(message.get("headers", []))
            if message.get("subprotocol"):
                headers.append((b"sec-websocket-protocol", message["subprotocol"].encode()))
            self._status(200, headers, end=False)
        elif kind == "websocket.send" and self.responded and not self.finished:
            payload = message["text"] if message.get("text") is not None else message["bytes"]
            self.peer.send_data(self.stream_id, self.websocket.send_data(payload))
        elif kind == "websocket.close" and not self.responded:
            self._status(403, [], end=True)  # ASGI: a close before the accept is an HTTP 403
        elif kind == "websocket.close" and self.websocket.state in CLOSE_UNSENT:
            close = CloseConnection(message.get("code", 1000), message.get("reason") or "")
            self.peer.send_data(self.stream_id, self.websocket.send(close), end_stream=True)
            self.finished = True

    def _status(self, status: int, headers, end: bool) -> None:
        self.responded = True
        self.peer.send_headers(self.stream_id, [(b":status", str(status).encode()), *headers], end_stream=end)
        self.finished = self.finished or end

    def done(self, task: asyncio.Task) -> None:
        """The application returned: end what it left open (an HTTP 500, or a
        403 for a WebSocket it never answered, as ASGI servers do)."""
        if task.cancelled():
            return
        if task.exception() is not None:
            log.error("the application failed on stream %d", self.stream_id, exc_info=task.exception())
            self.peer.abort(self.stream_id, ErrorCode.H3_INTERNAL_ERROR)
        elif not self.responded:
            self._status(500 if self.kind == "http" else 403, [], end=True)
        elif self.peer.can_send(self.stream_id):
            self.peer.end_stream(self.stream_id)


class _Connection:
    """The lab's side of one QUIC connection: a request stream becomes an ASGI
    exchange, except what never reaches the application (RFC 9114 and 9220
    refusals)."""

    def __init__(self, side: H3Side, quic: HeldWindowQuic, listener: QuicListener) -> None:
        self.side = side
        self.peer = H3Peer(quic, self.on_event, router=listener)
        self.exchanges: dict[int, _Exchange] = {}

    def on_event(self, event: PeerEvent) -> None:
        if isinstance(event, HeadersReceived):
            exchange = self.exchanges.get(event.stream_id)
            if exchange is None:
                exchange = self._start(event.stream_id, event.headers)
            if exchange is not None and event.stream_ended:
                exchange.on_data(b"", True)
        elif isinstance(event, DataReceived) and event.stream_id in self.exchanges:
            self.exchanges[event.stream_id].on_data(event.data, event.stream_ended)
        elif isinstance(event, StreamAborted) and event.stream_id in self.exchanges:
            self.exchanges[event.stream_id].disconnect()
        elif isinstance(event, ConnectionClosed):
            for exchange in self.exchanges.values():
                exchange.disconnect()

    def _start(self, stream_id: int, raw_headers) -> Optional[_Exchange]:
        pseudo, _ = split_pseudo([(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw_headers])
        headers = [(k.lower(), v) for k, v in raw_headers if not k.startswith(b":")]
        kind = classify_request(pseudo, connect_protocol_enabled=True)
        if kind.startswith("malformed"):
            self.peer.abort(stream_id, ErrorCode.H3_MESSAGE_ERROR)  # RFC 9114 §4.1.2
            return None
        if kind == "connect" or (kind == "extended-connect" and pseudo[":protocol"] != "websocket"):
            # The lab tunnels nothing; RFC 9220 §3: an unknown :protocol SHOULD get 501.
            status = b"405" if kind == "connect" else b"501"
            self.peer.send_headers(stream_id, [(b":status", status), (b"content-length", b"0")], end_stream=True)
            return None
        scope = request_scope("websocket" if kind == "extended-connect" else "http", pseudo, headers,
                              self.peer.remote_address, self.side.port)
        exchange = self.exchanges[stream_id] = _Exchange(self.peer, stream_id, scope["type"])
        exchange.task = asyncio.ensure_future(self.side.asgi(scope, exchange.receive, exchange.send))
        exchange.task.add_done_callback(exchange.done)
        exchange.task.add_done_callback(lambda _task: self.exchanges.pop(stream_id, None))
        self.side.tasks.add(exchange.task)
        exchange.task.add_done_callback(self.side.tasks.discard)
        return exchange


class H3Side:
    """An ASGI application served over HTTP/3 on UDP 127.0.0.1: `port` is
    known from construction on (for the TCP side's Alt-Svc)."""

    def __init__(self, asgi, certfile: str, keyfile: str, port: int = 0) -> None:
        self.asgi = asgi
        self.configuration = server_configuration(certfile, keyfile)
        self._socket = bind_udp(port)
        self.port: int = self._socket.getsockname()[1]
        self.tasks: set[asyncio.Task] = set()
        self._listener: Optional[QuicListener] = None

    @property
    def alt_svc(self) -> str:
        """What the TCP side's responses say to move a client here (RFC 7838)."""
        return f'h3=":{self.port}"'

    def _connection(self, quic: HeldWindowQuic, listener: QuicListener) -> H3Peer:
        return _Connection(self, quic, listener).peer

    async def start(self) -> H3Side:
        _transport, self._listener = await asyncio.get_running_loop().create_datagram_endpoint(
            lambda: QuicListener(self.configuration, self._connection), sock=self._socket)
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """Close every connection; the application's tasks, told the client is
        gone, get `timeout` to return before they are cancelled."""
        if self._listener is not None:
            await self._listener.close(timeout)
            self._listener = None
        if self.tasks:
            _done, pending = await asyncio.wait(self.tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        self._socket.close()
