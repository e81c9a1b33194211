"""What the addon costs: handshake and message round-trip rates, with vs without it.

    python scripts/bench.py [--handshakes 200] [--messages 2000] [--concurrent 200]

Measured in one run, on 127.0.0.1, against an echo upstream:
- HTTP/1.1: direct, through mitmdump alone, through mitmdump with the addon;
- HTTP/2 (RFC 8441): direct, through mitmdump with the addon (stock mitmproxy
  cannot carry HTTP/2 WebSockets, so there is no "without" to compare);
- scale: `--concurrent` HTTP/1.1 WebSockets held open at once (opened in
  ramped batches: mitmproxy listens with a backlog of 100), each echoing once,
  through mitmdump alone and with the addon.
Prints rates and the ratios between them. Every loop is bounded in count.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import h2ws
from fault_server import Faults, FaultServer
from mitmdump_proc import ADDON, start_reverse_proxy
from wsproto import WSConnection
from wsproto.connection import ConnectionType
from wsproto.events import AcceptConnection, Message, Request, TextMessage



async def start_mitmdump(upstream: str, with_addon: bool):
    proc, port = await start_reverse_proxy(upstream, *(["-s", str(ADDON)] if with_addon else []))
    # Keep reading its log, or a full pipe would stall the proxy.
    asyncio.get_running_loop().create_task(proc.stdout.read())
    return proc, port


class H1Socket:
    """A minimal wsproto client over asyncio streams."""

    def __init__(self, reader, writer):
        self.reader, self.writer, self.ws = reader, writer, WSConnection(ConnectionType.CLIENT)

    @classmethod
    async def open(cls, port: int) -> H1Socket:
        sock = cls(*await asyncio.open_connection("127.0.0.1", port))
        sock.writer.write(sock.ws.send(Request(host="localhost", target="/bench")))
        await sock.next_event(AcceptConnection)
        return sock

    async def next_event(self, kind):
        while True:
            for event in self.ws.events():
                if isinstance(event, kind):
                    return event
            data = await asyncio.wait_for(self.reader.read(65536), 10)
            if not data:
                raise ConnectionError("closed")
            self.ws.receive_data(data)

    async def echo(self, text: str) -> None:
        self.writer.write(self.ws.send(TextMessage(text)))
        await self.next_event(Message)

    def close(self) -> None:
        self.writer.close()


async def h1_rates(port: int, handshakes: int, messages: int) -> tuple[float, float]:
    start = time.perf_counter()
    for _ in range(handshakes):
        (await H1Socket.open(port)).close()
    hs_rate = handshakes / (time.perf_counter() - start)
    sock = await H1Socket.open(port)
    start = time.perf_counter()
    for i in range(messages):
        await sock.echo(f"m{i}")
    msg_rate = messages / (time.perf_counter() - start)
    sock.close()
    return hs_rate, msg_rate


RAMP = 25  # connections opened at a time


async def concurrent_seconds(port: int, count: int, _messages: int) -> tuple[float, float]:
    """Seconds to open `count` WebSockets (ramped) and echo once on each while
    all are open; returned twice to fit `show` (opens/s, echoes/s)."""
    start = time.perf_counter()
    sockets: list[H1Socket] = []
    for batch in range(0, count, RAMP):
        sockets += await asyncio.gather(*(H1Socket.open(port) for _ in range(min(RAMP, count - batch))))
    opened = time.perf_counter()
    await asyncio.gather(*(sock.echo(f"c{i}") for i, sock in enumerate(sockets)))
    echoed = time.perf_counter()
    for sock in sockets:
        sock.close()
    return count / (opened - start), count / (echoed - opened)


async def h2_rates(port: int, handshakes: int, messages: int) -> tuple[float, float]:
    async with await h2ws.H2WebSocketClient("127.0.0.1", port, server_hostname="localhost").connect() as client:
        start = time.perf_counter()
        for i in range(handshakes):
            ws = await client.open_websocket(f"/bench{i}", "localhost")
            await ws.wait_status(10)
            await ws.close()
        hs_rate = handshakes / (time.perf_counter() - start)
        ws = await client.open_websocket("/bench", "localhost")
        await ws.wait_status(10)
        start = time.perf_counter()
        for i in range(messages):
            await ws.send_text(f"m{i}")
            await ws.receive(10)
        msg_rate = messages / (time.perf_counter() - start)
        await ws.close()
    return hs_rate, msg_rate


async def through(upstream: str, with_addon: bool, measure, handshakes: int, messages: int):
    proc, port = await start_mitmdump(upstream, with_addon)
    try:
        return await measure(port, handshakes, messages)
    finally:
        proc.terminate()
        await proc.wait()


def show(label: str, rates: tuple[float, float], base: tuple[float, float] | None = None) -> None:
    text = f"  {label:<32} {rates[0]:8.0f} handshakes/s {rates[1]:8.0f} echoes/s"
    if base:
        text += f"   ({rates[0] / base[0]:.2f}x, {rates[1] / base[1]:.2f}x)"
    print(text)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--handshakes", type=int, default=200)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--concurrent", type=int, default=200)
    args = parser.parse_args()
    n, m, c = args.handshakes, args.messages, args.concurrent

    h1 = FaultServer(Faults())
    await h1.start()
    direct = await h1_rates(h1.port, n, m)
    stock = await through(f"http://127.0.0.1:{h1.port}", False, h1_rates, n, m)
    addon = await through(f"http://127.0.0.1:{h1.port}", True, h1_rates, n, m)
    scale_stock = await through(f"http://127.0.0.1:{h1.port}", False, concurrent_seconds, c, 0)
    scale_addon = await through(f"http://127.0.0.1:{h1.port}", True, concurrent_seconds, c, 0)
    await h1.stop()
    print("HTTP/1.1 WebSockets (ratios against the line named in brackets)")
    show("direct", direct)
    show("mitmdump [direct]", stock, direct)
    show("mitmdump + ws_encode [direct]", addon, direct)
    show("mitmdump + ws_encode [mitmdump]", addon, stock)

    with tempfile.TemporaryDirectory() as certdir:
        async with h2ws.H2WebSocketServer(*h2ws.make_self_signed_cert(certdir)) as h2:
            direct2 = await h2_rates(h2.port, n, m)
            addon2 = await through(f"https://127.0.0.1:{h2.port}", True, h2_rates, n, m)
    print("HTTP/2 WebSockets (RFC 8441)")
    show("direct", direct2)
    show("mitmdump + ws_encode [direct]", addon2, direct2)
    print(f"{c} HTTP/1.1 WebSockets open at once (opens/s while ramping, echoes/s with all open)")
    show("mitmdump", scale_stock)
    show("mitmdump + ws_encode [mitmdump]", scale_addon, scale_stock)


if __name__ == "__main__":
    asyncio.run(main())
