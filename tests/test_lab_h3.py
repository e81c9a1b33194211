"""The lab's HTTP/3 side: every encoder behaviour over QUIC with real codings,
with and without accept-encoding, advertised by Alt-Svc on the TCP side, and
the requests hypercorn's HTTP/3 server gets wrong answered as RFC 9114 and
RFC 9220 say. The RFC 9220 client of wspeers.h3ws talks to it directly, and
so does Chromium with QUIC forced on."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import h2.events
import pytest
from conftest import LabAlone
from peers import chromium
from wspeers import h2ws, h3ws
from wspeers.h3ws import ErrorCode

from wslab.app import ERROR_PAGE, GREETING
from wslab.codings import Decoder, decode
from wslab.encoders import MIN_SIZE, Behaviour
from wslab.server import LabServer

ROOT = Path(__file__).resolve().parent.parent
BROWSER = "gzip, deflate, br, zstd"  # zstd is chosen
CODINGS = ("zstd", "br", "gzip")
# How long a status that should be withheld is given to show up anyway (a
# status expected at once is given DEFAULT_TIMEOUT: a busy machine only delays it).
NO_STATUS_YET = 0.3
pytestmark = pytest.mark.timeout(30)


def lab(behaviour: str, cert) -> LabServer:
    return LabServer(behaviour, *cert, h3=True)


def h3_client(server: LabServer) -> h3ws.H3WebSocketClient:
    return h3ws.H3WebSocketClient("127.0.0.1", server.h3.port)


def get_request(path: str, accept_encoding: str | None = None) -> list[tuple[bytes, bytes]]:
    fields = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", path.encode()), (b":authority", b"localhost")]
    return fields + ([(b"accept-encoding", accept_encoding.encode())] if accept_encoding else [])


async def status_now(ws: h3ws.ClientWebSocket, expected: bool) -> bool:
    """Whether the status is there (before the client says more), waiting
    as long as the expectation needs."""
    try:
        await ws.wait_status(h3ws.DEFAULT_TIMEOUT if expected else NO_STATUS_YET)
    except asyncio.TimeoutError:
        return False
    return True


async def echo_cell(client: h3ws.H3WebSocketClient, accept_encoding: str | None, at_once: bool = True,
                    after_small: bool = True) -> dict:
    """One WebSocket to /echo (the client speaks first): whether its status
    came before the client spoke and after its small first message (`at_once`
    and `after_small` are what is expected), what it said, and what the echo
    of the small and then a large message was."""
    headers = [("accept-encoding", accept_encoding)] if accept_encoding else []
    ws = await client.open_websocket("/echo", "localhost", headers=headers)
    at_once = await status_now(ws, at_once)
    await ws.send_text("small")
    after_small = await status_now(ws, after_small) if not at_once else True
    large = "L" * (MIN_SIZE + 1)
    await ws.send_text(large)
    await ws.wait_status()
    fields = dict(ws.response_headers)
    coding = fields.get("content-encoding")
    echoes = [await ws.receive(), await ws.receive()]
    if coding:  # encode-upgrade: each message replaced by the bytes of one running stream
        decoder = Decoder(coding)
        echoes = [decoder.decode(echo).decode() for echo in echoes]
    await ws.close()
    return {"at_once": at_once, "after_small": after_small, "status": ws.status, "coding": coding,
            "echoes_right": echoes == ["small", large]}


# What each behaviour does to an HTTP/3 WebSocket handshake that offers codings:
# (status before the client speaks, status after its small first message, content-encoding)
WITH_ENCODING = {
    "none": (True, True, None),
    "fixed": (True, True, None),
    "hold-until-body": (False, True, None),  # released with the echo of the first message
    "hold-1xx": (False, True, None),  # a final status is held as by hold-until-body
    "hold-until-min-size": (False, False, None),  # the small echo is not enough; the large one is
    "encode-upgrade": (True, True, "zstd"),
    "buffer-events": (True, True, None),  # never wraps a WebSocket: Starlette's and Express's encoders see none
}


@pytest.mark.parametrize("behaviour", ["none", *(b.value for b in Behaviour)])
def test_every_behaviour_over_http3_with_and_without_accept_encoding(cert, behaviour):
    at_once, after_small, coding = WITH_ENCODING[behaviour]

    async def scenario():
        async with lab(behaviour, cert) as server, h3_client(server) as client:
            return (await echo_cell(client, None), await echo_cell(client, BROWSER, at_once, after_small),
                    server.app.requests)

    plain, offered, requests = asyncio.run(scenario())
    # Nothing offered: no encoder wraps the handshake, whatever its behaviour.
    assert plain == {"at_once": True, "after_small": True, "status": 200, "coding": None, "echoes_right": True}
    assert offered == {"at_once": at_once, "after_small": after_small, "status": 200, "coding": coding,
                       "echoes_right": True}
    assert requests == [("websocket", "3", "/echo", None), ("websocket", "3", "/echo", BROWSER)]


@pytest.mark.parametrize("behaviour", ["hold-until-body", "encode-upgrade"])
def test_pages_and_a_refused_upgrade_are_compressed_in_every_coding_over_http3(cert, behaviour):
    async def scenario():
        async with lab(behaviour, cert) as server, h3_client(server) as client:
            plain = client.send_request(get_request("/"))
            encoded = [client.send_request(get_request("/", coding)) for coding in CODINGS]
            refused = await client.open_websocket("/private", "localhost", headers=[("accept-encoding", "br")])
            for exchange in (plain, *encoded, refused):
                assert await exchange.wait_ended() == "end_stream"
            return plain, encoded, refused

    plain, encoded, refused = asyncio.run(scenario())
    assert plain.status == 200 and "content-encoding" not in dict(plain.response_headers)
    page = bytes(plain.response_body)
    assert b"ws-encode lab" in page
    for coding, exchange in zip(CODINGS, encoded):
        fields = dict(exchange.response_headers)
        assert exchange.status == 200 and fields["content-encoding"] == coding and "accept-encoding" in fields["vary"]
        body = bytes(exchange.response_body)
        assert decode(coding, body) == page and len(body) < len(page) * 0.7
    assert refused.status == 403 and dict(refused.response_headers)["content-encoding"] == "br"
    assert decode("br", bytes(refused.response_body)).decode() == ERROR_PAGE


def test_alt_svc_names_the_udp_port_and_one_quic_connection_carries_pages_and_websockets(cert):
    async def scenario():
        async with lab("fixed", cert) as server:
            async with h2ws.H2WebSocketClient("127.0.0.1", server.port) as tcp:
                await tcp.get("/", "localhost")
                response = next(e for e in tcp.events if isinstance(e, h2.events.ResponseReceived))
            async with h3_client(server) as client:
                page = client.send_request(get_request("/"))
                ws = await client.open_websocket("/echo", "localhost")
                await ws.send_text("over QUIC")
                echo = await ws.receive()
                await page.wait_ended()
            return server, dict(response.headers), echo, page.status, client.events

    server, fields, echo, page_status, events = asyncio.run(scenario())
    assert fields[b"alt-svc"] == f'h3=":{server.h3.port}"'.encode()
    assert server.h3.port == server.port  # the same number on UDP, since it was free
    assert (echo, page_status) == ("over QUIC", 200)
    assert ("http", "3", "/", None) in server.app.requests and ("websocket", "3", "/echo", None) in server.app.requests
    closes = [e for e in events if isinstance(e, h3ws.ConnectionClosed)]
    assert [c.initiator for c in closes] == ["us"]  # one connection all along, closed by the client


def test_what_hypercorns_http3_gets_wrong_is_answered_per_stream(cert):
    """hypercorn 0.17/0.18 answers an unknown :protocol with 200, and a CONNECT
    without :path ends its whole QUIC listener; the lab's HTTP/3 side answers
    each on its own stream, and tells the application of a client's reset."""
    async def scenario():
        async with lab("hold-until-body", cert) as server, h3_client(server) as client:
            plain_connect = client.send_request([(b":method", b"CONNECT"), (b":authority", b"localhost:9")],
                                                end_stream=False)
            unknown = await client.open_websocket("/echo", "localhost", protocol="webtransport")
            protocol_on_get = client.send_request([*get_request("/"), (b":protocol", b"websocket")])
            outcomes = [await plain_connect.wait_status(), await unknown.wait_status(),
                        await protocol_on_get.wait_ended()]
            reset = await client.open_websocket("/echo", "localhost")
            await reset.wait_status()
            app_tasks = set(server.h3.tasks)
            await reset.reset()
            _done, still_running = await asyncio.wait(app_tasks, timeout=5)
            assert await client.get("/", "localhost") == (200, bytes(server.app.page()))
            return outcomes, still_running, client.closed

    outcomes, still_running, closed = asyncio.run(scenario())
    assert outcomes == [405, 501, f"reset:{ErrorCode.H3_MESSAGE_ERROR}"]  # RFC 9114 §4.4, RFC 9220 §3, §4.1.2
    assert still_running == set()  # the application heard of the reset and returned
    assert closed is None


def test_the_lab_on_its_own_serves_http3_and_says_how_to_reach_it(tmp_path):
    helped = subprocess.run([sys.executable, "-m", "wslab.lab", "--help"], capture_output=True, text=True,
                            timeout=20)
    assert "Alt-Svc" in helped.stdout and "--enable-features=EnableWebsocketsOverHttp3" in helped.stdout
    with LabAlone(tmp_path, "--behaviour", "hold-until-body", "--port", "0") as alone:
        text = alone.printed
        port = int(re.search(r"HTTP/3 on UDP port (\d+), RFC 9220 on", text).group(1))
        assert f"-m wspeers.h3ws client --url https://127.0.0.1:{port}/echo" in text
        assert f"--origin-to-force-quic-on=127.0.0.1:{port}" in text

        async def client():
            async with h3ws.H3WebSocketClient("127.0.0.1", port) as c:
                held = await c.open_websocket("/echo", "localhost", headers=[("accept-encoding", "gzip")])
                at_once = await status_now(held, expected=False)
                await held.send_text("hi")
                return at_once, await held.wait_status(), await held.receive()

        assert asyncio.run(client()) == (False, 200, "hi")
    assert alone.returncode == 0, alone.rest
    assert "HTTP/3 websocket /echo accept-encoding: gzip" in alone.rest


@chromium.needs_chromium
def test_chromium_takes_the_labs_page_and_its_websocket_over_http3(cert, home):
    """The lab's own page, forced onto QUIC: Chromium offers its codings on
    the RFC 9220 handshake, hold-until-body holds the 200 until the greeting,
    and the page reports what /greet said."""
    async def scenario():
        async with lab("hold-until-body", cert) as server:
            browser = await chromium.start(f"https://127.0.0.1:{server.h3.port}/?after=0.2", home,
                                           quic=chromium.quic_flags(server.h3.port, cert[0]))
            try:
                return await asyncio.wait_for(server.app.results.get(), 60), server.app.requests
            finally:
                await chromium.stop(browser)

    result, requests = asyncio.run(scenario())
    assert urllib.parse.unquote(result) == f"greet={GREETING}"
    greets = [r for r in requests if r[:3] == ("websocket", "3", "/greet")]
    assert len(greets) == 1 and "zstd" in greets[0][3]
    assert all(r[1] == "3" for r in requests)  # the page, the WebSocket and the report: all HTTP/3
