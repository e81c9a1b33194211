"""HTTP/3 messages that break HTTP/3's rules, through a real mitmdump running
the addon: each is an error of its own stream, and the QUIC connections on
both sides go on serving the others (RFC 9114 section 4.1.2).

- a request with HTTP/1.1's connection-specific fields (section 4.2);
- an upstream's 101, which HTTP/3 does not have (section 4.5), or another
  `:status` HTTP/3 cannot carry; an interim 1xx is not the response;
- a peer's FIN on a stream that has ended (a repeated final size, RFC 9000
  section 4.5).
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import assert_clean_log
from test_h3_proxy import AUTHORITY, h3_client, reverse_h3
from wspeers import h3ws

pytestmark = pytest.mark.timeout(90)

GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", AUTHORITY.encode()), (b":path", b"/bad")]
CONNECT = [(b":method", b"CONNECT"), (b":protocol", b"websocket"), (b":scheme", b"https"),
           (b":authority", AUTHORITY.encode()), (b":path", b"/bad"), (b"sec-websocket-version", b"13")]

CONNECTION_SPECIFIC = {
    "connection": GET + [(b"connection", b"keep-alive")],
    "keep-alive": GET + [(b"keep-alive", b"timeout=5")],
    "proxy-connection": GET + [(b"proxy-connection", b"keep-alive")],
    "transfer-encoding chunked": GET + [(b"transfer-encoding", b"chunked")],
    "transfer-encoding trailers": GET + [(b"transfer-encoding", b"trailers")],
    "upgrade": GET + [(b"upgrade", b"websocket")],
    "te gzip": GET + [(b"te", b"gzip")],
    "an HTTP/1.1 upgrade": GET + [(b"connection", b"upgrade"), (b"upgrade", b"websocket"),
                                  (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="), (b"sec-websocket-version", b"13")],
    "an extended CONNECT with upgrade": CONNECT + [(b"upgrade", b"websocket")],
}


def test_a_request_with_connection_specific_fields_is_refused_on_its_stream_alone(cert, report):
    """Each one a 400 on its own stream, never sent upstream; a WebSocket
    open beside them echoes, and the connection serves the next request."""
    async def scenario():
        async with h3ws.H3WebSocketServer(*cert) as upstream:
            async with reverse_h3(upstream.port, report=report) as md:
                client = await h3_client(md)
                ws = await client.open_websocket("/chat", AUTHORITY)
                await ws.wait_status(5)
                refused = {}
                for why, headers in CONNECTION_SPECIFIC.items():
                    exchange = client.send_request(headers)
                    await exchange.wait_ended(5)
                    refused[why] = exchange.status
                allowed = client.send_request(GET + [(b"te", b"trailers")])
                await allowed.wait_ended(5)
                await ws.send_text("still open")
                echo = await ws.receive(5)
                page = await client.get("/", AUTHORITY)
                closed = client.closed
                await ws.close()
                await client.close()
                return refused, allowed.status, echo, page, closed, upstream.requests, md

    refused, allowed, echo, page, closed, requests, md = asyncio.run(scenario())
    assert refused == {why: 400 for why in CONNECTION_SPECIFIC}
    assert (allowed, echo, page[0], closed) == (200, "still open", 200, None)
    assert [r["pseudo"][":path"] for r in requests] == ["/chat", "/bad", "/"]  # (the one with te: trailers)
    refusals = [line for line in md.lines if "refused HTTP/3 stream" in line]
    assert len(refusals) == len(CONNECTION_SPECIFIC)
    assert any("connection-specific field upgrade (RFC 9114 section 4.2)" in line for line in refusals)
    assert not any(value in line for line in refusals for value in ("timeout=5", "chunked", "gzip", "dGhl"))
    assert_clean_log(md)


HEADS = {"/switch": ["101"], "/nonsense": ["1x1"], "/hints": ["103", "100"]}


@pytest.mark.parametrize("what", ["a GET", "a WebSocket"])
def test_an_upstreams_101_is_a_502_on_its_stream_and_interim_responses_are_skipped(cert, report, what):
    """HTTP/3 has no 101: the proxy resets that upstream stream
    (H3_MESSAGE_ERROR) and the client gets a 502 that says why, never the
    101. Interim responses (103, 100) are followed by the response, which the
    client gets. Before, mitmproxy took a 1xx for the response and the next
    HEADERS for trailers, closing the whole upstream connection; a 101 on an
    extended CONNECT reached the HTTP/3 client as it was."""
    async def scenario():
        async with h3ws.H3WebSocketServer(*cert, heads_before=HEADS) as upstream:
            async with reverse_h3(upstream.port, report=report) as md:
                client = await h3_client(md)
                beside = await client.open_websocket("/beside", AUTHORITY)
                await beside.wait_status(5)
                answers = {}
                for path in HEADS:
                    if what == "a GET":
                        exchange = client.send_request([*GET[:3], (b":path", path.encode())])
                    else:
                        exchange = await client.open_websocket(path, AUTHORITY)
                    if await exchange.wait_status(5) != 200 or what == "a GET":
                        await exchange.wait_ended(5)
                    answers[path] = exchange.status, bytes(exchange.response_body)
                await beside.send_text("beside")
                echo = await beside.receive(5)
                records = [await md.wait_for_record(event="handshake", url=f"https://127.0.0.1:{upstream.port}{path}")
                           for path in ("/beside", "/switch")] if what == "a WebSocket" else []
                closed = client.closed, list(upstream.closed_connections)
                await client.close()
                return answers, echo, closed, records, md

    answers, echo, closed, records, md = asyncio.run(scenario())
    switch, nonsense, hints = answers["/switch"], answers["/nonsense"], answers["/hints"]
    assert switch[0] == 502 and b"101 Switching Protocols, which HTTP/3 does not have" in switch[1]
    assert nonsense[0] == 502 and b"not three digits" in nonsense[1]
    assert hints[0] == 200
    assert (echo, closed) == ("beside", (None, []))
    assert sum("reset upstream HTTP/3 stream" in line for line in md.lines) == 2
    if records:
        assert records[0]["outcome"] == "upgraded"
        assert records[1]["outcome"] == "no-status" and records[1]["status"] is None
        assert "101 Switching Protocols, which HTTP/3 does not have" in records[1]["diagnosis"]
    assert_clean_log(md)



def test_an_upstream_stream_that_ends_without_a_response_is_a_502(cert, report):
    """An upstream stream's end before its response (a bare FIN, or after a
    103 only) is a malformed response too. Before, the bare FIN left the
    client's request waiting for as long as the connection lived, and
    mitmproxy crashed when it closed."""
    async def scenario():
        async with h3ws.H3WebSocketServer(*cert, heads_before={"/hint-only": ["103"]},
                                          unanswered=["/fin-only", "/hint-only"]) as upstream:
            async with reverse_h3(upstream.port, report=report) as md:
                client = await h3_client(md)
                answers = {}
                for path in ("/fin-only", "/hint-only"):
                    exchange = client.send_request([*GET[:3], (b":path", path.encode())])
                    await exchange.wait_ended(5)
                    answers[path] = exchange.status, bytes(exchange.response_body)
                ws = await client.open_websocket("/fin-only", AUTHORITY)
                answers["WebSocket"] = await ws.wait_status(5), b""
                page = await client.get("/", AUTHORITY)
                closed = client.closed
                await client.close()
            return answers, page, closed, md

    answers, page, closed, md = asyncio.run(scenario())
    assert answers["/fin-only"][0] == answers["/hint-only"][0] == answers["WebSocket"][0] == 502
    assert b"the stream ended before a response" in answers["/fin-only"][1]
    assert b"an interim 103 response that ends the stream" in answers["/hint-only"][1]
    assert (page[0], closed) == (200, None)
    assert_clean_log(md)

def test_a_fin_that_comes_again_ends_nothing_else(cert, report):
    """QUIC sends a FIN again when its acknowledgement was lost, and aioquic
    hands it on. Before, mitmproxy closed the whole QUIC connection for it
    (PROTOCOL_VIOLATION, "stream already ended"), here on a WebSocket
    handshake the client ended before its status (which the proxy keeps for
    after it, and this upstream withholds)."""
    async def scenario():
        async with h3ws.H3WebSocketServer(*cert, withhold_status_when_encoding=True) as upstream:
            async with reverse_h3(upstream.port, report=report) as md:
                client = await h3_client(md)
                beside = await client.open_websocket("/beside", AUTHORITY)
                await beside.wait_status(5)
                held = await client.open_websocket("/held", AUTHORITY, headers=[("accept-encoding", "gzip")])
                await upstream.wait_until(lambda: any(r["pseudo"][":path"] == "/held" for r in upstream.requests))
                held.half_close()
                held.repeat_fin()
                await beside.send_text("beside")
                echo = await beside.receive(5)
                page = await client.get("/", AUTHORITY)
                closed = client.closed
                await client.close()
                return echo, page, closed, md

    echo, page, closed, md = asyncio.run(scenario())
    assert (echo, page[0], closed) == ("beside", 200, None)
    assert_clean_log(md)


def test_a_1xx_an_addon_makes_the_response_reaches_the_h3_client_as_a_502(cert, report, tmp_path):
    """Whatever path a 101 or another 1xx takes to an HTTP/3 client's
    response (here another addon's response hook), the client gets a 502 on
    that stream and the rest of the connection goes on. Before, the client
    got the 101 as it was, and mitmproxy crashed when the connection closed
    (the stream it had turned into a TCP relay took an error after its end)."""
    forcing = tmp_path / "force_1xx.py"
    forcing.write_text(
        "def response(flow):\n"
        "    if flow.request.path.startswith('/force-'):\n"
        "        flow.response.status_code = int(flow.request.path.removeprefix('/force-'))\n"
    )

    async def scenario():
        async with h3ws.H3WebSocketServer(*cert) as upstream:
            async with reverse_h3(upstream.port, "-s", str(forcing), report=report) as md:
                client = await h3_client(md)
                beside = await client.open_websocket("/beside", AUTHORITY)
                await beside.wait_status(5)
                statuses = {}
                for forced in ("101", "103"):
                    exchange = client.send_request([*GET[:3], (b":path", f"/force-{forced}".encode())])
                    await exchange.wait_ended(5)
                    statuses[forced] = exchange.status
                ws = await client.open_websocket("/force-101", AUTHORITY)
                statuses["WebSocket"] = await ws.wait_status(5)
                await beside.send_text("beside")
                echo = await beside.receive(5)
                page = await client.get("/", AUTHORITY)
                closed = client.closed
                await client.close()
            return statuses, echo, page, closed, md

    statuses, echo, page, closed, md = asyncio.run(scenario())
    assert statuses == {"101": 502, "103": 502, "WebSocket": 502}
    assert (echo, page[0], closed) == ("beside", 200, None)
    assert sum("which HTTP/3 does not have" in line for line in md.lines) == 2
    assert any("the response is an interim 103" in line for line in md.lines)
    assert_clean_log(md)
