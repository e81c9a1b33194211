"""A raw HTTP/2 client for hostile header blocks, with a WebSocket stream beside them.

Built on h2 with client-side validation and normalisation off, so it sends
exactly the header blocks a test makes (uppercase names, stray pseudo-headers,
control characters...), many streams on one connection. Every stream's fate
is kept: its status, whether it was reset and with which code, its data.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from wsproto.frame_protocol import FrameProtocol, Opcode

Header = tuple[bytes, bytes]


def extended_connect(path: bytes, authority: bytes = b"localhost", *extra: Header) -> list[Header]:
    """A well-formed RFC 8441 WebSocket request."""
    return [
        (b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
        (b":path", path), (b":authority", authority), (b"sec-websocket-version", b"13"), *extra,
    ]


class RawH2:
    """One TLS connection speaking h2; streams are opened with `send`."""

    def __init__(self, port: int, server_hostname: str = "localhost") -> None:
        self.port = port
        self.server_hostname = server_hostname
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
            )
        )
        self.status: dict[int, int] = {}
        self.reset: dict[int, int] = {}  # stream id: error code the peer reset it with
        self.ended: set[int] = set()
        self.data: dict[int, bytearray] = {}
        self.closed_reason: str | None = None  # the connection ended (GOAWAY or EOF)
        self.settings_received = False
        self._changed = asyncio.Condition()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None

    async def connect(self, timeout: float = 10) -> RawH2:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        self._reader, self._writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port, ssl=context, server_hostname=self.server_hostname),
            timeout,
        )
        assert self._writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        self.conn.initiate_connection()
        self._flush()
        self._task = asyncio.create_task(self._read())
        await self.wait_until(lambda: self.settings_received, timeout)
        return self

    async def close(self) -> None:
        if self._writer is None:
            return
        if self.closed_reason is None:
            self.conn.close_connection()
            self._flush()
        self._writer.close()
        if self._task:
            await asyncio.wait([self._task], timeout=5)
            self._task.cancel()

    # -- streams ----------------------------------------------------------

    def send(self, headers: list[Header], end_stream: bool = False) -> int:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, headers, end_stream=end_stream)
        self._flush()
        return sid

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        self.conn.send_data(sid, data, end_stream=end_stream)
        self._flush()

    def cancel(self, sid: int) -> None:
        """Reset a stream of ours that is still open (a WebSocket we are done with)."""
        try:
            self.conn.reset_stream(sid)
        except h2.exceptions.StreamClosedError:
            return
        self._flush()

    def settled(self, sid: int) -> bool:
        """The stream has its answer: a status, a reset, or the connection is gone."""
        return sid in self.status or sid in self.reset or self.closed_reason is not None

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate() or self.closed_reason is not None), timeout)
        if not predicate():
            raise AssertionError(f"HTTP/2 connection ended: {self.closed_reason}")

    # -- a WebSocket on this connection ----------------------------------

    async def open_websocket(self, path: bytes, timeout: float = 10) -> RawWebSocket:
        ws = RawWebSocket(self, self.send(extended_connect(path)))
        await self.wait_until(lambda: self.settled(ws.sid), timeout)
        assert self.status.get(ws.sid) == 200, (self.status.get(ws.sid), self.reset.get(ws.sid))
        return ws

    # -- I/O --------------------------------------------------------------

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self._writer is not None and not self._writer.is_closing():
            self._writer.write(data)

    async def _read(self) -> None:
        assert self._reader
        try:
            while True:
                chunk = await self._reader.read(65536)
                if not chunk:
                    self.closed_reason = self.closed_reason or "connection closed by the proxy"
                    break
                try:
                    events = self.conn.receive_data(chunk)
                except h2.exceptions.ProtocolError as e:
                    self.closed_reason = f"protocol error from the proxy: {e}"
                    break
                for event in events:
                    self._on(event)
                self._flush()
                async with self._changed:
                    self._changed.notify_all()
        except (ConnectionError, ssl.SSLError) as e:
            self.closed_reason = self.closed_reason or f"connection lost: {e!r}"
        finally:
            async with self._changed:
                self._changed.notify_all()

    def _on(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RemoteSettingsChanged):
            self.settings_received = True
        elif isinstance(event, h2.events.ResponseReceived):
            self.status[event.stream_id] = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.data.setdefault(event.stream_id, bytearray()).extend(event.data)
            if event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamReset):
            self.reset[event.stream_id] = int(event.error_code)
        elif isinstance(event, h2.events.StreamEnded):
            self.ended.add(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.closed_reason = f"GOAWAY {event.error_code!r}: {event.additional_data!r}"


class RawWebSocket:
    """The client end of an RFC 8441 WebSocket on a RawH2 connection."""

    def __init__(self, client: RawH2, sid: int) -> None:
        self.client = client
        self.sid = sid
        self._out = FrameProtocol(client=True, extensions=[])
        self._in = FrameProtocol(client=True, extensions=[])
        self._seen = 0
        self._messages: list[str] = []
        self.close_frame: tuple | None = None  # (code, reason) of a Close frame that came

    async def echo(self, text: str, timeout: float = 10) -> str:
        """Send `text` and return the next text message that comes back."""
        self.client.send_data(self.sid, bytes(self._out.send_data(text)))
        await self.client.wait_until(
            lambda: self._parse() or self.sid in self.client.reset or self.close_frame is not None, timeout
        )
        assert self.sid not in self.client.reset, f"the WebSocket stream was reset ({self.client.reset[self.sid]})"
        assert self.close_frame is None, f"the proxy closed the WebSocket: {self.close_frame}"
        return self._messages.pop(0)

    def _parse(self) -> bool:
        data = self.client.data.get(self.sid, b"")
        if len(data) > self._seen:
            self._in.receive_bytes(bytes(data[self._seen:]))
            self._seen = len(data)
            for frame in self._in.received_frames():
                if frame.opcode is Opcode.TEXT and frame.message_finished:
                    self._messages.append(frame.payload)
                elif frame.opcode is Opcode.CLOSE:
                    self.close_frame = tuple(frame.payload)
        return bool(self._messages)
