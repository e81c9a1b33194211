"""An HTTP/1.1 WebSocket echo server that can withhold its 101 like a buffering encoder.

    python scripts/fault_server.py --port 8765 --withhold-when-encoded

With --withhold-when-encoded, a handshake that carries `accept-encoding` gets
no `101` until the client sends something — which a client that waits for the
status never does: the deadlock ws-encode diagnoses. Other faults for tests:
reset the connection instead of answering, answer with a given status, or add
`content-encoding` to the 101.

Standard library and wsproto only (a mitmproxy dependency), so it runs in the
same environment as the addon.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from dataclasses import dataclass, field

from wsproto.connection import ConnectionType
from wsproto.utilities import generate_accept_token

from .messages import MessageConnection


@dataclass
class Faults:
    withhold_when_encoded: bool = False  # hold the 101 while accept-encoding was offered
    reset: bool = False  # close the connection instead of answering
    status: int = 101  # answer with this status instead (e.g. 403)
    content_encoding: str | None = None  # add content-encoding to the 101
    wrong_accept: bool = False  # send a Sec-WebSocket-Accept that does not match


@dataclass
class Received:
    """What a handshake looked like when it reached this server."""

    method: str
    target: str
    headers: dict[str, str]


@dataclass
class FaultServer:
    faults: Faults = field(default_factory=Faults)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, port: int = 0) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def wait_received(self, count: int, timeout: float = 10) -> None:
        """Until `count` handshakes have reached this server."""
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self._arrived.clear()
                await self._arrived.wait()

    async def stop(self) -> None:
        assert self._server
        self._server.close()
        for w in list(self._writers):
            w.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._handshake_and_echo(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the peer went away; nothing to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _handshake_and_echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in filter(None, lines):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        self.received.append(Received(method, target, headers))
        self._arrived.set()
        if "websocket" not in headers.get("upgrade", "").lower():
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
            await writer.drain()
            return

        if self.faults.reset:
            writer.transport.abort()
            return
        early = b""
        if self.faults.withhold_when_encoded and "accept-encoding" in headers:
            # The encoder waits for the first body bytes before it writes the
            # status; the app only writes after the client's first message.
            early = await reader.read(65536)
            if not early:
                return
        if self.faults.status != 101:
            body = b"no websocket here\n"
            writer.write(
                b"HTTP/1.1 %d Refused\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                % (self.faults.status, len(body), body)
            )
            await writer.drain()
            return
        accept = generate_accept_token(headers.get("sec-websocket-key", "").encode()).decode()
        if self.faults.wrong_accept:
            accept = accept[::-1]
        response = (
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            f"sec-websocket-accept: {accept}\r\n"
        )
        if self.faults.content_encoding:
            response += f"content-encoding: {self.faults.content_encoding}\r\n"
        writer.write(response.encode() + b"\r\n")
        await self._echo(reader, writer, early)

    async def _echo(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
        connection = MessageConnection(ConnectionType.SERVER)
        while True:
            for event in connection.messages(data):
                writer.write(connection.send_data(event) if isinstance(event, (str, bytes)) else connection.answer(event))
            await writer.drain()
            if connection.closed_by is not None:
                return
            data = await reader.read(65536)
            if not data:
                return


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--withhold-when-encoded", action="store_true")
    args = parser.parse_args()
    server = FaultServer(Faults(withhold_when_encoded=args.withhold_when_encoded))
    await server.start(args.port)
    print(f"listening on 127.0.0.1:{server.port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stop.set)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop()


if __name__ == "__main__":
    asyncio.run(main())
