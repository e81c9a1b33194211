"""Real WebSocket clients for the matrix: each waits for the status before it
speaks, as browsers do, and says what it saw."""

from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass

from wspeers import h2ws, h3ws
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Message, RejectConnection, Request, TextMessage

from .app import GREETING

BROWSER_CODINGS = "gzip, deflate, br, zstd"  # what Chromium offers on a WebSocket handshake
HELLO = "hello"


@dataclass
class Seen:
    """What the client saw: `outcome` is echoed, greeted, unreadable (frames
    arrived but not the message sent: compressed bytes), gave up (no status in
    time), refused <status>, or failed (...)."""

    outcome: str
    status: int | None = None
    status_s: float | None = None  # seconds from sending the handshake to its status
    content_encoding: str | None = None


def _judge(got, speaker: str) -> str:
    want = HELLO if speaker == "client" else GREETING
    return ("echoed" if speaker == "client" else "greeted") if got == want else "unreadable"


async def h2_client(port: int, path: str, speaker: str, accept_encoding: str | None, give_up: float,
                    gate: asyncio.Semaphore) -> Seen:
    """RFC 8441 over the proxy's HTTP/2 (scripts/wspeers/h2ws.py)."""
    client = h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost")
    return await extended_connect_client(client, path, speaker, accept_encoding, give_up, gate)


async def h3_client(port: int, path: str, speaker: str, accept_encoding: str | None, give_up: float,
                    gate: asyncio.Semaphore) -> Seen:
    """RFC 9220 over the proxy's HTTP/3, QUIC on UDP `port` (scripts/wspeers/h3ws.py)."""
    client = h3ws.H3WebSocketClient("127.0.0.1", port, server_hostname="localhost")
    return await extended_connect_client(client, path, speaker, accept_encoding, give_up, gate)


async def cancel(ws: h2ws.ClientWebSocket | h3ws.ClientWebSocket) -> None:
    """Cancel a WebSocket whose status never came, as a browser does: its stream reset, and the
    connection to be closed right after, reading nothing more. Over HTTP/3 the peer answers the
    reset with STOP_SENDING, which aioquic 1.2 asserts on when it reads it (a reset already sent)."""
    await ws.reset()
    # h3ws sends the reset from a callback it has just scheduled, which runs before this resumes;
    # a QUIC connection that starts closing first would never send it.
    await asyncio.sleep(0)


async def extended_connect_client(client: h2ws.H2WebSocketClient | h3ws.H3WebSocketClient, path: str, speaker: str,
                                  accept_encoding: str | None, give_up: float, gate: asyncio.Semaphore) -> Seen:
    """One WebSocket by extended CONNECT: the h2ws and h3ws clients share this API."""
    headers = [("accept-encoding", accept_encoding)] if accept_encoding else []
    async with gate:  # TLS or QUIC handshakes a few at a time: mitmproxy spends milliseconds of CPU on each
        await client.connect()
    async with client:
        ws = await client.open_websocket(path, "localhost", headers=headers)
        sent = time.monotonic()
        try:
            status = await ws.wait_status(give_up)
        except asyncio.TimeoutError:
            await cancel(ws)
            return Seen("gave up")
        seen = Seen("", status, time.monotonic() - sent, dict(ws.response_headers).get("content-encoding"))
        if not 200 <= status < 300:
            seen.outcome = f"refused {status}"
            return seen
        try:
            if speaker == "client":
                await ws.send_text(HELLO)
            seen.outcome = _judge(await ws.receive(give_up), speaker)
            await ws.close(timeout=1)
        except (h2ws.WebSocketClosed, asyncio.TimeoutError) as e:
            seen.outcome = seen.outcome or f"failed ({type(e).__name__})"
        return seen


async def h1_event(ws: WSConnection, reader: asyncio.StreamReader, *kinds):
    """The next wsproto event of one of `kinds`, reading from `reader` as needed."""
    while True:
        for event in ws.events():
            if isinstance(event, kinds):
                return event
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("closed by the proxy")
        ws.receive_data(data)


async def h1_client(port: int, path: str, speaker: str, accept_encoding: str | None, give_up: float,
                    gate: asyncio.Semaphore) -> Seen:
    """An HTTP/1.1 upgrade over TLS, with wsproto on an asyncio stream."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    ws = WSConnection(ConnectionType.CLIENT)
    headers = [(b"accept-encoding", accept_encoding.encode())] if accept_encoding else []

    def next_event(*kinds):
        return h1_event(ws, reader, *kinds)

    try:
        writer.write(ws.send(Request(host="localhost", target=path, extra_headers=headers)))
        sent = time.monotonic()
        try:
            answer = await asyncio.wait_for(next_event(AcceptConnection, RejectConnection), give_up)
        except asyncio.TimeoutError:
            return Seen("gave up")
        status_s = time.monotonic() - sent
        if isinstance(answer, RejectConnection):
            return Seen(f"refused {answer.status_code}", answer.status_code, status_s)
        fields = {k.decode().lower(): v.decode() for k, v in answer.extra_headers}
        seen = Seen("", 101, status_s, fields.get("content-encoding"))
        if speaker == "client":
            writer.write(ws.send(TextMessage(HELLO)))
        try:
            message = await asyncio.wait_for(next_event(Message), give_up)
            seen.outcome = _judge(message.data, speaker)
            writer.write(ws.send(CloseConnection(1000)))
        except (asyncio.TimeoutError, ConnectionError) as e:
            seen.outcome = f"failed ({type(e).__name__})"
        return seen
    finally:
        writer.close()


CLIENTS = {"h1": h1_client, "h2": h2_client, "h3": h3_client}
