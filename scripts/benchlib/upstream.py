"""The upstreams the benchmark's proxies stand in front of, in a process of their own.

    python -m benchlib.upstream CERTDIR     # prints {"h1": port, "h1_tls": port, "h2": port, "h2_hold": port, ...}

and serves until its stdin closes (so it never outlives the benchmark).

- h1 (plain HTTP/1.1, keep-alive): a request that accepts text/event-stream
  gets an event stream as the lab's /events serves one, its head flushed at
  once, then one small event, then its end (stock mitmproxy holds an event
  stream until its end, mitmproxy#4469: without the addon, a client would
  otherwise never see the event); any other request that is not an upgrade
  gets `200 ok`; a WebSocket upgrade is answered by path:
  `/echo...` echoes every message; `/sink/N...` takes N messages, then says
  `done`; `/source/N/SIZE...` sends N binary messages of SIZE bytes; `/hold...`
  never answers (a stalled handshake), until the client goes away.
- h1_tls: the same over TLS (ALPN http/1.1), so that an HTTP/1.1 WebSocket can
  be compared with an HTTP/2 one with TLS on both legs.
- h2: `h2ws.H2WebSocketServer`, an RFC 8441 echo server (TLS).
- h2_hold: the same, withholding the status of handshakes that offer
  accept-encoding (the encoder fault).
- h3 and h3_hold: the same over HTTP/3 (`h3ws.H3WebSocketServer`, RFC 9220,
  QUIC on UDP).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys

from wspeers import h2ws, h3ws
from wsproto.connection import ConnectionType
from wsproto.utilities import generate_accept_token

from wspeers.messages import MessageConnection

READ = 1 << 18
OK = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nok"
EVENTS_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
               b"transfer-encoding: chunked\r\n\r\n")
EVENT = b"data: e\n\n"


async def serve_h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *lines = head.decode("latin-1").split("\r\n")
            target = request_line.split(" ", 2)[1]
            headers = {}
            for line in filter(None, lines):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            if "text/event-stream" in headers.get("accept", ""):
                writer.write(EVENTS_HEAD)
                await writer.drain()
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(EVENT), EVENT))
                continue
            if "websocket" not in headers.get("upgrade", "").lower():
                if int(headers.get("content-length", "0") or 0):
                    await reader.readexactly(int(headers["content-length"]))
                writer.write(OK)
                continue
            if target.startswith("/hold"):
                while await reader.read(READ):
                    pass
                return
            accept = generate_accept_token(headers.get("sec-websocket-key", "").encode()).decode()
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                b"sec-websocket-accept: " + accept.encode() + b"\r\n\r\n"
            )
            await websocket(reader, writer, target)
            return
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: str) -> None:
    connection = MessageConnection(ConnectionType.SERVER)
    parts = target.strip("/").split("/")
    sink = int(parts[1]) if parts[0] == "sink" else None
    if parts[0] == "source":
        count, size = int(parts[1]), int(parts[2])
        payload = b"s" * size
        for i in range(count):
            writer.write(connection.send_data(payload))
            if i % 16 == 15:
                await writer.drain()
        await writer.drain()
    received = 0
    while connection.closed_by is None:
        data = await reader.read(READ)
        if not data:
            return
        for event in connection.messages(data):
            if not isinstance(event, (str, bytes)):
                writer.write(connection.answer(event))
            elif sink is None:
                writer.write(connection.send_data(event))
            else:
                received += 1
                if received == sink:
                    writer.write(connection.send_data("done"))
        await writer.drain()


async def main() -> None:
    certdir = sys.argv[1]
    cert, key = h2ws.make_self_signed_cert(certdir)
    h1 = await asyncio.start_server(serve_h1, "127.0.0.1", 0, backlog=1024, limit=READ)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    tls.set_alpn_protocols(["http/1.1"])
    h1_tls = await asyncio.start_server(serve_h1, "127.0.0.1", 0, backlog=1024, limit=READ, ssl=tls)
    h2 = await h2ws.H2WebSocketServer(cert, key).start()
    h2_hold = await h2ws.H2WebSocketServer(cert, key, withhold_status_when_encoding=True).start()
    h3 = await h3ws.H3WebSocketServer(cert, key).start()
    h3_hold = await h3ws.H3WebSocketServer(cert, key, withhold_status_when_encoding=True).start()
    ports = {"h1": h1.sockets[0].getsockname()[1], "h1_tls": h1_tls.sockets[0].getsockname()[1],
             "h2": h2.port, "h2_hold": h2_hold.port, "h3": h3.port, "h3_hold": h3_hold.port}
    print(json.dumps(ports), flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    await stdin.read()  # until the benchmark closes the pipe (or dies)
    h1.close()
    h1_tls.close()
    for server in (h2, h2_hold, h3, h3_hold):
        # The servers record every request; nobody reads them here.
        server.requests.clear()
    await asyncio.wait([asyncio.ensure_future(s.stop(1)) for s in (h2, h2_hold, h3, h3_hold)], timeout=3)


if __name__ == "__main__":
    asyncio.run(main())
