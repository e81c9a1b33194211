"""What the bundle written at exit keeps, through a real mitmdump: of large WebSockets, their first
messages only; of redacted values a server echoes elsewhere in a flow, nothing."""

from __future__ import annotations

import asyncio
import gzip

import pytest
import websockets
from conftest import Mitmdump, assert_clean_log, raw_exchange, upgrade_request

from wsencode import bundle

pytestmark = pytest.mark.timeout(90)


def run(coro):
    return asyncio.run(coro)


async def echo_upstream():
    async def echo(ws):
        async for message in ws:
            await ws.send(message)

    return await websockets.serve(echo, "127.0.0.1", 0, max_size=None, compression=None)


# -- ws_encode_bundle: what ----------------------------------------------------------------------

MESSAGE = 512 * 1024


def test_the_exit_bundle_keeps_the_first_messages_of_each_websocket_not_all(tmp_path):
    folder = tmp_path / "bundle"

    async def scenario():
        upstream = await echo_upstream()
        port = upstream.sockets[0].getsockname()[1]
        async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{port}", "--set", "flow_detail=0",
                            "--set", f"ws_encode_bundle={folder}") as md:
            for n in range(2):
                async with websockets.connect(f"ws://127.0.0.1:{md.port}/big/{n}", max_size=None,
                                              compression=None) as ws:
                    await ws.send("first")
                    assert await ws.recv() == "first"
                    for _ in range(4):
                        await ws.send(b"x" * MESSAGE)
                        await ws.recv()
        upstream.close()
        return md

    md = run(scenario())
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    # 2 x 4 x 512 KiB each way went through; each WebSocket keeps its first 64 KiB of messages.
    assert sizes[bundle.FLOWS] < 2 * bundle.MESSAGE_BYTES + 64 * 1024, sizes
    summary = (folder / bundle.SUMMARY).read_text()
    assert summary.count(f"- WebSocket messages: the first 2 kept; 8 later ones ({8 * MESSAGE:,} bytes) left out") == 2
    assert summary.count("(client-first)") == 2
    from mitmproxy import io

    with open(folder / bundle.FLOWS, "rb") as f:
        flows = list(io.FlowReader(f).stream())
    assert [[m.content for m in f.websocket.messages] for f in flows] == [[b"first", b"first"]] * 2
    assert_clean_log(md)


# -- ws_encode_bundle: redacted values a server echoes --------------------------------------------

COOKIE = "sid=echoed-cookie-c00k1e"
TOKEN = "echoed-query-70ken"


async def echoing_401(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request 401 with a page that prints the request back, gzipped."""
    head = await reader.readuntil(b"\r\n\r\n")
    body = gzip.compress(b"<pre>You sent:\n" + head + b"</pre>")
    writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-type: text/html\r\ncontent-encoding: gzip\r\n"
                 b"x-echo-cookie: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                 % (COOKIE.encode(), len(body), body))
    await writer.drain()
    writer.close()


def test_the_bundle_scrubs_redacted_values_a_server_echoes_in_bodies_headers_and_messages(tmp_path):
    folder = tmp_path / "bundle"

    async def scenario():
        refusing = await asyncio.start_server(echoing_401, "127.0.0.1", 0)
        echoing = await echo_upstream()
        ports = [s.sockets[0].getsockname()[1] for s in (refusing, echoing)]
        async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{ports[0]}", "--set", "flow_detail=0",
                            "--set", f"ws_encode_bundle={folder}") as md:
            head = await raw_exchange(md.port, upgrade_request(f"/refused?token={TOKEN}", Cookie=COOKIE), timeout=5)
        async with Mitmdump("--mode", f"reverse:http://127.0.0.1:{ports[1]}", "--set", "flow_detail=0",
                            "--set", f"ws_encode_bundle={tmp_path / 'bundle-ws'}") as md2:
            async with websockets.connect(f"ws://127.0.0.1:{md2.port}/ws?token={TOKEN}",
                                          additional_headers={"cookie": COOKIE}) as ws:
                await ws.send(f"my cookie is {COOKIE} and my token {TOKEN}")
                await ws.recv()
        refusing.close()
        echoing.close()
        return head, md, md2

    head, md, md2 = run(scenario())
    assert head.startswith(b"HTTP/1.1 401"), head
    for where in (folder, tmp_path / "bundle-ws"):
        for p in where.iterdir():
            data = p.read_bytes()
            assert b"echoed-cookie-c00k1e" not in data and TOKEN.encode() not in data, (where.name, p.name)
    from mitmproxy import io

    with open(folder / bundle.FLOWS, "rb") as f:
        refused = next(iter(io.FlowReader(f).stream()))
    assert refused.response.headers["content-encoding"] == "gzip"  # scrubbed as the page reads, encoded again
    assert b"Cookie: REDACTED" in refused.response.content and b"token=REDACTED" in refused.response.content
    assert refused.response.headers["x-echo-cookie"] == "REDACTED"
    with open(tmp_path / "bundle-ws" / bundle.FLOWS, "rb") as f:
        echoed = next(iter(io.FlowReader(f).stream()))
    assert [m.text for m in echoed.websocket.messages] == ["my cookie is REDACTED and my token REDACTED"] * 2
    assert "places changed" in (folder / bundle.SUMMARY).read_text()
    assert_clean_log(md)
    assert_clean_log(md2)
