"""WebSocket-over-HTTP/2 (RFC 8441) test peers.

A server and a client that speak WebSockets over HTTP/2 extended CONNECT
(``:method CONNECT`` + ``:protocol websocket``), built only on the standard
library plus h2, wsproto and cryptography (all mitmproxy dependencies), so the
ws-encode tests can run them wherever mitmproxy runs.

The server can reproduce the fault ws-encode diagnoses: a response-encoding
layer that buffers the ``:status`` of an extended CONNECT until the first body
bytes exist.  The WebSocket app only speaks after the client's first message,
and a well-behaved client waits for the ``:status`` before speaking, so the
handshake stalls.

Library use::

    certfile, keyfile = make_self_signed_cert(tmpdir)
    async with H2WebSocketServer(certfile, keyfile) as server:
        async with H2WebSocketClient("127.0.0.1", server.port) as client:
            ws = await client.open_websocket("/", "localhost")
            assert await ws.wait_status(5) == 200
            await ws.send_text("hello")
            assert await ws.receive(5) == "hello"
            await ws.close()

Command line::

    python scripts/h2ws.py server --port 8443 --withhold
    python scripts/h2ws.py client --url https://127.0.0.1:8443/ --accept-encoding gzip
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import ssl
import sys
import urllib.parse
from typing import Optional, Union

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from h2.errors import ErrorCodes
from wsproto.connection import ConnectionType

from . import streams
from .messages import MessageConnection
from .streams import (
    DEFAULT_TIMEOUT,
    Headers,
    StreamResetError,
    WebSocketClosed,
    WebSocketOnStream,
    split_pseudo,
    wait_first,
)

__all__ = [
    "ClientWebSocket",
    "H2WebSocketClient",
    "H2WebSocketServer",
    "StreamResetError",
    "WebSocketClosed",
    "make_self_signed_cert",
    "main",
]

LISTEN_HOST = "127.0.0.1"
READ_CHUNK = 65536
# asyncio waits up to 30 s for the peer's TLS close_notify by default; an
# unresponsive peer would make stop()/close() crawl.
TLS_SHUTDOWN_TIMEOUT = 2.0
REJECTION_BODY = b"rejected\n"
GET_BODY = b"ok"
PUSH_MESSAGE_SIZE = 1 << 20  # what a WebSocket opened with ?push=N is sent, N bytes in all


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------


def make_self_signed_cert(dirpath: Union[str, os.PathLike]) -> tuple[str, str]:
    """Write a self-signed certificate for "localhost" and return (certfile, keyfile).

    The SAN covers DNS:localhost and IP:127.0.0.1.  An EC P-256 key keeps
    generation fast enough to do per test module.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate clock skew
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certfile = os.path.join(os.fspath(dirpath), "localhost-cert.pem")
    keyfile = os.path.join(os.fspath(dirpath), "localhost-key.pem")
    with open(certfile, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    # The key is only a test key, but there is no reason to make it world-readable.
    fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return certfile, keyfile


# --------------------------------------------------------------------------
# Shared HTTP/2 plumbing
# --------------------------------------------------------------------------


def _encode_headers(headers: Headers) -> list[tuple[bytes, bytes]]:
    # Explicit UTF-8 bytes, so h2 4.1 and 4.4 get identical input.
    return [(name.encode(), value.encode()) for name, value in headers]


def _decode_headers(headers) -> Headers:
    # h2 hands out bytes (we configure no header_encoding); lowercase the names
    # so tests can compare without caring about the peer's spelling.
    return [
        (
            (name.decode() if isinstance(name, bytes) else name).lower(),
            value.decode("utf-8", "replace") if isinstance(value, bytes) else value,
        )
        for name, value in headers
    ]


class _Outbox:
    """Bytes of one stream waiting for HTTP/2 flow-control window."""

    def __init__(self) -> None:
        self.pending = bytearray()
        self.end_stream = False  # send END_STREAM once `pending` is empty
        self.drained = asyncio.Event()


class _H2Endpoint:
    """An h2 state machine driven over an asyncio TLS stream.

    Events are handled synchronously by the read loop.  Outgoing body bytes go
    into per-stream outboxes which `_pump()` writes as far as the peer's
    windows allow; the read loop calls it after every batch, so a WINDOW_UPDATE
    resumes sending without the read loop ever blocking on the window (it is
    the one that has to read the WINDOW_UPDATE).
    """

    def __init__(self, config: h2.config.H2Configuration) -> None:
        self.conn = h2.connection.H2Connection(config=config)
        self._reader: Optional[asyncio.StreamReader] = None
        self._writer: Optional[asyncio.StreamWriter] = None
        self._outboxes: dict[int, _Outbox] = {}
        self.connection_lost = asyncio.Event()
        self.goaway: Optional[h2.events.ConnectionTerminated] = None
        self.protocol_error: Optional[h2.exceptions.ProtocolError] = None
        self.transport_error: Optional[BaseException] = None

    def _attach(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    # -- output -------------------------------------------------------------

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    def _send_soon(self, stream_id: int, data: bytes = b"", end_stream: bool = False) -> _Outbox:
        """Queue body bytes (and optionally END_STREAM) behind earlier ones."""
        box = self._outboxes.get(stream_id)
        if box is None:
            box = self._outboxes[stream_id] = _Outbox()
        box.pending += data
        box.end_stream = box.end_stream or end_stream
        box.drained.clear()
        return box

    def _drop_outbox(self, stream_id: int) -> None:
        box = self._outboxes.pop(stream_id, None)
        if box is not None:
            box.drained.set()  # wake senders; they check the stream's fate themselves

    def _pump(self) -> None:
        for stream_id, box in list(self._outboxes.items()):
            try:
                self._pump_stream(stream_id, box)
            except h2.exceptions.StreamClosedError:
                # The peer reset the stream; the remaining bytes have nowhere to go.
                self._drop_outbox(stream_id)

    def _pump_stream(self, stream_id: int, box: _Outbox) -> None:
        ended = False
        while box.pending:
            room = min(
                self.conn.local_flow_control_window(stream_id),
                self.conn.max_outbound_frame_size,
            )
            if room <= 0:
                return  # resumed by the read loop after the next WINDOW_UPDATE
            chunk = bytes(box.pending[:room])
            del box.pending[:room]
            ended = box.end_stream and not box.pending
            self.conn.send_data(stream_id, chunk, end_stream=ended)
        if box.end_stream and not ended:
            self.conn.end_stream(stream_id)
        del self._outboxes[stream_id]
        box.drained.set()

    # -- input --------------------------------------------------------------

    async def _run(self) -> None:
        """Read, dispatch and answer until the connection ends."""
        assert self._reader is not None and self._writer is not None
        try:
            while self.goaway is None:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except h2.exceptions.ProtocolError as exc:
                    self.protocol_error = exc
                    self._flush()  # h2 has queued a GOAWAY explaining why
                    break
                for event in events:
                    self._dispatch(event)
                self._pump()
                self._flush()
                await self._writer.drain()
        except (ConnectionError, ssl.SSLError) as exc:
            self.transport_error = exc
        finally:
            self._writer.close()
            self.connection_lost.set()
            self._on_connection_lost()

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event
            return
        try:
            self._handle_event(event)
        except h2.exceptions.StreamClosedError as exc:
            # h2 had already processed the peer's RST_STREAM (from the same
            # read) by the time we answered an earlier event of that stream.
            self._forget_stream(exc.stream_id)

    def _handle_event(self, event: h2.events.Event) -> None:
        raise NotImplementedError

    def _forget_stream(self, stream_id: int) -> None:
        self._drop_outbox(stream_id)

    def _on_connection_lost(self) -> None:
        for box in self._outboxes.values():
            box.drained.set()
        self._outboxes.clear()


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------


class _ServerWebSocket:
    """Server-side state of one accepted extended CONNECT stream."""

    def __init__(self, stream_id: int, withheld_status: Optional[Headers]) -> None:
        self.stream_id = stream_id
        self.connection = MessageConnection(ConnectionType.SERVER)
        # The response headers a buffering encoder is sitting on, if any.
        self.withheld_status = withheld_status
        # Opened with ?deaf: its DATA is never read or acknowledged, so its
        # window closes (an upstream that does not read).
        self.deaf = False


class _ServerConnection(_H2Endpoint):
    def __init__(self, server: "H2WebSocketServer", index: int) -> None:
        super().__init__(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self._server = server
        self.index = index
        self._websockets: dict[int, _ServerWebSocket] = {}
        self._pushers: set[asyncio.Task] = set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._attach(reader, writer)
        if self._server.enable_connect_protocol:
            # Assigning local_settings.enable_connect_protocol would only queue
            # the value until the peer ACKs it, and the initial SETTINGS would
            # still say 0; it has to be an initial value.
            self.conn.local_settings = h2.settings.Settings(
                client=False,
                initial_values={
                    **dict(self.conn.local_settings),  # keep h2's defaults
                    h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL: 1,
                },
            )
        else:
            # h2 would otherwise announce ENABLE_CONNECT_PROTOCOL=0 explicitly;
            # leaving it out looks like a server that has never heard of RFC 8441.
            del self.conn.local_settings[h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL]
        if self._server.max_concurrent_streams is not None:
            self.conn.local_settings.max_concurrent_streams = self._server.max_concurrent_streams
            self.conn.local_settings.acknowledge()  # in force now, so the first SETTINGS says it
        self.conn.initiate_connection()
        self._flush()
        await self._run()

    def shutdown(self) -> None:
        """Say GOAWAY and close; the read loop then ends on its own."""
        if self._writer is None or self.connection_lost.is_set():
            return
        self.conn.close_connection()
        self._flush()
        self._writer.close()

    # -- events -------------------------------------------------------------

    def _handle_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event.stream_id, _decode_headers(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            ws = self._websockets.get(event.stream_id)
            if event.flow_controlled_length and ws is not None and ws.deaf:
                self.conn.increment_flow_control_window(event.flow_controlled_length)  # the connection's only
            elif event.flow_controlled_length:
                # Echo output is buffered without limit, so the data counts as
                # consumed right away.  Streams we already forgot get acked too,
                # or their bytes would leak out of the connection window.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if ws is not None and not ws.deaf:
                self._on_websocket_data(ws, event.data)
        elif isinstance(event, h2.events.StreamEnded):
            ws = self._websockets.get(event.stream_id)
            if ws is not None:
                self._end_websocket(ws)
        elif isinstance(event, h2.events.StreamReset):
            self._forget_stream(event.stream_id)

    def _forget_stream(self, stream_id: int) -> None:
        self._websockets.pop(stream_id, None)
        super()._forget_stream(stream_id)

    def _on_connection_lost(self) -> None:
        super()._on_connection_lost()
        for task in self._pushers:
            task.cancel()

    def _on_request(self, stream_id: int, headers: Headers) -> None:
        pseudo, regular = split_pseudo(headers)
        self._server.requests.append(
            {"connection": self.index, "stream_id": stream_id, "pseudo": pseudo, "headers": regular}
        )
        method = pseudo.get(":method")
        if method == "CONNECT" and ":protocol" in pseudo:
            self._on_extended_connect(stream_id, pseudo, regular)
        elif method == "CONNECT":
            self._respond(stream_id, 405, b"plain CONNECT is not supported\n")
        else:
            self._respond(stream_id, 200, GET_BODY)

    def _respond(self, stream_id: int, status: int, body: bytes, extra: Headers = ()) -> None:
        headers = [
            (":status", str(status)),
            ("content-type", "text/plain"),
            ("content-length", str(len(body))),
            *extra,
        ]
        self.conn.send_headers(stream_id, _encode_headers(headers))
        self._send_soon(stream_id, body, end_stream=True)

    def _on_extended_connect(self, stream_id: int, pseudo: dict[str, str], regular: Headers) -> None:
        server = self._server
        if not server.enable_connect_protocol:
            # RFC 8441 section 3: :protocol without the setting is malformed,
            # which RFC 9113 section 8.1.1 makes a PROTOCOL_ERROR stream error.
            self.conn.reset_stream(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        if server.reset_after_connect:
            self.conn.reset_stream(stream_id, server.reset_code)
            return
        if pseudo.get(":protocol") != "websocket":
            self._respond(stream_id, 501, b"only :protocol websocket is supported\n")
            return
        if not 200 <= server.status < 300:
            self._respond(stream_id, server.status, REJECTION_BODY, server.response_headers)
            return

        status_headers = [(":status", str(server.status)), *server.response_headers]
        wants_encoding = any(name == "accept-encoding" for name, _ in regular)
        if server.withhold_status_when_encoding and wants_encoding:
            # The fault: an encoder that emits headers only with the first body bytes.
            self._websockets[stream_id] = _ServerWebSocket(stream_id, status_headers)
        else:
            ws = self._websockets[stream_id] = _ServerWebSocket(stream_id, None)
            self.conn.send_headers(stream_id, _encode_headers(status_headers))
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(pseudo.get(":path", "")).query, keep_blank_values=True)
            ws.deaf = "deaf" in query
            push = query.get("push")
            if push:
                task = asyncio.ensure_future(self._push(ws, int(push[0])))
                self._pushers.add(task)
                task.add_done_callback(self._pushers.discard)

    async def _push(self, ws: _ServerWebSocket, total: int) -> None:
        """Send `total` bytes of binary messages, as fast as the peer takes
        them (its windows, then TCP), while the WebSocket lasts."""
        frame = ws.connection.send_data(bytes(PUSH_MESSAGE_SIZE))
        for _ in range(0, total, PUSH_MESSAGE_SIZE):
            if self._websockets.get(ws.stream_id) is not ws or self.connection_lost.is_set():
                return
            self._send_soon(ws.stream_id, frame)
            self._pump()
            self._flush()
            try:
                await self._writer.drain()
            except (ConnectionError, ssl.SSLError):
                return  # the read loop notices the connection is gone

    # -- WebSocket echo ------------------------------------------------------

    def _on_websocket_data(self, ws: _ServerWebSocket, data: bytes) -> None:
        for reply, last in ws.connection.echo(data):
            self._send_websocket(ws, reply, end_stream=last)

    def _send_websocket(self, ws: _ServerWebSocket, data: bytes, end_stream: bool = False) -> None:
        self._release_status(ws)
        self._send_soon(ws.stream_id, bytes(data), end_stream)
        if end_stream:
            # Our side is done; anything the client still sends is acked and ignored.
            self._websockets.pop(ws.stream_id, None)

    def _end_websocket(self, ws: _ServerWebSocket) -> None:
        # A buffering encoder flushes its headers when the body ends, too.
        self._release_status(ws)
        self._send_soon(ws.stream_id, end_stream=True)
        self._websockets.pop(ws.stream_id, None)

    def _release_status(self, ws: _ServerWebSocket) -> None:
        # Called right before body bytes are queued; the read loop writes
        # HEADERS and the first DATA frame with a single transport write.
        if ws.withheld_status is not None:
            self.conn.send_headers(ws.stream_id, _encode_headers(ws.withheld_status))
            ws.withheld_status = None


class H2WebSocketServer:
    """RFC 8441 echo server on 127.0.0.1 (TLS, ALPN "h2" only).

    Answers extended CONNECT with `status` and then echoes every WebSocket
    message; a WebSocket whose path has `?push=N` is also sent N bytes of
    PUSH_MESSAGE_SIZE binary messages unasked, as fast as the peer takes
    them, and one with `?deaf` never reads. Any other request gets 200 "ok".  Every request is recorded in
    `requests` as {"connection", "stream_id", "pseudo": {name: value},
    "headers": [(name, value), ...]} with lowercased names.
    """

    def __init__(
        self,
        certfile: str,
        keyfile: str,
        *,
        port: int = 0,
        enable_connect_protocol: bool = True,
        withhold_status_when_encoding: bool = False,
        reset_after_connect: bool = False,
        reset_code: int = ErrorCodes.CANCEL,
        status: int = 200,
        response_headers: Optional[Headers] = None,
        max_concurrent_streams: Optional[int] = None,
    ) -> None:
        self.certfile = certfile
        self.keyfile = keyfile
        self.enable_connect_protocol = enable_connect_protocol
        self.withhold_status_when_encoding = withhold_status_when_encoding
        self.reset_after_connect = reset_after_connect
        self.reset_code = reset_code  # e.g. HTTP_1_1_REQUIRED, to send a client elsewhere
        self.status = status
        self.response_headers: Headers = [(n.lower(), v) for n, v in (response_headers or [])]
        self.max_concurrent_streams = max_concurrent_streams  # None: h2's default (100)
        self.requests: list[dict] = []
        # HTTP/2 protocol violations by clients; each one ended its connection.
        self.protocol_errors: list[h2.exceptions.ProtocolError] = []
        self.connections_accepted = 0
        self._requested_port = port
        self._server: Optional[asyncio.AbstractServer] = None
        self._live: dict[_ServerConnection, asyncio.Task] = {}

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("server not started")
        return self._server.sockets[0].getsockname()[1]

    def _ssl_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.certfile, self.keyfile)
        context.set_alpn_protocols(["h2"])
        return context

    async def start(self) -> "H2WebSocketServer":
        self._server = await asyncio.start_server(
            self._handle_client,
            LISTEN_HOST,
            self._requested_port,
            ssl=self._ssl_context(),
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
        )
        return self

    async def stop(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Stop listening, send GOAWAY on every connection and close them."""
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._live):
            connection.shutdown()
        tasks = list(self._live.values())
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=timeout)
        await asyncio.wait_for(self._server.wait_closed(), timeout)
        self._server = None

    async def __aenter__(self) -> "H2WebSocketServer":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def _handle_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            writer.close()  # this server speaks nothing but h2
            return
        connection = _ServerConnection(self, self.connections_accepted)
        self.connections_accepted += 1
        self._live[connection] = asyncio.current_task()
        try:
            await connection.serve(reader, writer)
        finally:
            del self._live[connection]
            if connection.protocol_error is not None:
                self.protocol_errors.append(connection.protocol_error)


# --------------------------------------------------------------------------
# Client
# --------------------------------------------------------------------------

class DualAlpnServer(H2WebSocketServer):
    """HTTP/2 without RFC 8441 (unless asked) and HTTP/1.1 WebSockets on one
    port, chosen by ALPN: what a browser falls back from and to. `h1` serves
    the HTTP/1.1 connections (fault_server.FaultServer)."""

    def __init__(self, cert, h1, enable_connect_protocol: bool = False, **options):
        super().__init__(*cert, enable_connect_protocol=enable_connect_protocol, **options)
        self.h1 = h1

    def _ssl_context(self):
        context = super()._ssl_context()
        context.set_alpn_protocols(["h2", "http/1.1"])
        return context

    async def _handle_client(self, reader, writer):
        if writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1":
            await self.h1._serve(reader, writer)
        else:
            await super()._handle_client(reader, writer)


class ClientWebSocket(WebSocketOnStream):
    """One WebSocket on an H2WebSocketClient connection.

    `events` is a readable timeline ("status:200", "message", "close:1000",
    "end_stream", "reset:8", ...).  `ended_with` records how the stream ended
    first: "end_stream" (peer's END_STREAM), "reset:<code>" (peer's
    RST_STREAM), "local_reset:<code>" (our reset()) or "connection_lost".
    """

    def __init__(self, client: "H2WebSocketClient", stream_id: int) -> None:
        super().__init__(stream_id)
        self._client = client
        # Set once nothing can be sent any more (a reset or connection loss);
        # the peer's END_STREAM alone still lets us send.
        self._dead_reason: Optional[str] = None
        # False: this stream's DATA is never acknowledged, so its window
        # closes (a client that does not read); the connection's still opens.
        self.reading = True

    async def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """Abort the stream with RST_STREAM."""
        if self._dead_reason:
            return
        try:
            self._client.conn.reset_stream(self.stream_id, code)
        except h2.exceptions.StreamClosedError:
            return  # h2 already considers the stream closed; nothing to reset
        self._client._forget_stream(self.stream_id)
        self._client._flush()
        self._on_ended(f"local_reset:{int(code)}")

    # -- how frames go out over HTTP/2 ----------------------------------------

    def _dead(self) -> Optional[str]:
        return self._dead_reason

    async def _send_frames(self, frames: list[bytes], timeout: float) -> None:
        self._check_sendable()
        box = None
        for frame in frames:
            box = self._client._send_soon(self.stream_id, bytes(frame))
        self._client._pump()
        self._client._flush()
        await asyncio.wait_for(box.drained.wait(), timeout)
        if self._dead_reason:
            raise self._ended_error("while sending")

    def _send_now(self, frame: bytes, end_stream: bool = False) -> None:
        """Queue from inside the read loop, which pumps and flushes afterwards."""
        self._client._send_soon(self.stream_id, bytes(frame), end_stream)
        self._end_sent = self._end_sent or end_stream

    def _end_our_side(self) -> None:
        if self._end_sent or self._dead_reason:
            return
        self._send_now(b"", end_stream=True)
        self._client._pump()
        self._client._flush()

    def _ended_error(self, what: str) -> WebSocketClosed:
        kind, _, code = (self._dead_reason or self.ended_with or "").partition(":")
        if kind in ("reset", "local_reset"):
            return StreamResetError(self.stream_id, int(code), by_peer=kind == "reset")
        return WebSocketClosed(f"stream {self.stream_id} ended ({self.ended_with}) {what}")

    # -- called by the client's read loop -----------------------------------

    def _on_end(self) -> None:
        self._on_ended("end_stream")

    def _on_reset(self, code: int) -> None:
        self._on_ended(f"reset:{int(code)}")

    def _on_connection_lost(self) -> None:
        self._on_ended("connection_lost")

    def _on_ended(self, how: str) -> None:
        if how != "end_stream" and self._dead_reason is None:
            self._dead_reason = how
        super()._on_ended(how)


class _GetExchange:
    """An ordinary request/response on the client connection."""

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id
        self.status: Optional[int] = None
        self.body = bytearray()
        self.error: Optional[Exception] = None
        self.done = asyncio.Event()

    def _on_response(self, headers: Headers) -> None:
        self.status = int(dict(headers)[":status"])

    def _on_data(self, data: bytes) -> None:
        self.body += data

    def _on_end(self) -> None:
        self.done.set()

    def _on_reset(self, code: int) -> None:
        self.error = StreamResetError(self.stream_id, int(code))
        self.done.set()

    def _on_connection_lost(self) -> None:
        if not self.done.is_set():
            self.error = ConnectionError(f"connection lost before stream {self.stream_id} finished")
            self.done.set()


class H2WebSocketClient(_H2Endpoint):
    """HTTP/2 client that opens RFC 8441 WebSockets and plain GETs on one connection.

    Certificate verification is off: it is meant to talk to test servers and
    to proxies that mint certificates with their own CA.  `events` records
    every raw h2 event received, in order.
    """

    def __init__(self, host: str, port: int, *, server_hostname: Optional[str] = None) -> None:
        super().__init__(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.host = host
        self.port = port
        self.server_hostname = server_hostname or host
        self.events: list[h2.events.Event] = []
        self._streams: dict[int, Union[ClientWebSocket, _GetExchange]] = {}
        self._settings_received = asyncio.Event()
        self._read_task: Optional[asyncio.Task] = None

    @property
    def server_enables_connect_protocol(self) -> bool:
        return self.conn.remote_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL) == 1

    async def connect(self, timeout: float = DEFAULT_TIMEOUT) -> "H2WebSocketClient":
        """Connect, negotiate h2 and wait for the server's SETTINGS."""
        if self._writer is not None:
            raise RuntimeError("already connected")
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                self.host,
                self.port,
                ssl=context,
                server_hostname=self.server_hostname,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
            ),
            timeout,
        )
        alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
        if alpn != "h2":
            writer.close()
            raise ConnectionError(f"server did not negotiate h2 (ALPN: {alpn!r})")
        self._attach(reader, writer)
        self.conn.initiate_connection()
        self._flush()
        self._read_task = asyncio.create_task(self._run())
        await wait_first(self._settings_received, self.connection_lost, timeout=timeout)
        if not self._settings_received.is_set():
            raise ConnectionError("connection closed before the server's SETTINGS arrived")
        return self

    async def open_websocket(
        self,
        path: str,
        authority: str,
        headers: Optional[Headers] = None,
        scheme: str = "https",
        data_before_status: Optional[bytes] = None,
        protocol: str = "websocket",
    ) -> ClientWebSocket:
        """Send an extended CONNECT (without END_STREAM) and return the WebSocket.

        The request is sent even if the server did not advertise
        SETTINGS_ENABLE_CONNECT_PROTOCOL, so misbehaviour can be provoked.
        `data_before_status` (UTF-8) goes out as a masked text frame right
        behind the HEADERS, without waiting for the response.  `protocol`
        other than "websocket" is for provoking refusals.
        """
        self._require_open()
        stream_id = self.conn.get_next_available_stream_id()
        request = streams.extended_connect(path, authority, scheme, protocol, headers or [])
        ws = ClientWebSocket(self, stream_id)
        self._streams[stream_id] = ws
        self.conn.send_headers(stream_id, _encode_headers(request))
        if data_before_status is not None:
            ws._send_now(ws._frames.send_data(data_before_status.decode("utf-8")))
            self._pump()
        self._flush()
        return ws

    async def get(
        self,
        path: str,
        authority: str,
        headers: Optional[Headers] = None,
        scheme: str = "https",
        timeout: float = DEFAULT_TIMEOUT,
    ) -> tuple[int, bytes]:
        """An ordinary GET on the same connection; returns (status, body)."""
        self._require_open()
        stream_id = self.conn.get_next_available_stream_id()
        request = streams.get_request(path, authority, scheme, headers or [])
        exchange = _GetExchange(stream_id)
        self._streams[stream_id] = exchange
        self.conn.send_headers(stream_id, _encode_headers(request), end_stream=True)
        self._flush()
        await asyncio.wait_for(exchange.done.wait(), timeout)
        if exchange.error is not None:
            raise exchange.error
        assert exchange.status is not None
        return exchange.status, bytes(exchange.body)

    async def close(self, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Send GOAWAY, close the TLS connection and wait for the read loop."""
        if self._writer is None:
            return
        if not self.connection_lost.is_set():
            self.conn.close_connection()
            self._flush()
            self._writer.close()
        if self._read_task is not None:
            _done, pending = await asyncio.wait([self._read_task], timeout=timeout)
            if pending:
                self._read_task.cancel()
                await asyncio.wait(pending, timeout=timeout)
        try:
            await asyncio.wait_for(self._writer.wait_closed(), timeout)
        except (ConnectionError, ssl.SSLError):
            pass  # the peer dropped the TLS session uncleanly; we are closed either way
        except asyncio.TimeoutError:
            # A busy peer (a proxy still discarding what it was pushed) may not
            # answer our close_notify in time: our side is closed all the same.
            self._writer.transport.abort()

    async def __aenter__(self) -> "H2WebSocketClient":
        # Also usable as `async with await client.connect():`.
        return self if self._writer is not None else await self.connect()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    def _require_open(self) -> None:
        if self._writer is None:
            raise RuntimeError("not connected; call connect() first")
        if self.connection_lost.is_set() or self.goaway is not None:
            raise ConnectionError("the HTTP/2 connection is closed")

    # -- events -------------------------------------------------------------

    def _handle_event(self, event: h2.events.Event) -> None:
        self.events.append(event)
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self._settings_received.set()
            return
        stream_id = getattr(event, "stream_id", None)
        stream = self._streams.get(stream_id)
        if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
            if isinstance(stream, ClientWebSocket) and not stream.reading:
                self.conn.increment_flow_control_window(event.flow_controlled_length)
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        if stream is None:
            return
        if isinstance(event, h2.events.ResponseReceived):
            stream._on_response(_decode_headers(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            stream._on_data(event.data)
        elif isinstance(event, h2.events.StreamEnded):
            stream._on_end()
        elif isinstance(event, h2.events.StreamReset):
            self._forget_stream(stream_id)
            stream._on_reset(event.error_code)

    def _forget_stream(self, stream_id: int) -> None:
        self._streams.pop(stream_id, None)
        super()._forget_stream(stream_id)

    def _on_connection_lost(self) -> None:
        super()._on_connection_lost()
        for stream in self._streams.values():
            stream._on_connection_lost()
        self._streams.clear()


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


async def _serve_forever(args: argparse.Namespace) -> None:
    server = H2WebSocketServer(
        *streams.server_files(args, make_self_signed_cert),
        port=args.port,
        enable_connect_protocol=not args.no_connect_protocol,
        withhold_status_when_encoding=args.withhold,
        reset_after_connect=args.reset_after_connect,
        status=args.status,
        response_headers=args.header,
    )
    await streams.serve_until_cancelled(server, f"listening on {LISTEN_HOST}:{{port}}")


def _warn_without_connect_protocol(client: "H2WebSocketClient") -> None:
    if not client.server_enables_connect_protocol:
        print("warning: server does not advertise SETTINGS_ENABLE_CONNECT_PROTOCOL", file=sys.stderr)


async def _run_client(args: argparse.Namespace) -> int:
    return await streams.echo_client(args, H2WebSocketClient, (OSError, asyncio.TimeoutError, ssl.SSLError),
                                     _warn_without_connect_protocol)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="RFC 8441 (WebSockets over HTTP/2) test peers.")
    commands = parser.add_subparsers(dest="command", required=True)

    server = commands.add_parser(
        "server", help="run an RFC 8441 echo server on 127.0.0.1 until Ctrl-C"
    )
    streams.add_server_arguments(server, "TCP")
    server.add_argument(
        "--reset-after-connect",
        action="store_true",
        help="answer extended CONNECT with RST_STREAM(CANCEL)",
    )

    client = commands.add_parser(
        "client",
        help="open one WebSocket, send a message and print the echo",
        description=streams.CLIENT_EXIT_STATUS,
    )
    streams.add_client_arguments(client)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    return streams.run(_build_parser().parse_args(argv), _serve_forever, _run_client)


if __name__ == "__main__":
    sys.exit(main())
