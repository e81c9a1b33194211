"""Minimal clients for the benchmark: HTTP/1.1 requests, event streams and WebSockets (ws:// and wss://).

HTTP/2 WebSockets and requests use `h2ws.H2WebSocketClient`.
"""

from __future__ import annotations

import asyncio
import ssl

from wsproto.connection import ConnectionType
from wsproto.events import CloseConnection
from wsproto.frame_protocol import CloseReason

from wspeers.messages import CLOSE_UNSENT, MessageConnection

READ = 1 << 18
TIMEOUT = 30
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # any 16 bytes in base64 will do
CLOSED = object()


def tls_context(alpn: str) -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # mitmproxy's own CA
    context.set_alpn_protocols([alpn])
    return context


H1_TLS = tls_context("http/1.1")


async def connect(port: int, tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, limit=READ,
            ssl=H1_TLS if tls else None, server_hostname="localhost" if tls else None,
        ),
        TIMEOUT,
    )


class H1Requests:
    """Ordinary HTTP/1.1 GETs on one keep-alive connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, tls: bool = False) -> H1Requests:
        return cls(*await connect(port, tls))

    async def get(self, path: str, accept: bytes = b"*/*") -> tuple[int, bytes]:
        """The status and body of a GET (content-length or chunked)."""
        self.writer.write(b"GET %s HTTP/1.1\r\nhost: localhost\r\naccept: %s\r\n\r\n" % (path.encode(), accept))
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        length, chunked = 0, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        body = await (self._chunks() if chunked else self.reader.readexactly(length))
        return int(head.split(b" ", 2)[1]), body

    async def _chunks(self) -> bytes:
        chunks = []
        while size := int((await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)).split(b";")[0], 16):
            chunks.append((await asyncio.wait_for(self.reader.readexactly(size + 2), TIMEOUT))[:-2])
        await asyncio.wait_for(self.reader.readuntil(b"\r\n"), TIMEOUT)  # (no trailers)
        return b"".join(chunks)

    async def first_event(self, path: str) -> bytes:
        """An event stream's first event (the upstream ends the stream after it)."""
        status, body = await self.get(path, b"text/event-stream")
        event, end, _ = body.partition(b"\n\n")
        if status != 200 or not end:
            raise ConnectionError(f"event stream answered {status}, {len(body)} bytes without an event")
        return event

    def close(self) -> None:
        self.writer.close()


class H1WebSocket:
    """A client WebSocket over HTTP/1.1: handshake, messages, closing handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.connection = MessageConnection(ConnectionType.CLIENT)
        self.messages: list = []

    @classmethod
    async def start(cls, port: int, path: str, tls: bool = False, headers: bytes = b"") -> H1WebSocket:
        """Connect and send the handshake, without waiting for the status."""
        sock = cls(*await connect(port, tls))
        sock.writer.write(
            b"GET %s HTTP/1.1\r\nhost: localhost\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: %s\r\nsec-websocket-version: 13\r\n%s\r\n" % (path.encode(), KEY, headers)
        )
        return sock

    async def wait_status(self) -> int:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        status = int(head.split(b" ", 2)[1])
        if status != 101:
            raise ConnectionError(f"handshake answered {status}")
        return status

    @classmethod
    async def open(cls, port: int, path: str, tls: bool = False) -> H1WebSocket:
        sock = await cls.start(port, path, tls)
        await sock.wait_status()
        return sock

    def send(self, data) -> None:
        self.writer.write(self.connection.send_data(data))

    async def drain(self) -> None:
        await self.writer.drain()

    async def receive(self):
        while not self.messages:
            data = await asyncio.wait_for(self.reader.read(READ), TIMEOUT)
            if not data:
                raise ConnectionError("closed before a message")
            for event in self.connection.messages(data):
                if isinstance(event, (str, bytes)):
                    self.messages.append(event)
                elif isinstance(event, CloseConnection):
                    self.messages.append(CLOSED)
        message = self.messages.pop(0)
        if message is CLOSED:
            raise ConnectionError("closed by the peer")
        return message

    async def echo(self, data) -> None:
        self.send(data)
        await self.receive()

    async def close(self) -> None:
        """The closing handshake, then the connection."""
        try:
            if self.connection.state in CLOSE_UNSENT:
                self.writer.write(self.connection.send(CloseConnection(CloseReason.NORMAL_CLOSURE)))
            while self.connection.closed_by is None:
                data = await asyncio.wait_for(self.reader.read(READ), TIMEOUT)
                if not data:
                    break
                for _ in self.connection.messages(data):
                    pass  # messages still on their way, dropped
        except (ConnectionError, asyncio.TimeoutError):
            pass
        finally:
            self.writer.close()

    def abort(self) -> None:
        self.writer.close()
